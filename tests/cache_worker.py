"""The cache scenarios of tests/two_process_worker.py: two processes build the feature and image
caches together under a process-group timeout shorter than one process's whole build, agree
that a cache one of them finds cut short is missing, or meet failures that must stop both ranks
with one message.
"""

import errno
import io
import json
import os
import time
from collections import namedtuple

import torch

from captioning.data import feature_cache
from captioning.data.annotations import read_split
from captioning.data.feature_cache import cached_features, cached_images
from captioning.data.loading import make_transform
from captioning.demo.small_cnn import SmallCNN
from model import EncoderCNN


def slow_encoder(delay, computed):
    """The demo CNN, `delay` seconds a batch (a batch of a big CNN); batch sizes go to `computed`."""
    torch.manual_seed(0)
    encoder = EncoderCNN(32, SmallCNN(), trainable_blocks=0)
    compute = encoder.backbone_features

    def slow_features(images):
        time.sleep(float(delay))
        computed.append(len(images))
        return compute(images)

    encoder.backbone_features = slow_features
    return encoder


def build_caches(scenario, out, rank, patch):
    """Build both caches of the demo training split into out/caches, each batch taking
    scenario["delay"] seconds; write rank<r>.json: {"batches": sizes computed, "seconds": the
    build's}."""
    split, computed, started = read_split(scenario["demo_root"], "train"), [], time.monotonic()
    options = dict(cache_dir=out / "caches", batch_size=8, progress=False, rank=rank, world=2)
    cached_features(slow_encoder(scenario["delay"], computed), split, make_transform(32), **options)
    cached_images(split, 32, **options)
    seconds = time.monotonic() - started
    (out / f"rank{rank}.json").write_text(json.dumps({"batches": computed, "seconds": seconds}))


def reopen_cut_short(scenario, out, rank, patch):
    """Build the feature cache of the demo training split into out/caches, then open it again
    while rank 1 finds it a byte short (a stale copy on its machine); write rank<r>.json:
    {"built": batch sizes computed building it, "rebuilt": opening it again}."""
    split, built, rebuilt = read_split(scenario["demo_root"], "train"), [], []
    options = dict(cache_dir=out / "caches", batch_size=8, progress=False, rank=rank, world=2)
    cached_features(slow_encoder(0, built), split, make_transform(32), **options)
    if rank == 1:
        real_size = os.path.getsize
        short = lambda path: real_size(path) - str(path).endswith(".npy")  # noqa: E731
        patch.setattr(feature_cache.os.path, "getsize", short)
    cached_features(slow_encoder(0, rebuilt), split, make_transform(32), **options)
    (out / f"rank{rank}.json").write_text(json.dumps({"built": built, "rebuilt": rebuilt}))


class FullDisk(io.FileIO):
    """A file whose writes fail as on a full disk."""

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def cache_failures(scenario, out, rank, patch):
    """Meet three failures in out/caches, each on one rank (`patch` undoes the changes); write
    rank<r>_failures.json: {failure: [error message or None, seconds it took to raise]}."""
    split, cache_dir = read_split(scenario["demo_root"], "train"), out / "caches"
    delay = scenario["delay"]
    results = {}

    def attempt(name, folder, encoder=None):
        started = time.monotonic()
        options = dict(cache_dir=folder, batch_size=4, progress=False, rank=rank, world=2)
        try:
            if encoder is None:
                cached_images(split, 32, **options)
            else:
                cached_features(encoder, split, make_transform(32), **options)
            message = None
        except Exception as e:
            message = f"{type(e).__name__}: {e}"
        results[name] = [message, time.monotonic() - started]

    # 1. Rank 1's disk is full, while rank 0 computes slowly: rank 0 stops early, both raise.
    if rank == 1:
        full_disk = lambda path, mode, buffering=-1: FullDisk(path, mode.strip("b"))  # noqa: E731
        patch.setattr(feature_cache, "open", full_disk, raising=False)
    attempt("write", cache_dir / "write", slow_encoder(delay if rank == 0 else 0, []))
    patch.delattr(feature_cache, "open", raising=False)  # the built-in again
    # 2. The ranks do not share the cache folder (two machines, each its own disk).
    patch.setattr(feature_cache, "SHARED_FILE_WAIT", 1.0)
    attempt("unshared", cache_dir / "unshared" / f"rank{rank}")
    # 3. Rank 1's disk has 1000 bytes free.
    if rank == 1:
        usage = namedtuple("usage", "total used free")
        free = lambda folder: usage(10**6, 10**6 - 1000, 1000)  # noqa: E731
        patch.setattr(feature_cache.shutil, "disk_usage", free)
    attempt("space", cache_dir / "space")
    (out / f"rank{rank}_failures.json").write_text(json.dumps(results))
