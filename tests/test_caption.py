"""The caption command: own image files and folders, greedy and beam, JSON and drawn output."""

import inspect
import json
import os
import runpy
import sys
import warnings
from pathlib import Path

import pytest
import torch

from captioning.checkpoint import load_checkpoint, load_trained, save_checkpoint
from captioning.config import TrainConfig
from captioning.data.annotations import read_split
from captioning.data.loading import load_image, make_transform
from captioning.decoding import DecodingOptions, decode_captions
from captioning.evaluation.caption_health import SAME_CAPTION_SHARE, measure_health
from captioning.training.train import train
from tests.helpers import ROOT

GRAYSCALE = "000000431848.jpg"  # a grayscale image in COCO val2017


@pytest.fixture(scope="module")
def checkpoint(demo_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("caption_model")
    train(
        TrainConfig(
            data_dir=str(demo_root),
            output_dir=str(out),
            vocab_threshold=1,
            backbone="smallcnn",
            pretrained=False,
            trainable_blocks=-1,
            image_size=32,
            embed_size=32,
            hidden_size=48,
            batch_size=16,
            epochs=1,
            val_images=10,
            patience=None,
            num_workers=0,
            progress=False,
        )
    )
    return out / "best.pt"


def expected_captions(checkpoint, paths, beam_size):
    """Captions decoded straight from the model, image by image, for comparison."""
    model, vocab, config = load_trained(checkpoint)
    transform = make_transform(config.image_size)
    with torch.no_grad():
        return [
            decode_captions(
                model.decoder,
                model.encode(transform(load_image(p))[None]),
                vocab,
                beam_size,
                config.max_caption_len,
            )[1][0]
            for p in paths
        ]


def test_caption_command_on_grayscale_coco_image_and_a_folder(
    checkpoint, coco_sample, demo_root, tmp_path, monkeypatch, capsys
):
    grayscale = coco_sample / "val2017" / GRAYSCALE
    folder = tmp_path / "mine"
    folder.mkdir()
    demo_images = sorted((demo_root / "test2017").iterdir())[:3]
    for image in demo_images:
        os.symlink(image, folder / image.name)
    (folder / "notes.txt").write_text("not an image: ignored")
    out = tmp_path / "captions.json"
    # caption.py run as the command it is (its `__main__` block), in this process: a fresh
    # interpreter would spend seconds importing torch again.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(
        sys, "argv", ["caption.py", str(checkpoint), str(grayscale), str(folder), "--beam", "3",
                      "--json", str(out), "--draw", str(tmp_path / "drawn")],
    )  # fmt: skip
    runpy.run_path(str(ROOT / "caption.py"), run_name="__main__")
    stdout = capsys.readouterr().out
    captions = json.loads(out.read_text())
    paths = [grayscale] + [folder / image.name for image in demo_images]
    assert list(captions) == [str(p) for p in paths]
    assert list(captions.values()) == expected_captions(checkpoint, paths, beam_size=3)
    assert all(captions.values()) and f"{grayscale}: {captions[str(grayscale)]}" in stdout
    assert sorted(p.name for p in (tmp_path / "drawn").iterdir()) == sorted(
        f"{p.stem}.png" for p in paths
    )


def test_caption_greedy_default_and_missing_file(
    checkpoint, coco_sample, tmp_path, monkeypatch, capsys
):
    from captioning import caption

    monkeypatch.chdir(tmp_path)
    grayscale = coco_sample / "val2017" / GRAYSCALE
    captions = caption.main([str(checkpoint), str(grayscale)])
    assert list(captions.values()) == expected_captions(checkpoint, [grayscale], beam_size=1)
    assert not (tmp_path / "captions.json").exists()  # one file given: no JSON unless asked
    with pytest.raises(SystemExit) as exit_:  # a person gets the one line, no traceback
        caption.main([str(checkpoint), str(tmp_path / "nope.jpg")])
    assert (
        exit_.value.code == 1
        and "nope.jpg: no such image file or folder" in capsys.readouterr().err
    )
    with pytest.raises(FileNotFoundError, match="nope.jpg: no such image file or folder"):
        caption.main([str(checkpoint), str(tmp_path / "nope.jpg"), "--debug"])


def test_length_penalty_is_the_checkpoints_unless_a_flag_gives_one(
    checkpoint, coco_sample, demo_root, monkeypatch, tmp_path
):
    from captioning import caption, decoding
    from captioning.evaluation import coco_metrics, evaluate

    # The functions behind the commands (and the demo's evaluation) read it from the checkpoint.
    for function in (evaluate.evaluate, caption.caption_images, caption.attention_maps):
        assert inspect.signature(function).parameters["length_penalty"].default is None
    state = load_checkpoint(checkpoint)
    assert state["config"]["length_penalty"] == 0.0
    state["config"]["length_penalty"] = -0.5
    shorter = save_checkpoint(state, tmp_path / "shorter.pt")
    seen, decode = [], decoding.decode_captions

    def recording_decode(*args, **kwargs):
        seen.append(args[5] if len(args) > 5 else kwargs["length_penalty"])
        return decode(*args, **kwargs)

    monkeypatch.setattr(decoding, "decode_captions", recording_decode)
    monkeypatch.setattr(evaluate, "decode_captions", recording_decode)
    grayscale = str(coco_sample / "val2017" / GRAYSCALE)
    caption.main([str(checkpoint), grayscale, "--beam", "2", "--length-penalty", "0.7"])
    caption.main([str(shorter), grayscale, "--beam", "2"])
    caption.main([str(checkpoint), grayscale, "--beam", "2"])
    # A penalty of 0 given explicitly is a choice, not "none given": it wins over the -0.5.
    caption.main([str(shorter), grayscale, "--beam", "2", "--length-penalty", "0"])
    assert seen == [0.7, -0.5, 0.0, 0.0]
    assert TrainConfig(length_penalty=-0.5).choose_length_penalty(0.0) == 0.0
    options = dict(data_dir=demo_root, beam_size=2, limit=2, num_workers=0, use_java=False)
    for penalty, expected in ((None, -0.5), (1.5, 1.5), (0.0, 0.0)):
        seen.clear()
        evaluate.evaluate(shorter, "val", length_penalty=penalty, progress=False, **options)
        assert seen == [expected]
    seen.clear()
    monkeypatch.setattr(coco_metrics, "java_available", lambda: False)
    evaluate.main([str(shorter), "--split", "val", "--data-dir", str(demo_root), "--limit", "2",
                   "--beam", "2", "--length-penalty", "0"])  # fmt: skip
    assert seen == [0.0]
    runs = []
    monkeypatch.setattr(evaluate, "evaluate", lambda *a, **k: runs.append(k) or {"metrics": {}})
    evaluate.main([str(checkpoint), "--beam", "3", "--length-penalty", "1.5"])
    evaluate.main([str(checkpoint), "--beam", "3"])
    assert [k["length_penalty"] for k in runs] == [1.5, None]  # None: the checkpoint's


def with_decoder_weights(checkpoint, path, same_features=False):
    """A copy of `checkpoint` with wide random word and decoder weights, so that captions vary
    from image to image; same_features: every image's feature made the same (the image layer's
    weights zeroed), one caption for all, as wrong preprocessing can do."""
    state = load_checkpoint(checkpoint)
    generator = torch.Generator().manual_seed(0)
    for name, value in state["model"].items():
        if name.startswith(("decoder.", "encoder.embed.")):
            state["model"][name] = torch.randn(value.shape, generator=generator) * 0.5
        if same_features and name.startswith("encoder.embed.") and name.endswith("weight"):
            state["model"][name] = torch.zeros_like(value)
    return save_checkpoint(state, path)


def test_evaluate_reports_caption_health_and_warns_when_images_share_a_caption(
    checkpoint, demo_root, tmp_path
):
    from captioning.caption import caption_images
    from captioning.evaluation import evaluate

    options = dict(data_dir=demo_root, num_workers=0, progress=False, use_java=False)
    varied = with_decoder_weights(checkpoint, tmp_path / "varied.pt")
    images = sorted((demo_root / "val2017").iterdir())  # those evaluate captions below
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = evaluate.evaluate(varied, "val", output_dir=tmp_path / "out", **options)
        caption_images(varied, images)
    assert not [w for w in caught if "same caption" in str(w.message)]
    # Novel captions: those not among the training split's captions, tokenised alike.
    training = [" ".join(tokens) for tokens in read_split(demo_root, "train").tokenized()]
    assert result["health"] == measure_health(result["predictions"], training)
    assert 0 < result["health"]["novel_captions"] <= 1  # random weights: new captions
    assert result["health"]["top_caption_share"] < SAME_CAPTION_SHARE
    assert json.loads((tmp_path / "out" / "health_val.json").read_text()) == result["health"]
    same = with_decoder_weights(checkpoint, tmp_path / "same.pt", same_features=True)
    with pytest.warns(UserWarning, match="100% of the images got the same caption") as caught:
        result = evaluate.evaluate(same, "val", **options)
    assert "image_size=32, resize='crop', backbone='smallcnn', pretrained=False" in str(
        caught[-1].message
    )
    assert result["health"]["distinct_captions"] == 1 / len(result["predictions"])
    # caption.py warns alike, for two images or more: one image always shares its caption.
    with pytest.warns(UserWarning, match="100% of the images got the same caption"):
        caption_images(same, images)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        caption_images(same, images[:1])


def test_novel_captions_need_the_checkpoints_training_captions(checkpoint, demo_root, tmp_path):
    from captioning.evaluation import evaluate

    state = load_checkpoint(checkpoint)
    state["config"]["data_dir"] = str(tmp_path / "moved")
    moved = save_checkpoint(state, tmp_path / "moved.pt")
    with pytest.warns(UserWarning, match="novel captions not measured: no training captions"):
        result = evaluate.evaluate(moved, "val", data_dir=demo_root, num_workers=0,
                                   progress=False, use_java=False, limit=3)  # fmt: skip
    assert "novel_captions" not in result["health"]


def test_decoding_option_flags_reach_the_decoder(checkpoint, demo_root, monkeypatch, capsys):
    from captioning import caption, decoding
    from captioning.evaluation import evaluate

    for function in (evaluate.evaluate, evaluate.predict_captions, caption.caption_images,
                     caption.attention_maps):  # fmt: skip
        assert inspect.signature(function).parameters["options"].default is None
    seen, decode = [], decoding.decode_captions

    def recording_decode(*args, **kwargs):
        seen.append(args[6] if len(args) > 6 else kwargs["options"])
        return decode(*args, **kwargs)

    monkeypatch.setattr(decoding, "decode_captions", recording_decode)
    image = str(sorted((demo_root / "val2017").iterdir())[0])
    caption.main([str(checkpoint), image, "--no-bad-endings", "--no-repeat-words"])
    caption.main([str(checkpoint), image, "--beam", "2", "--block-trigrams"])
    caption.main([str(checkpoint), image])
    for flags in FLAGS:
        caption.main([str(checkpoint), image, *flags])
    assert seen == [
        DecodingOptions(no_bad_endings=True, no_repeat_words=True),
        DecodingOptions(block_trigrams=True),
        DecodingOptions(),
        *FLAGS.values(),
    ]
    runs, health = [], measure_health({1: "a red square", 2: "a red square on"})

    def recording_evaluate(*args, **kwargs):
        runs.append((args, kwargs))
        return {"metrics": {}, "health": health}

    monkeypatch.setattr(evaluate, "evaluate", recording_evaluate)
    evaluate.main([str(checkpoint), "--block-trigrams", "--no-bad-endings"])
    evaluate.main([str(checkpoint)])
    for flags in FLAGS:
        evaluate.main([str(checkpoint), *flags])
    assert [k["options"] for _, k in runs] == [
        DecodingOptions(no_bad_endings=True, block_trigrams=True),
        DecodingOptions(),
        *FLAGS.values(),
    ]
    assert [a[4] for a, _ in runs] == [1, 1, 1, 4, 1, 1]  # the beam size, with --groups 2
    evaluate.main([str(checkpoint), "--max-len", "7"])
    assert runs[-1][0][5] == 7 and runs[0][0][5] is None  # None: the checkpoint's
    assert "bad endings 50.0%, repeats 0.0%, distinct captions 100.0%" in capsys.readouterr().out
    # evaluate.evaluate passes its options on to the decoder.
    monkeypatch.undo()
    monkeypatch.setattr(evaluate, "decode_captions", recording_decode)
    seen.clear()
    rule = DecodingOptions(no_repeat_words=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # this barely trained model's captions are no matter here
        evaluate.evaluate(checkpoint, "val", data_dir=demo_root, num_workers=0, progress=False,
                          use_java=False, limit=4, options=rule)  # fmt: skip
    assert seen == [rule]


# Each new decoding flag (caption.py and evaluate.py alike) and the options it asks for.
FLAGS = {
    ("--sample", "3", "--temperature", "0.7", "--top-k", "5", "--top-p", "0.9"): DecodingOptions(
        samples=3, temperature=0.7, top_k=5, top_p=0.9
    ),
    ("--beam", "4", "--groups", "2", "--diversity", "0.3"): DecodingOptions(
        groups=2, diversity=0.3
    ),
    ("--allow-unk",): DecodingOptions(allow_unk=True),
    ("--sample", "1"): DecodingOptions(samples=1),
}


def test_caption_command_prints_and_saves_every_caption_of_an_image(
    checkpoint, demo_root, tmp_path, capsys
):
    from captioning import caption

    varied = with_decoder_weights(checkpoint, tmp_path / "varied.pt")
    images = [str(p) for p in sorted((demo_root / "val2017").iterdir())[:2]]
    out = tmp_path / "captions.json"
    torch.manual_seed(0)
    captions = caption.main([str(varied), *images, "--sample", "3", "--json", str(out),
                             "--draw", str(tmp_path / "drawn")])  # fmt: skip
    printed = capsys.readouterr().out
    assert json.loads(out.read_text()) == captions and list(captions) == images
    for image in images:
        assert len(captions[image]) == 3
        assert all(f"{image} ({k}): {captions[image][k - 1]}" in printed for k in (1, 2, 3))
    assert len({c for texts in captions.values() for c in texts}) > 2  # samples, not copies
    assert sorted(p.name for p in (tmp_path / "drawn").iterdir()) == sorted(
        f"{Path(p).stem}.png" for p in images
    )
    # Diverse beam search: one caption per group, the first plain beam search with 4 / 2 beams.
    diverse = caption.main([str(varied), *images, "--beam", "4", "--groups", "2"])
    plain = caption.main([str(varied), *images, "--beam", "2"])
    assert all(len(diverse[i]) == 2 and diverse[i][0] == plain[i] for i in images)
    with pytest.raises(SystemExit):
        caption.main([str(varied), *images, "--sample", "2", "--draw", "d", "--attention"])
    assert "not with --sample or --groups" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a person gets the one line
        caption.main([str(varied), *images, "--diversity", "0.3"])
    assert "--diversity L goes with --groups G" in capsys.readouterr().err


def test_evaluate_scores_the_first_caption_of_each_image_and_saves_them_all(
    checkpoint, demo_root, tmp_path
):
    from captioning.evaluation import evaluate

    varied = with_decoder_weights(checkpoint, tmp_path / "varied.pt")
    options = dict(data_dir=demo_root, num_workers=0, progress=False, use_java=False, limit=6)
    torch.manual_seed(0)
    result = evaluate.evaluate(varied, "val", output_dir=tmp_path, max_len=5,
                               options=DecodingOptions(samples=3), **options)  # fmt: skip
    every = result["all_captions"]
    assert list(every) == list(result["predictions"]) and len(every) == 6
    assert all(len(texts) == 3 for texts in every.values())
    assert result["predictions"] == {i: texts[0] for i, texts in every.items()}
    # max_len 5: <start> and four more tokens, <end> or not.
    assert max(len(c.split()) for texts in every.values() for c in texts) <= 4
    saved = json.loads((tmp_path / "captions_val_sample3.json").read_text())
    assert saved == {str(i): texts for i, texts in every.items()}
    results = json.loads((tmp_path / "results_val_sample3.json").read_text())
    assert {r["image_id"]: r["caption"] for r in results} == result["predictions"]
    diverse = evaluate.evaluate(varied, "val", beam_size=4, output_dir=tmp_path,
                                options=DecodingOptions(groups=2), **options)  # fmt: skip
    beam = evaluate.evaluate(varied, "val", beam_size=2, **options)
    assert diverse["predictions"] == beam["predictions"]  # group 0: beam search, 2 beams
    assert (tmp_path / "captions_val_beam4_groups2.json").exists()


def test_a_bad_file_among_many_is_named_and_the_others_are_captioned(
    checkpoint, demo_root, tmp_path, capsys
):
    import shutil

    from captioning import caption

    folder = tmp_path / "photos"
    folder.mkdir()
    for path in read_split(demo_root, "test").image_paths[:2]:
        shutil.copy(path, folder)
    (folder / "broken.png").write_bytes(b"not a picture")
    with pytest.raises(SystemExit) as stopped:
        caption.main([str(checkpoint), str(folder), "--json", str(tmp_path / "captions.json")])
    assert stopped.value.code == 1  # a script sees that not every image was captioned
    out, err = capsys.readouterr()
    written = json.loads((tmp_path / "captions.json").read_text())
    assert len(written) == 2 and all(f"{path}: {text}" in out for path, text in written.items())
    assert "not captioned: " in err and "broken.png: cannot read image" in err
    assert "1 of 3 images could not be read" in err and "the other 2 are captioned" in err
