"""Caches built by every process: each computes its own share, and the file is the one-process one."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from annotations import read_split
from data_loader import make_transform
from feature_cache import cached_features, cached_images
from model import EncoderCNN
from tests.helpers import ROOT

DELAY, TIMEOUT = 1.0, 6.0  # seconds a batch, and the process group's timeout


def test_two_processes_build_the_caches_together_byte_for_byte(demo_root, tmp_path):
    split = read_split(demo_root, "train")
    batches = -(-len(split.image_ids) // 8)
    # One process alone would keep the other waiting longer than the timeout.
    assert batches * DELAY > TIMEOUT > (batches // 2 + 1) * DELAY
    torch.manual_seed(0)
    encoder = EncoderCNN(32, "smallcnn", pretrained=False, trainable_blocks=0)
    options = dict(cache_dir=tmp_path / "one", batch_size=8, progress=False)
    one = [cached_features(encoder, split, make_transform(32), **options).filename,
           cached_images(split, 32, **options).filename]  # fmt: skip

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(ROOT / "tests" / "cache_worker.py"), str(demo_root), str(tmp_path / "two"),
               str(TIMEOUT), str(DELAY)]  # fmt: skip
    started = time.time()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for path in one:
        kind = "features" if "features" in str(path) else "images"
        other = tmp_path / "two" / kind / os.path.basename(path)
        assert Path(path).read_bytes() == other.read_bytes(), kind  # byte for byte
    shares = [json.loads((tmp_path / "two" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert sum(map(sum, shares)) == len(split.image_ids)  # every image once, by one rank
    assert [len(s) for s in shares] == [batches // 2, batches - batches // 2]
    assert not list((tmp_path / "two").rglob(".*tmp*"))
    assert time.time() - started > batches // 2 * DELAY
