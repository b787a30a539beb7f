"""Helpers shared by the test modules: where the data is, a tiny training configuration, and
runs that interrupt training or spread scenarios over two processes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from bench import real_data
from captioning.config import TrainConfig
from captioning.training import train as train_module

ROOT = Path(__file__).resolve().parents[1]
# The real COCO material ($CAPTIONING_TEST_DATA, else ../shared/data): bench/real_data.py.
COCO_SAMPLE = real_data.coco_sample()
COCO_VAL_CAPTIONS = real_data.val_captions()


def tiny_config(demo_root, out, **changes):
    """A `TrainConfig` that trains a small CNN and LSTM on the test demo data in seconds."""
    base = dict(
        data_dir=str(demo_root), output_dir=str(out), vocab_threshold=1, backbone="smallcnn",
        pretrained=False, trainable_blocks=-1, image_size=32, embed_size=32, hidden_size=48,
        batch_size=16, epochs=3, val_images=10, patience=None, num_workers=0, progress=False,
        seed=3, dropout=0.3,
    )  # fmt: skip
    return TrainConfig(**{**base, **changes})


def interrupt_training_at_epoch(monkeypatch, epoch):
    """Make the `epoch`-th training pass raise, as a kill between epochs would end the run."""
    real, calls = train_module.run_epoch, []

    def run_epoch(*args, **kwargs):
        if kwargs.get("optimizer") is not None or len(args) > 5:
            calls.append(1)
            if len(calls) == epoch:
                raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "run_epoch", run_epoch)


def run_two_processes(plan, out_dir, timeout=600):
    """Run the scenarios of `plan` in one launch of two gloo processes (torchrun,
    tests/two_process_worker.py writing into `out_dir`); the finished process."""
    plan_path = Path(out_dir, "plan.json")
    plan_path.write_text(json.dumps(plan))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(ROOT / "tests" / "two_process_worker.py"), str(plan_path),
               str(out_dir)]  # fmt: skip
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def train_cut_and_resumed(demo_root, tmp_path, monkeypatch, **changes):
    """(history of an uninterrupted run, history of the same run cut during epoch 2 and resumed),
    trained under tmp_path/full and tmp_path/cut."""
    import pytest

    full = train_module.train(tiny_config(demo_root, tmp_path / "full", **changes))
    with monkeypatch.context() as m:
        interrupt_training_at_epoch(m, 2)
        with pytest.raises(KeyboardInterrupt):
            train_module.train(tiny_config(demo_root, tmp_path / "cut", **changes))
    return full, train_module.train(
        tiny_config(demo_root, tmp_path / "cut", resume=True, **changes)
    )


def greedy_alone(decoder, grid, max_len):
    """Greedy ids (a list, `<start>` first) and each word's weights (words, positions) for one
    image's grid (1, positions, features), one protocol step at a time."""
    state, ids, weights = decoder.init_state(grid), [decoder.start_id], []
    while len(ids) < max_len and ids[-1] != decoder.end_id:
        scores, state, alpha = decoder.step(torch.tensor(ids[-1:]), state)
        ids.append(int(scores.argmax(dim=1)))
        weights.append(alpha[0])
    return ids, torch.stack(weights) if weights else grid.new_zeros(0, grid.size(1))


def right_and_wrong_captions(annotations_file):
    """({image id: a caption naming its objects}, {image id: the next image's such caption}):
    fluent captions with the right objects, and the same captions with the wrong ones."""
    images = json.loads(Path(annotations_file).read_text())["images"]
    right = {im["id"]: " and ".join(f"a {o['color']} {o['shape']}" for o in im["objects"])
             for im in images}  # fmt: skip
    ids = list(right)
    return right, {i: right[ids[(k + 1) % len(ids)]] for k, i in enumerate(ids)}


def make_feature_folder(folder, data_root, kind, size=24, seed=0):
    """A folder of random precomputed features for every image of the dataset at `data_root`:
    .npy pooled vectors, or .npz files of 3 to 9 regions (`kind`); returns it."""
    import numpy as np

    from captioning.data.annotations import read_split

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split in ("train", "val", "test"):
        for image_id in read_split(data_root, split).image_ids:
            if kind == "npy":
                np.save(folder / f"{image_id}.npy", rng.random(size, dtype=np.float32))
            else:
                regions = rng.random((int(rng.integers(3, 10)), size)).astype(np.float16)
                np.savez_compressed(folder / f"{image_id}.npz", feat=regions)
    return folder
