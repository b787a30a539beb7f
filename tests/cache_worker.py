"""Run by torchrun in test_feature_cache: two processes build the feature and image caches together
under a process-group timeout shorter than one process's whole build, or meet failures that
must stop both ranks with one message.

Usage: torchrun ... tests/cache_worker.py build|failures DEMO_ROOT CACHE_DIR TIMEOUT DELAY
"""

import errno
import io
import json
import os
import sys
import time
from collections import namedtuple
from datetime import timedelta
from pathlib import Path

import torch

import distributed
import feature_cache
from annotations import read_split
from data_loader import make_transform
from feature_cache import cached_features, cached_images
from model import EncoderCNN


def slow_encoder(delay, computed):
    """The demo CNN, `delay` seconds a batch (a batch of a big CNN); batch sizes go to `computed`."""
    torch.manual_seed(0)
    encoder = EncoderCNN(32, "smallcnn", pretrained=False, trainable_blocks=0)
    compute = encoder.backbone_features

    def slow_features(images):
        time.sleep(float(delay))
        computed.append(len(images))
        return compute(images)

    encoder.backbone_features = slow_features
    return encoder


def build(split, cache_dir, rank, world, delay):
    """Build both caches of the demo training split; write rank<r>.json (batches computed)."""
    computed = []
    options = dict(cache_dir=cache_dir, batch_size=8, progress=False, rank=rank, world=world)
    cached_features(slow_encoder(delay, computed), split, make_transform(32), **options)
    cached_images(split, 32, **options)
    Path(cache_dir, f"rank{rank}.json").write_text(json.dumps(computed))


class FullDisk(io.FileIO):
    """A file whose writes fail as on a full disk."""

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def failures(split, cache_dir, rank, world, delay):
    """Meet three failures, each on one rank; write rank<r>_failures.json: {failure: [error
    message or None, seconds it took to raise]}."""
    results = {}

    def attempt(name, folder, encoder=None):
        started = time.monotonic()
        options = dict(cache_dir=folder, batch_size=4, progress=False, rank=rank, world=world)
        try:
            if encoder is None:
                cached_images(split, 32, **options)
            else:
                cached_features(encoder, split, make_transform(32), **options)
            message = None
        except Exception as e:
            message = f"{type(e).__name__}: {e}"
        results[name] = [message, time.monotonic() - started]

    real_usage = feature_cache.shutil.disk_usage
    # 1. Rank 1's disk is full, while rank 0 computes slowly: rank 0 stops early, both raise.
    if rank == 1:
        feature_cache.open = lambda path, mode, buffering=-1: FullDisk(path, mode.strip("b"))
    attempt("write", Path(cache_dir, "write"), slow_encoder(delay if rank == 0 else 0, []))
    vars(feature_cache).pop("open", None)  # the built-in again
    # 2. The ranks do not share the cache folder (two machines, each its own disk).
    feature_cache.SHARED_FILE_WAIT = 1.0
    attempt("unshared", Path(cache_dir, "unshared", f"rank{rank}"))
    # 3. Rank 1's disk has 1000 bytes free.
    if rank == 1:
        usage = namedtuple("usage", "total used free")
        feature_cache.shutil.disk_usage = lambda folder: usage(10**6, 10**6 - 1000, 1000)
    attempt("space", Path(cache_dir, "space"))
    feature_cache.shutil.disk_usage = real_usage
    Path(cache_dir, f"rank{rank}_failures.json").write_text(json.dumps(results))


def main(mode, demo_root, cache_dir, timeout, delay):
    """Start the process group (gloo) and run `mode` (build or failures)."""
    rank, world, _ = distributed.start("cpu", timeout=timedelta(seconds=float(timeout)))
    split = read_split(demo_root, "train")
    {"build": build, "failures": failures}[mode](split, cache_dir, rank, world, delay)
    distributed.barrier()


if __name__ == "__main__":
    main(*sys.argv[1:])
