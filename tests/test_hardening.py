"""Hardening: untrusted files, bad images and annotations, mismatched checkpoints, kill -9, determinism."""

import contextlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from captioning import plots
from captioning.checkpoint import (
    CheckpointError,
    build_model,
    load_checkpoint,
    load_model_state,
    load_trained,
)
from captioning.data.annotations import AnnotationError, read_split
from captioning.data.loading import ImageLoadError, load_image
from captioning.data.vocabulary import Vocabulary
from captioning.training.train import train
from tests.helpers import ROOT, tiny_config


class PlantsMarker:
    """Unpickling this runs code: it creates a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant_pickle(path, marker):
    path.write_bytes(pickle.dumps({"config": {}, "model": PlantsMarker(marker)}))


def test_pickled_checkpoint_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    plant_pickle(tmp_path / "evil.pt", marker)
    with pytest.raises(CheckpointError, match=r"evil\.pt: not a usable checkpoint.*weights_only"):
        load_checkpoint(tmp_path / "evil.pt")
    with pytest.raises(CheckpointError):
        load_trained(tmp_path / "evil.pt")
    assert not marker.exists()


def test_pickled_resume_checkpoint_is_refused(demo_root, tmp_path):
    marker = tmp_path / "pwned"
    plant_pickle(tmp_path / "last.pt", marker)
    with pytest.raises(CheckpointError, match="last.pt"):
        train(tiny_config(demo_root, tmp_path, resume=True))
    assert not marker.exists()


def test_pickled_vocabulary_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / "vocab.json").write_bytes(pickle.dumps(PlantsMarker(marker)))
    with pytest.raises(ValueError, match="vocab.json: not a JSON vocabulary"):
        Vocabulary(vocab_file=str(tmp_path / "vocab.json"), vocab_from_file=True)
    assert not marker.exists()


def make_images(folder):
    """One file per kind of awkward input; returns {kind: path}."""
    folder.mkdir(parents=True, exist_ok=True)
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), np.uint8))
    paths = {
        k: folder / f"{k}.{ext}"
        for k, ext in [
            ("zero_byte", "jpg"),
            ("truncated", "jpg"),
            ("not_image", "jpg"),
            ("grayscale", "jpg"),
            ("cmyk", "jpg"),
            ("rgba", "png"),
            ("png16", "png"),
            ("bomb", "png"),
            ("palette", "png"),
        ]
    }
    paths["zero_byte"].write_bytes(b"")
    rgb.save(folder / "full.jpg", quality=95)
    data = (folder / "full.jpg").read_bytes()
    paths["truncated"].write_bytes(data[: len(data) // 2])
    paths["not_image"].write_text("this is a caption, not a picture")
    rgb.convert("L").save(paths["grayscale"])
    rgb.convert("CMYK").save(paths["cmyk"])
    rgb.convert("RGBA").save(paths["rgba"])
    Image.fromarray((np.arange(40 * 50).reshape(40, 50) * 30).astype(np.uint16)).save(
        paths["png16"]
    )
    Image.new("1", (20000, 20000)).save(paths["bomb"])  # tiny file, 400 megapixels
    rgb.convert("P").save(paths["palette"])
    return paths


def test_every_kind_of_image_is_rgb_or_a_named_error(tmp_path):
    paths = make_images(tmp_path)
    for kind in ("grayscale", "cmyk", "rgba", "png16", "palette"):
        image = load_image(paths[kind])
        assert image.mode == "RGB" and image.size == (50, 40), kind
    sixteen = np.asarray(load_image(paths["png16"]))[..., 0]
    assert sixteen.min() < 10 and sixteen.max() > 200  # scaled to 8 bits, not clipped white
    for kind in ("zero_byte", "truncated", "not_image", "bomb"):
        with pytest.raises(ImageLoadError, match=rf"{kind}\.(jpg|png): cannot read image"):
            load_image(paths[kind])
    with pytest.raises(
        ImageLoadError, match=r"missing\.jpg: image file not found \(named by ann\.json"
    ):
        load_image(tmp_path / "missing.jpg", "ann.json")


def broken_copy(demo_root, tmp_path, damage):
    """A copy of the demo dataset whose first train image is damaged by `damage(path)`."""
    root = tmp_path / "data"
    shutil.copytree(demo_root, root)
    first = Path(read_split(root, "train").image_paths[0])
    damage(first)
    return root, first


def test_training_stops_naming_a_bad_image_or_skips_it(demo_root, tmp_path):
    root, bad = broken_copy(demo_root, tmp_path, lambda p: p.write_bytes(b""))
    with pytest.raises(ImageLoadError, match=rf"{bad.name}: cannot read image .*images row 0"):
        train(tiny_config(root, tmp_path / "run", epochs=1))
    history = train(tiny_config(root, tmp_path / "skip", epochs=1, skip_bad_images=True))
    assert history["skipped_images"] == {"train": 1, "val": 0}
    assert np.isfinite(history["train_loss"]).all()


def test_absent_image_named_with_annotation_row(demo_root, tmp_path):
    root, bad = broken_copy(demo_root, tmp_path, lambda p: p.unlink())
    with pytest.raises(
        ImageLoadError,
        match=rf"{bad.name}: image file not found \(named by "
        r".*captions_train2017.json, images row 0\)",
    ):
        train(tiny_config(root, tmp_path / "run", epochs=1))


def write_annotations(root, images, annotations):
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "train2017").mkdir(exist_ok=True)
    path = root / "annotations" / "captions_train2017.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations}), encoding="utf-8")
    return path


@pytest.mark.parametrize("caption", ["", "   ", None, 7])
def test_empty_or_non_text_caption_names_file_and_row(tmp_path, caption):
    write_annotations(
        tmp_path,
        [{"id": 1, "file_name": "a.jpg"}],
        [{"image_id": 1, "caption": "fine"}, {"image_id": 1, "caption": caption}],
    )
    with pytest.raises(AnnotationError, match=r"captions_train2017.json, row 1: caption is empty"):
        read_split(tmp_path, "train")


def test_missing_image_keys_and_unknown_image_id(tmp_path):
    write_annotations(tmp_path, [{"id": 1}], [])
    with pytest.raises(AnnotationError, match=r"images row 0: missing key\(s\) \['file_name'\]"):
        read_split(tmp_path, "train")
    write_annotations(
        tmp_path, [{"id": 1, "file_name": "a.jpg"}], [{"image_id": 2, "caption": "x"}]
    )
    with pytest.raises(AnnotationError, match="annotations row 0: image_id 2 is not in the images"):
        read_split(tmp_path, "train")


def test_non_ascii_and_very_long_captions_train(tmp_path):
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "a.png")
    long_caption = " ".join(["a very long caption"] * 150)
    images = [{"id": 1, "file_name": "a.png"}]
    captions = [
        {"image_id": 1, "caption": c}
        for c in (
            "un café rouge près de la fenêtre",
            "一只红色的猫",
            "naïve façade — “quoted”",
            long_caption,
        )
    ]
    write_annotations(tmp_path, images, captions)
    os.replace(tmp_path / "a.png", tmp_path / "train2017" / "a.png")
    split = read_split(tmp_path, "train")
    tokens = split.tokenized()
    assert tokens[0][:2] == ["un", "café"] and len(tokens[3]) == 600
    vocab = Vocabulary(1, None, captions=tokens)
    assert vocab.decode(vocab.encode(tokens[0])) == "un café rouge près de la fenêtre"


def test_checkpoint_with_other_vocabulary_names_both_sides(demo_root, tmp_path):
    train(tiny_config(demo_root, tmp_path, epochs=1))
    state = load_checkpoint(tmp_path / "best.pt")
    _, vocab, config = load_trained(tmp_path / "best.pt")
    bigger = Vocabulary.from_dict(
        {**vocab.to_dict(), "words": vocab.to_dict()["words"] + ["extra"]}
    )
    model = build_model(config, bigger)
    with pytest.raises(
        CheckpointError,
        match=rf"best\.pt: checkpoint does not fit .*"
        rf"decoder\.embed\.weight: checkpoint \({len(vocab)}, 32\) "
        rf"vs model \({len(vocab) + 1}, 32\)",
    ):
        load_model_state(model, state["model"], tmp_path / "best.pt", f"{len(bigger)} words")


KILLER = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {root!r})
    from captioning import checkpoint, plots
    from captioning.training import train as t
    from tests.helpers import tiny_config
    where, out, data = sys.argv[1], sys.argv[2], sys.argv[3]
    plots.plot_learning_curves = lambda *a, **k: None  # seconds of drawing, no matter here
    if where == "write":
        real_save, saves = checkpoint.torch.save, []
        def dying_save(obj, f, *a, **k):
            saves.append(1)
            if len(saves) == 3:  # epoch 2's last.pt: write half, then die
                with open(f, "wb") as half:
                    half.write(b"half a checkpoint")
                os.kill(os.getpid(), signal.SIGKILL)
            return real_save(obj, f, *a, **k)
        checkpoint.torch.save = dying_save
    else:
        real_epoch, real_loss, passes, steps = t.run_epoch, t.caption_loss, [], []
        def counting_epoch(*a, **k):
            passes.append(len(a) > 5)  # training passes get the optimizer positionally
            return real_epoch(*a, **k)
        def dying_loss(*a, **k):
            if sum(passes) == 2 and passes[-1]:
                steps.append(1)
                if len(steps) == 2:  # two steps into epoch 2 (of 4: 60 images, 16 a batch)
                    os.kill(os.getpid(), signal.SIGKILL)
            return real_loss(*a, **k)
        t.run_epoch, t.caption_loss = counting_epoch, dying_loss
    t.train(tiny_config(data, out, epochs=3))
""")


@contextlib.contextmanager
def one_thread():
    """Torch computes on one thread meanwhile, as the killed processes do."""
    # The losses are the same bit for bit only at the same thread count.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def kill_9_runs(demo_root, tmp_path_factory):
    """{where: (return code, stderr, output folder)} of the killed runs; the full run's history."""
    # The three run side by side, on one thread each: each process spends seconds importing
    # torch, and the cores can take them together.
    folder = tmp_path_factory.mktemp("kill_9")
    script = folder / "killer.py"
    script.write_text(KILLER.format(root=str(ROOT)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    processes = {}
    try:
        for where in ("epoch", "write"):
            # stderr to a file: a full pipe nobody reads yet would stop the process.
            with open(folder / f"{where}.stderr", "w") as stderr:
                command = [sys.executable, str(script), where, str(folder / where), str(demo_root)]
                processes[where] = subprocess.Popen(
                    command, stdout=subprocess.DEVNULL, stderr=stderr, cwd=ROOT, env=env
                )
        with pytest.MonkeyPatch.context() as patch, one_thread():
            patch.setattr(plots, "plot_learning_curves", lambda *a, **k: None)  # no matter here
            full = train(tiny_config(demo_root, folder / "full", epochs=3))
        runs = {
            where: (
                process.wait(timeout=300),
                (folder / f"{where}.stderr").read_text(),
                folder / where,
            )
            for where, process in processes.items()
        }
    finally:
        for process in processes.values():
            process.kill()  # a no-op for one that has ended
    return runs, full


@pytest.mark.parametrize("where", ["epoch", "write"])
def test_kill_9_then_resume_from_last_complete_checkpoint(
    kill_9_runs, demo_root, monkeypatch, where
):
    runs, full = kill_9_runs
    monkeypatch.setattr(plots, "plot_learning_curves", lambda *a, **k: None)  # no matter here
    returncode, stderr, out = runs[where]
    assert returncode == -9, stderr[-2000:]
    assert load_checkpoint(out / "last.pt")["epoch"] == 0  # epoch 1's checkpoint, intact
    if where == "write":
        assert list(out.glob(".last.tmp-*"))  # the half-written file never replaced last.pt
    with one_thread():
        resumed = train(tiny_config(demo_root, out, epochs=3, resume=True))
    assert resumed["epoch"] == [1, 2, 3]
    assert not list(out.glob(".*tmp*"))
    assert resumed["step_loss"] == full["step_loss"]


def test_same_seed_same_loss_history(demo_root, tmp_path):
    a = train(tiny_config(demo_root, tmp_path / "a", epochs=1, dropout=0.3))
    b = train(tiny_config(demo_root, tmp_path / "b", epochs=1, dropout=0.3))
    c = train(tiny_config(demo_root, tmp_path / "c", epochs=1, dropout=0.3, seed=4))
    assert a["step_loss"] == b["step_loss"] and a["val_loss"] == b["val_loss"]
    assert a["step_loss"] != c["step_loss"]
