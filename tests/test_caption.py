"""The caption command: own image files and folders, greedy and beam, JSON and drawn output."""

import inspect
import json
import os
import runpy
import sys
import warnings

import pytest
import torch

from captioning.checkpoint import load_checkpoint, load_trained, save_checkpoint
from captioning.config import TrainConfig
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
    from captioning.evaluation import evaluate

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
    assert seen == [0.7, -0.5, 0.0]
    options = dict(data_dir=demo_root, beam_size=2, limit=2, num_workers=0, use_java=False)
    for penalty, expected in ((None, -0.5), (1.5, 1.5)):
        seen.clear()
        evaluate.evaluate(shorter, "val", length_penalty=penalty, progress=False, **options)
        assert seen == [expected]
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
    from captioning.evaluation import evaluate

    options = dict(data_dir=demo_root, num_workers=0, progress=False, use_java=False)
    varied = with_decoder_weights(checkpoint, tmp_path / "varied.pt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = evaluate.evaluate(varied, "val", **options)
    assert not [w for w in caught if "same caption" in str(w.message)]
    assert result["health"] == measure_health(result["predictions"])
    assert result["health"]["top_caption_share"] < SAME_CAPTION_SHARE
    same = with_decoder_weights(checkpoint, tmp_path / "same.pt", same_features=True)
    with pytest.warns(UserWarning, match="100% of the images got the same caption") as caught:
        result = evaluate.evaluate(same, "val", **options)
    assert "image_size=32, resize='crop', backbone='smallcnn', pretrained=False" in str(
        caught[-1].message
    )
    assert result["health"]["distinct_captions"] == 1 / len(result["predictions"])


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
    assert seen == [
        DecodingOptions(no_bad_endings=True, no_repeat_words=True),
        DecodingOptions(block_trigrams=True),
        DecodingOptions(),
    ]
    runs, health = [], measure_health({1: "a red square", 2: "a red square on"})
    monkeypatch.setattr(
        evaluate, "evaluate", lambda *a, **k: runs.append(k) or {"metrics": {}, "health": health}
    )
    evaluate.main([str(checkpoint), "--block-trigrams", "--no-bad-endings"])
    evaluate.main([str(checkpoint)])
    assert [k["options"] for k in runs] == [
        DecodingOptions(no_bad_endings=True, block_trigrams=True),
        DecodingOptions(),
    ]
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
