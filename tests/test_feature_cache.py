"""Caches built by every process: each computes its own share, and the file is the one-process one;
a build that fails or is killed leaves nothing that passes for a cache. The two-process builds are
in test_two_processes."""

import io
import os
import subprocess
import sys
from collections import namedtuple

import numpy as np
import pytest
import torch

from captioning.data import feature_cache
from captioning.data.annotations import read_split
from captioning.data.feature_cache import (
    CacheSpaceError,
    build_cache,
    cached_features,
    cached_images,
    npy_header,
    open_cache,
)
from captioning.data.loading import load_image, make_transform
from captioning.demo.small_cnn import SmallCNN
from model import EncoderCNN
from tests.helpers import ROOT


def rows_of(batches):
    """A `batches_between` over a list of row tensors."""
    return lambda first, last: iter(batches[first:last])


@pytest.mark.parametrize("dtype", [np.float16, np.uint8])
def test_build_writes_what_np_save_writes(tmp_path, dtype):
    rows = (np.random.default_rng(0).random((11, 3, 5)) * 200).astype(dtype)
    batches = [torch.from_numpy(rows[k : k + 4]) for k in range(0, 11, 4)]
    built = build_cache(tmp_path / "c.npy", rows.shape, dtype, rows_of(batches), 4, "", False)
    expected = io.BytesIO()
    np.save(expected, rows)
    assert (tmp_path / "c.npy").read_bytes() == expected.getvalue()
    assert expected.getvalue().startswith(npy_header(rows.shape, dtype))
    assert np.array_equal(built, rows) and built.dtype == dtype
    assert os.listdir(tmp_path) == ["c.npy"]


def test_feature_cache_holds_the_cnn_features_cast_to_float16(demo_root, tmp_path):
    # The cast happens on the device now; the bits are those numpy's cast gave.
    split = read_split(demo_root, "val")
    torch.manual_seed(0)
    encoder = EncoderCNN(8, SmallCNN(), trainable_blocks=0)
    transform = make_transform(32)
    cached = cached_features(encoder, split, transform, cache_dir=tmp_path, batch_size=6,
                             progress=False)  # fmt: skip
    images = torch.stack([transform(load_image(p)) for p in split.image_paths])
    expected = []
    with torch.no_grad():
        for k in range(0, len(images), 6):  # the batches of the build (the same kernels)
            expected.append(encoder.eval().backbone_features(images[k : k + 6]).numpy())
    expected = np.concatenate(expected).astype(np.float16)
    assert cached.dtype == np.float16 and cached.tobytes() == expected.tobytes()


def test_writes_lag_one_batch_behind_the_computation(tmp_path, monkeypatch):
    # Batch k - 1 is written after batch k is asked for: on a GPU, it computes meanwhile.
    events, real_write = [], feature_cache._write_at

    def batches(first, last):
        for k in range(first, last):
            events.append(f"compute {k}")
            yield torch.full((2, 3), k, dtype=torch.uint8)

    def write_at(f, offset, staged, share):
        events.append(f"write {int(staged[0][0, 0])}")
        return real_write(f, offset, staged, share)

    monkeypatch.setattr(feature_cache, "_write_at", write_at)
    build_cache(tmp_path / "c.npy", (6, 3), np.uint8, batches, 2, "", False)
    assert events == ["compute 0", "compute 1", "write 0", "compute 2", "write 1", "write 2"]


def test_asynchronous_copies_rotate_two_buffers_without_overwriting_a_pending_batch(
    tmp_path, monkeypatch
):
    # The CUDA path on the CPU: copies into two reused "pinned" buffers, each written only after
    # its event; a buffer reused too early would leave another batch's rows in the file.
    waited = []

    class Event:
        def synchronize(self):
            waited.append(1)

    made = []

    def pinned(shape, dtype):
        made.append(tuple(shape))
        return torch.empty(shape, dtype=dtype)

    monkeypatch.setattr(feature_cache, "_asynchronous", lambda rows: True)
    monkeypatch.setattr(feature_cache, "_pinned", pinned)
    monkeypatch.setattr(feature_cache, "_recorded_event", Event)
    rows = np.arange(7 * 3, dtype=np.uint8).reshape(7, 3)
    batches = [torch.from_numpy(rows[k : k + 2].copy()) for k in range(0, 7, 2)]
    built = build_cache(tmp_path / "c.npy", rows.shape, np.uint8, rows_of(batches), 2, "", False)
    assert np.array_equal(built, rows)
    assert made == [(2, 3), (2, 3)] and len(waited) == 4  # two buffers, one wait per batch


def test_each_share_is_written_through_a_write_only_file(tmp_path, monkeypatch):
    # Opened for reading too, an NFS client may read a partly written page and write all of it
    # back, over a neighbouring rank's rows.
    flags, real_open = [], os.open
    monkeypatch.setattr(
        os, "open", lambda path, flag, *a: flags.append(flag) or real_open(path, flag, *a)
    )
    rows = torch.arange(30, dtype=torch.uint8).view(10, 3)
    build_cache(tmp_path / "c.npy", (10, 3), np.uint8, rows_of(list(rows.split(4))), 4, "", False)
    assert flags and all(flag & os.O_ACCMODE == os.O_WRONLY for flag in flags)
    assert np.array_equal(np.load(tmp_path / "c.npy"), rows.numpy())


@pytest.mark.parametrize("row", [0, 9])
def test_a_share_written_over_by_another_process_is_refused(tmp_path, monkeypatch, row):
    # As an NFS client's page write-back would do to the first or last row of a rank's share.
    real_write = feature_cache._write_share

    def written_over(share, *args):
        real_write(share, *args)
        with open(share.path, "r+b") as f:
            f.seek(share.offset + row * share.row_bytes)
            f.write(b"\xff" * 3)

    monkeypatch.setattr(feature_cache, "_write_share", written_over)
    rows = torch.arange(30, dtype=torch.uint8).view(10, 3)
    with pytest.raises(OSError, match=r"\.tmp-.*were changed after they were written"):
        build_cache(tmp_path / "c.npy", (10, 3), np.uint8, rows_of(list(rows.split(4))), 4, "",
                    False)  # fmt: skip
    assert os.listdir(tmp_path) == []


def test_a_disk_without_room_is_refused_before_the_build(demo_root, tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(feature_cache.shutil, "disk_usage", lambda f: usage(10**9, 10**9, 12345))
    split = read_split(demo_root, "val")
    with pytest.raises(CacheSpaceError) as refused:
        cached_images(split, 32, cache_dir=tmp_path, progress=False)
    needed = len(npy_header((20, 3, 32, 32), np.uint8)) + 20 * 3 * 32 * 32
    message = str(refused.value)
    assert str(tmp_path / "images") in message
    assert f"needs {needed} bytes" in message and "12345 bytes" in message
    assert list((tmp_path / "images").iterdir()) == []


def test_a_build_stopped_midway_leaves_nothing_that_passes_for_a_cache(tmp_path):
    def batches(first, last):
        yield torch.ones(4, 3, dtype=torch.uint8)
        yield torch.ones(4, 3, dtype=torch.uint8)
        raise KeyError("stopped")  # the image loader failed, or the user interrupted

    path = tmp_path / "c.npy"
    with pytest.raises(KeyError, match="stopped"):
        build_cache(path, (12, 3), np.uint8, batches, 4, "", False)
    assert os.listdir(tmp_path) == []  # no cache, no temporary file
    assert open_cache(path, (12, 3)) is None
    full = [torch.full((4, 3), k, dtype=torch.uint8) for k in range(3)]
    assert build_cache(path, (12, 3), np.uint8, rows_of(full), 4, "", False)[-1, 0] == 2


def test_a_build_given_too_few_rows_is_not_used(tmp_path):
    short = [torch.ones(4, 3, dtype=torch.uint8)] * 2  # a loader that ended one batch early
    with pytest.raises(OSError, match="incomplete cache: 8 of 12 rows"):
        build_cache(tmp_path / "c.npy", (12, 3), np.uint8, rows_of(short), 4, "", False)
    assert os.listdir(tmp_path) == []


def test_a_killed_build_leaves_nothing_that_passes_for_a_cache(tmp_path):
    # kill -9 midway: no clean-up runs; the final name must still not exist.
    script = f"""
import os, signal, numpy as np, torch
from captioning.data.feature_cache import build_cache
def batches(first, last):
    for k in range(first, last):
        if k == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        yield torch.full((4, 3), 7, dtype=torch.uint8)
build_cache({str(tmp_path / "c.npy")!r}, (16, 3), np.uint8, batches, 4, "", False)
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=120)
    assert done.returncode == -9, done.stderr
    assert not (tmp_path / "c.npy").exists()
    assert all(p.name.startswith(".c.tmp-") for p in tmp_path.iterdir())  # a temporary, if any
    assert open_cache(tmp_path / "c.npy", (16, 3)) is None


def test_a_truncated_or_mistyped_file_is_not_a_cache(tmp_path):
    path = tmp_path / "c.npy"
    np.save(path, np.zeros((5, 3), np.uint8))
    assert open_cache(path, (5, 3), dtype=np.uint8) is not None
    assert open_cache(path, (5, 3), dtype=np.float16) is None
    data = path.read_bytes()
    path.write_bytes(data[:-2])  # a copy cut short
    assert open_cache(path, (5, 3)) is None
    path.write_bytes(data + b"\0")
    assert open_cache(path, (5, 3)) is None


def test_several_processes_agree_through_the_distributed_module(tmp_path, monkeypatch):
    # Not torch.distributed on a CPU tensor (NCCL serves only CUDA tensors): any_rank.
    asked = []
    monkeypatch.setattr(feature_cache.distributed, "any_rank", lambda f: asked.append(f) or True)
    np.save(tmp_path / "c.npy", np.zeros((5, 3), np.uint8))
    assert open_cache(tmp_path / "c.npy", (5, 3), world=2) is None  # another rank misses it
    assert asked == [False]
