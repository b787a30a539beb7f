"""Caption health figures (caption_health.py) on hand-written captions, and the demo's table."""

from pathlib import Path

import pytest

from captioning.config import TrainConfig
from captioning.evaluation.caption_health import (
    BAD_ENDINGS,
    SAME_CAPTION_SHARE,
    describe_same_caption,
    ends_badly,
    format_health,
    measure_health,
    repeats_itself,
    words_of,
)

CAPTIONS = {
    1: "a man riding a horse",  # "a" twice, but no word trigram twice: healthy
    2: "a man riding a",  # ends on "a"
    3: "a dog with a frisbee with",  # ends on "with"
    4: "a man in a hat and a man in a coat",  # "a man in" (and "man in a") twice
    5: "a man riding a horse",
    6: "a cat on a mat on a mat",  # "on a mat" twice, ends well
    7: "two dogs dogs",  # a word twice in a row
    8: "",  # an empty caption neither ends badly nor repeats
    9: "a man in a .",  # ends on "a": the full stop after it changes nothing
    10: "a cat on a bed next to a dog on a couch",  # "on a" twice, no trigram: healthy
}


def test_each_figure_on_hand_written_captions():
    health = measure_health(CAPTIONS)
    assert health == {
        "bad_endings": 3 / 10,
        "repeats": 3 / 10,
        "distinct_captions": 9 / 10,
        # a man riding horse dog with frisbee in hat and coat cat on mat two dogs . bed next to
        # couch
        "words_used": 21,
        "top_caption_share": 2 / 10,
    }
    assert [ends_badly(c) for c in CAPTIONS.values()] == [0, 1, 1, 0, 0, 0, 0, 0, 1, 0]
    assert [repeats_itself(c) for c in CAPTIONS.values()] == [0, 0, 0, 1, 0, 1, 1, 0, 0, 0]


def test_the_last_word_before_closing_punctuation_is_the_ending():
    for caption in ("a man in a .", "a man in a.", "A man in a !", "a plate of ...", "on the ,"):
        assert ends_badly(caption), caption
    for caption in ("a man on a horse .", "a dog .", "a bed , next to a wall", ". .", "."):
        assert not ends_badly(caption), caption
    assert words_of("A man's hat , on a bed.") == ["a", "man's", "hat", "on", "a", "bed"]


def test_a_repeat_is_a_word_trigram_twice_or_a_word_twice_in_a_row():
    assert repeats_itself("a dog dog on the grass") and repeats_itself("a dog . dog")
    assert repeats_itself("a man on a horse and a man on a bike")
    assert not repeats_itself("a cat on a bed next to a dog on a couch")  # "on a" twice only
    assert not repeats_itself("a man and a woman and a child")  # "and a" twice only
    assert not repeats_itself("a man . . .")  # punctuation is no word


def test_novel_captions_are_those_no_training_caption_matches():
    training = ["A red square.", "a blue circle next to a red square", "two shapes ,"]
    captions = {1: "a red square", 2: "a red square .", 3: "two shapes", 4: "a green square"}
    health = measure_health(captions, training)
    assert health["novel_captions"] == 1 / 4  # only "a green square"
    assert "novel captions 25.0%" in format_health(health)
    assert "novel_captions" not in measure_health(captions)  # no training captions, no figure
    assert "novel" not in format_health(measure_health(captions))
    assert measure_health(captions, [])["novel_captions"] == 1.0


def test_bad_endings_follow_self_critical_pytorch():
    # ruotianluo/self-critical.pytorch's list, with "and".
    assert {"a", "an", "the", "of", "with", "on", "in", "and", "to", "is", "near"} <= BAD_ENDINGS
    assert not {"man", "horse", "table", "grass"} & BAD_ENDINGS
    assert ends_badly("a plate of") and not ends_badly("a plate of food")


def test_a_repeated_trigram_counts_once_and_a_longer_caption_without_one_not_at_all():
    assert repeats_itself("a man in a hat and a man in a coat")
    assert not repeats_itself("a man in a red hat next to a woman in blue")
    assert measure_health({1: "x y z x y z", 2: "x y x y"})["repeats"] == 0.5


def test_same_caption_warning_names_the_checkpoints_preprocessing():
    config = TrainConfig(image_size=96, backbone="smallcnn", pretrained=False)
    same = {i: "a red square" for i in range(5)} | {5: "a blue circle", 6: "two shapes"}
    message = describe_same_caption(measure_health(same), config)
    assert message.startswith("71% of the images got the same caption")
    for value in ("image_size=96", "resize='crop'", "backbone='smallcnn'", "pretrained=False",
                  "weights_path=None"):  # fmt: skip
        assert value in message
    # A blind model captions every image alike by design: nothing to warn about.
    assert describe_same_caption(measure_health(same), TrainConfig(blind=True)) is None
    # Just below the threshold: no warning.
    varied = {i: f"caption {i % 3}" for i in range(7)}
    assert measure_health(varied)["top_caption_share"] < SAME_CAPTION_SHARE
    assert describe_same_caption(measure_health(varied), config) is None
    at_threshold = {1: "a", 2: "a", 3: "b", 4: "c"}
    assert describe_same_caption(measure_health(at_threshold), config) is not None


def test_demo_table_shows_the_health_of_each_row(capsys):
    from captioning.demo.run import report

    def row(cider, bad, repeats, distinct):
        return {"CIDEr": cider, "Bleu_4": 0.1, "accuracy": 0.5, "by_count": {1: 0.6},
                "bad_endings": bad, "repeats": repeats, "distinct_captions": distinct}  # fmt: skip

    summary = {
        "cross_entropy_greedy": row(1.0, 0.011, 0.022, 0.5), "cross_entropy_beam3": row(1.1, 0, 0, 0.4),
        "greedy": row(1.2, 0.333, 0.044, 0.25), "beam3": row(1.3, 0.055, 0.066, 0.125),
        "best_epoch_stage": "scst", "train_seconds": 1, "total_seconds": 2,
    }  # fmt: skip
    report(summary, Path("out"), "grid.png")
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if "CIDEr" in line)
    assert header.split()[-3:] == ["end", "repeats", "distinct"]
    table = {line[:11].strip(): line[11:].split() for line in lines if line[:4] in ("XE g", "SCST")}
    assert table["XE greedy"][-3:] == ["1.1%", "2.2%", "50.0%"]
    assert table["SCST greedy"][-3:] == ["33.3%", "4.4%", "25.0%"]


@pytest.mark.parametrize("captions", [{}, {1: ""}])
def test_no_or_empty_captions(captions):
    health = measure_health(captions)
    assert health["bad_endings"] == health["repeats"] == 0 and health["words_used"] == 0
