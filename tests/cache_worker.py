"""Run by torchrun in test_feature_cache: two processes build the feature and image caches together,
under a process-group timeout shorter than one process's whole build.

Usage: torchrun ... tests/cache_worker.py DEMO_ROOT CACHE_DIR TIMEOUT_SECONDS DELAY_PER_BATCH
"""

import json
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from annotations import read_split
from data_loader import make_transform
from feature_cache import cached_features, cached_images
from model import EncoderCNN


def main(demo_root, cache_dir, timeout, delay):
    """Build both caches of the demo training split; write rank<r>.json (batches computed)."""
    dist.init_process_group("gloo", timeout=timedelta(seconds=float(timeout)))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    encoder = EncoderCNN(32, "smallcnn", pretrained=False, trainable_blocks=0)
    computed, compute = [], encoder.backbone_features

    def slow_features(images):
        time.sleep(float(delay))  # a batch of a big CNN
        computed.append(len(images))
        return compute(images)

    encoder.backbone_features = slow_features
    split = read_split(demo_root, "train")
    options = dict(cache_dir=cache_dir, batch_size=8, progress=False, rank=rank, world=world)
    cached_features(encoder, split, make_transform(32), **options)
    cached_images(split, 32, **options)
    Path(cache_dir, f"rank{rank}.json").write_text(json.dumps(computed))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
