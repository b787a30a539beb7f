"""Run by torchrun in test_train: trains, then saves this rank's weights and the images it read.

Usage: torchrun ... tests/ddp_worker.py CONFIG_JSON OUT_DIR
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import train as train_module
from config import TrainConfig
from data_loader import ImageCaptionsDataset
from self_critical import IndexedImages


def main(config_json, out_dir):
    """Train with `config_json`; write rank<r>.pt (weights), rank<r>_reads.json (epoch, image)
    and rank<r>_scst_reads.json (images read by the self-critical stage)."""
    models, reads, scst_reads = [], [], []
    build_model, get_item = train_module.build_model, ImageCaptionsDataset.__getitem__
    get_image = IndexedImages.__getitem__

    def keep_model(*args, **kwargs):
        models.append(build_model(*args, **kwargs))
        return models[-1]

    def record_read(dataset, index):
        if dataset.captions.split.name == "train":
            reads.append((dataset.epoch, int(dataset.images[index])))
        return get_item(dataset, index)

    def record_image(dataset, index):
        scst_reads.append(int(dataset.images[index]))
        return get_image(dataset, index)

    train_module.build_model, ImageCaptionsDataset.__getitem__ = keep_model, record_read
    IndexedImages.__getitem__ = record_image
    train_module.train(TrainConfig(**json.loads(config_json)))
    rank = dist.get_rank()
    torch.save(models[0].state_dict(), Path(out_dir) / f"rank{rank}.pt")
    (Path(out_dir) / f"rank{rank}_reads.json").write_text(json.dumps(reads))
    (Path(out_dir) / f"rank{rank}_scst_reads.json").write_text(json.dumps(scst_reads))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
