"""strip_punctuation: the COCO preset trains on words only, as the published recipes do; the demo
presets, the defaults, the CVND calls and checkpoints from before the option keep every token."""

import dataclasses
import json

import pytest

from captioning.config import TrainConfig, config_from_dict, resume_conflicts
from captioning.data.annotations import _cache_key, read_split, tokenize
from captioning.data.loading import CaptionDataset, load_or_build_vocab
from captioning.data.vocabulary import Vocabulary
from captioning.presets import coco_config, demo_config
from captioning.training.train import read_splits
from data_loader import get_loader

CAPTION = "A man riding a horse ."
WORDS = ["a", "man", "riding", "a", "horse"]
# Treebank turns quotes into `` and '': punctuation too; "'s" and "n't" are words.
QUOTED = "The man's \"big\" horse, it isn't -- small!"
QUOTED_WORDS = ["the", "man", "'s", "big", "horse", "it", "is", "n't", "small"]


def write_coco(root, captions):
    """A COCO 2017 folder whose train and val splits hold one image with `captions` (no image
    files: reading captions and tokens needs none)."""
    (root / "annotations").mkdir(parents=True)
    for split in ("train", "val"):
        data = {
            "images": [{"id": 1, "file_name": "1.jpg"}],
            "annotations": [
                {"id": k, "image_id": 1, "caption": text} for k, text in enumerate(captions)
            ],
        }
        (root / "annotations" / f"captions_{split}2017.json").write_text(json.dumps(data))
    return root


def trained_tokens(config):
    """The vocabulary and the training captions' words, read as `train` reads them."""
    (train_split, _), _ = read_splits(config)
    vocab = load_or_build_vocab(
        vocab_file=None, vocab_threshold=config.vocab_threshold, vocab_from_file=False,
        train_split=train_split,
    )  # fmt: skip
    dataset = CaptionDataset(train_split, vocab)
    ids = [dataset.token_ids[a:b] for a, b in zip(dataset.offsets[:-1], dataset.offsets[1:])]
    return vocab, [[vocab.idx2word[int(i)] for i in caption] for caption in ids]


def test_the_option_trains_on_words_only_and_the_vocabulary_has_no_punctuation(tmp_path):
    data = write_coco(tmp_path / "coco", [CAPTION, QUOTED])
    config = TrainConfig(data_dir=str(data), vocab_threshold=1, strip_punctuation=True)
    vocab, captions = trained_tokens(config)
    assert captions == [WORDS, QUOTED_WORDS]
    assert "." not in vocab and "," not in vocab and "``" not in vocab and "'s" in vocab
    assert vocab.strip_punctuation  # its encode of text drops punctuation too
    assert vocab.encode(CAPTION) == [vocab.start_id, *map(vocab, WORDS), vocab.end_id]

    vocab, captions = trained_tokens(dataclasses.replace(config, strip_punctuation=False))
    assert captions == [[*WORDS, "."], tokenize(QUOTED)]
    assert "." in vocab and "," in vocab and not vocab.strip_punctuation


def test_on_in_the_coco_preset_only():
    assert coco_config().strip_punctuation and coco_config("attention").strip_punctuation
    assert not TrainConfig().strip_punctuation
    for decoder in ("showtell", "attention", "transformer"):
        assert not demo_config(decoder).strip_punctuation
        assert not demo_config(decoder, scst=True).strip_punctuation


def test_tokens_kept_with_punctuation_never_serve_a_split_that_strips_it(tmp_path):
    data, cache = write_coco(tmp_path / "coco", [CAPTION]), tmp_path / "cache"
    kept, stripped = read_split(data, "train"), read_split(data, "train", strip_punctuation=True)
    assert _cache_key(kept) != _cache_key(stripped)  # the CIDEr-D cache is keyed on it too
    assert list(kept.tokenized(cache)) == [[*WORDS, "."]]
    assert list(stripped.tokenized(cache)) == [WORDS]
    assert list(read_split(data, "train").tokenized(cache)) == [[*WORDS, "."]]
    # Dropping unreadable images keeps the setting.
    assert list(stripped.without_images([]).tokenized(cache)) == [WORDS]


def test_the_cvnd_calls_keep_every_token(tmp_path):
    data = write_coco(tmp_path / "coco", [CAPTION])
    loader = get_loader(
        None, vocab_threshold=1, vocab_file=str(tmp_path / "vocab.json"), vocab_from_file=False,
        data_dir=str(data),
    )  # fmt: skip
    assert "." in loader.dataset.vocab
    annotations = data / "annotations" / "captions_train2017.json"
    vocab = Vocabulary(1, vocab_file=None, annotations_file=str(annotations))
    assert "." in vocab and vocab.encode(CAPTION)[-2] == vocab(".")


def test_checkpoints_from_before_the_option_keep_their_punctuation():
    saved = dataclasses.asdict(coco_config())
    del saved["strip_punctuation"]  # a COCO run saved before the option
    assert not config_from_dict(TrainConfig, saved).strip_punctuation
    # Resuming it from today's COCO preset says what differs.
    assert resume_conflicts(saved, coco_config()) == [
        "strip_punctuation: checkpoint False vs config True"
    ]
    old_vocab = Vocabulary(1, vocab_file=None, captions=[CAPTION]).to_dict()
    del old_vocab["strip_punctuation"]
    assert not Vocabulary.from_dict(old_vocab).strip_punctuation
    kept = Vocabulary(1, vocab_file=None, captions=[CAPTION], strip_punctuation=True)
    assert Vocabulary.from_dict(kept.to_dict()).strip_punctuation


@pytest.mark.parametrize("token", [".", ",", "``", "''", "--", "...", "!", "?", ";", "&"])
def test_punctuation_tokens_are_dropped(token):
    assert tokenize(f"a {token} b", strip_punctuation=True) == ["a", "b"]
