"""Training: `train(config) -> history`, resumable, single- or multi-process (torchrun), CLI on top."""

import contextlib
import csv
import json
import math
import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm

from annotations import read_split
from checkpoint import (
    CheckpointError,
    build_model,
    load_checkpoint,
    load_model_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from coco_metrics import cider_score
from config import ARCHITECTURE_FIELDS, TrainConfig, parse_config
from data_loader import (
    CaptionDataset,
    ImageCaptionsDataset,
    ImageDataset,
    find_unreadable_images,
    load_or_build_vocab,
    make_caption_loader,
    make_image_captions_loader,
    make_transform,
    resolve_data_dir,
)
from evaluate import predict_captions
from feature_cache import cached_features, cached_images
from vocabulary import Vocabulary


def caption_loss(model, batch, pad_id):
    """Teacher-forced cross-entropy per token, padding ignored (train and validation alike).

    `batch` is (inputs, captions) or (inputs, captions, owners): images or cached features,
    caption ids (captions, seq_len), and for grouped batches the input row of each caption.
    """
    inputs, captions, owners = (*batch, None)[:3]
    # Output t predicts captions[:, t]. Output 0 would predict `<start>`, which is given:
    # scoring it teaches nothing. Padding is not scored either, nor even computed.
    scored = captions != pad_id  # (captions, seq_len)
    scored[:, 0] = False
    scores = model(inputs, captions, owners, scored)  # (scored tokens, vocab)
    return F.cross_entropy(scores.float(), captions[scored])


def autocast_for(config, device):
    """Mixed-precision context for CUDA (bf16 where supported), else a no-op."""
    if device.type != "cuda" or config.amp == "off":
        return contextlib.nullcontext(), None
    dtype = (
        torch.bfloat16
        if config.amp == "bf16" or (config.amp == "auto" and torch.cuda.is_bf16_supported())
        else torch.float16
    )
    return (
        torch.autocast("cuda", dtype=dtype),
        torch.amp.GradScaler("cuda") if dtype == torch.float16 else None,
    )


def make_optimizer(config, model):
    """Adam/AdamW; unfrozen pretrained CNN blocks get `backbone_lr`."""
    backbone = [p for p in model.encoder.backbone.parameters() if p.requires_grad]
    ids = {id(p) for p in backbone}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    groups = [{"params": rest, "lr": config.lr}]
    if backbone:
        groups.append(
            {"params": backbone, "lr": config.backbone_lr if config.pretrained else config.lr}
        )
    if config.optimizer not in ("adam", "adamw"):
        raise ValueError(f"optimizer must be 'adam' or 'adamw', not {config.optimizer!r}")
    cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    # One fused kernel per step instead of a dozen passes over every weight (CPU and CUDA).
    fused = all(
        p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in model.parameters()
    )
    return cls(groups, weight_decay=config.weight_decay, fused=fused or None)


def make_scheduler(config, optimizer, total_steps):
    """Linear warm-up then cosine decay (or constant) per step."""

    def factor(step):
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        if config.lr_schedule == "constant":
            return 1.0
        progress = (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def init_distributed(config):
    """(rank, world size, device); joins the torchrun process group when there is one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if config.device == "auto":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(config.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def check_resumable(old, new, path):
    """Refuse to resume a checkpoint whose architecture differs from the config's."""
    diff = [
        f"{k}: checkpoint {old.get(k)!r} vs config {getattr(new, k)!r}"
        for k in ARCHITECTURE_FIELDS
        if old.get(k) != getattr(new, k)
    ]
    if diff:
        raise CheckpointError(f"{path}: cannot resume, architecture differs: " + "; ".join(diff))


def build_caches(make, splits, rank, world):
    """`make(split, write)` per split: rank 0 writes or opens each cache; the others wait, then open."""
    caches = [make(split, True) for split in splits] if rank == 0 else None
    if world > 1:
        dist.barrier()
    # Rank 0 keeps what it has: opening again would re-stat every image and re-hash the CNN.
    return caches if caches is not None else [make(split, False) for split in splits]


class TrainingData:
    """The loaders and inputs one run needs: cached features (frozen CNN) or images."""

    def __init__(self, config, model, vocab, train_split, val_split, rank, world, device):
        self.train_split, self.val_split = train_split, val_split
        transform = make_transform(config.image_size, train=False)
        train_transform = make_transform(config.image_size, train=config.augment)
        encoder = model.encoder
        self.train_features = self.val_features = self.train_pixels = self.val_pixels = None
        splits = (train_split, val_split)
        if config.blind:
            # Blind runs never look at pixels: zero features, no CNN work at all.
            self.train_features, self.val_features = (
                np.zeros((len(s.image_ids), encoder.feature_size), np.float16) for s in splits
            )
        elif encoder.frozen:
            self.train_features, self.val_features = build_caches(
                lambda s, write: cached_features(
                    encoder,
                    s,
                    transform,
                    batch_size=config.batch_size,
                    num_workers=config.num_workers,
                    device=device,
                    progress=config.progress,
                    write=write,
                ),
                splits,
                rank,
                world,
            )
        elif config.cache_images:
            if config.augment:
                raise ValueError("cache_images needs augment=False: a cached image is cropped once")
            self.train_pixels, self.val_pixels = build_caches(
                lambda s, write: cached_images(
                    s,
                    config.image_size,
                    batch_size=config.batch_size,
                    num_workers=config.num_workers,
                    progress=config.progress,
                    write=write,
                ),
                splits,
                rank,
                world,
            )
        if config.batch_by not in ("image", "length"):
            raise ValueError(f"batch_by must be 'image' or 'length', not {config.batch_by!r}")
        grouped = config.batch_by == "image"
        make_loader = make_image_captions_loader if grouped else make_caption_loader
        common = dict(
            seed=config.seed, num_workers=config.num_workers, num_replicas=world, rank=rank
        )
        self.train, self.val = (
            make_loader(
                ImageCaptionsDataset(dataset, per_image, config.seed) if grouped else dataset,
                config.batch_size,
                shuffle=shuffle,
                **common,
            )
            for dataset, shuffle, per_image in (
                (
                    CaptionDataset(
                        train_split,
                        vocab,
                        train_transform,
                        self.train_features,
                        pixels=self.train_pixels,
                    ),
                    True,
                    config.captions_per_image,
                ),
                (
                    CaptionDataset(
                        val_split, vocab, transform, self.val_features, pixels=self.val_pixels
                    ),
                    False,
                    None,
                ),
            )
        )
        self.grouped, self.seed = grouped, config.seed
        n_val = (
            len(val_split.image_ids)
            if config.val_images is None
            else min(config.val_images, len(val_split.image_ids))
        )
        if self.val_features is not None:
            images = torch.utils.data.TensorDataset(
                torch.from_numpy(np.asarray(self.val_features[:n_val], np.float32)),
                torch.tensor(val_split.image_ids[:n_val]),
            )
        else:
            images = torch.utils.data.Subset(
                ImageDataset(val_split, transform, pixels=self.val_pixels), range(n_val)
            )
        self.val_images = torch.utils.data.DataLoader(
            images, batch_size=config.batch_size, num_workers=config.num_workers
        )
        scored_ids = set(val_split.image_ids[:n_val])
        self.val_references = {i: r for i, r in val_split.references().items() if i in scored_ids}

    def start_epoch(self, epoch):
        """Reshuffle (and redraw caption subsets) for `epoch`, the same way on a resume."""
        if self.grouped:
            self.train.sampler.set_epoch(epoch)
            self.train.dataset.set_epoch(epoch)
        else:
            self.train.batch_sampler.set_epoch(epoch)
        self.train.generator.manual_seed(self.seed * 100003 + epoch)


def run_epoch(
    model,
    loader,
    vocab,
    config,
    device,
    optimizer=None,
    scheduler=None,
    scaler=None,
    autocast=None,
    desc="",
):
    """One pass over `loader`: trains when an optimizer is given, else evaluates. Returns losses."""
    training = optimizer is not None
    model.train(training)
    step_losses, total, tokens = [], 0.0, 0
    bar = tqdm(loader, desc=desc, unit="batch", disable=not config.progress, leave=False)
    with torch.set_grad_enabled(training):
        for batch in bar:
            batch = [t.to(device, non_blocking=True) for t in batch]
            captions = batch[1]
            with autocast or contextlib.nullcontext():
                loss = caption_loss(model, batch, vocab.pad_id)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"{desc}: loss became {loss.item()} at step {len(step_losses)} of this epoch; "
                    "lower the learning rate or check the data. The last checkpoint is intact."
                )
            if training:
                optimizer.zero_grad(set_to_none=True)
                (scaler.scale(loss) if scaler else loss).backward()
                if scaler:
                    scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                if scaler:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                scheduler.step()
            n = int((captions != vocab.pad_id).sum())
            step_losses.append(loss.item())
            total, tokens = total + loss.item() * n, tokens + n
            bar.set_postfix(loss=f"{loss.item():.3f}", ppl=f"{math.exp(min(loss.item(), 50)):.1f}")
    if dist.is_available() and dist.is_initialized():
        # Each rank saw its own shard: the epoch's loss is the token-weighted mean over all.
        sums = torch.tensor([total, float(tokens)], dtype=torch.float64, device=device)
        dist.all_reduce(sums)
        total, tokens = sums.tolist()
    return step_losses, total / max(tokens, 1)


def write_history(history, output_dir):
    """history.json, history.csv and learning_curves.png in `output_dir`."""
    from plots import plot_learning_curves

    output_dir = Path(output_dir)
    tmp = output_dir / ".history.json.tmp"
    tmp.write_text(json.dumps(history, indent=1))
    os.replace(tmp, output_dir / "history.json")
    columns = [k for k, v in history.items() if k != "step_loss" and isinstance(v, list)]
    with open(output_dir / "history.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows(zip(*(history[c] for c in columns)))
    plot_learning_curves(history, output_dir / "learning_curves.png")


def drop_unreadable_images(split, config):
    """`split` without the images that cannot be read, and how many were dropped."""
    bad = find_unreadable_images(split, config.num_workers, config.progress)
    if bad:
        tqdm.write(
            f"skipping {len(bad)} unreadable {split.name} image(s); first: "
            f"{next(iter(bad.values()))}"
        )
    return split.without_images(bad), len(bad)


def remove_stale_temporaries(output_dir):
    """Delete half-written files a killed run left behind (complete files are never touched)."""
    for tmp in Path(output_dir).glob(".*.tmp*"):
        tmp.unlink(missing_ok=True)


def new_history():
    return {
        "epoch": [],
        "train_loss": [],
        "train_perplexity": [],
        "val_loss": [],
        "val_perplexity": [],
        "val_cider": [],
        "lr": [],
        "epoch_seconds": [],
        "step_loss": [],
    }


def train(config):
    """Train a captioning model as `config` says; returns the history (per-epoch metrics)."""
    rank, world, device = init_distributed(config)
    output_dir = Path(config.output_dir)
    last_path, best_path = output_dir / "last.pt", output_dir / "best.pt"
    resume_state = load_checkpoint(last_path) if config.resume and last_path.exists() else None
    data_dir = resolve_data_dir(config.data_dir)
    train_split = read_split(data_dir, "train", config.layout)
    val_split = read_split(data_dir, "val", config.layout)
    skipped = {}
    if config.skip_bad_images:
        train_split, skipped["train"] = drop_unreadable_images(train_split, config)
        val_split, skipped["val"] = drop_unreadable_images(val_split, config)
    if resume_state:
        check_resumable(resume_state["config"], config, last_path)
        vocab = Vocabulary.from_dict(resume_state["vocab"])
    else:
        vocab = load_or_build_vocab(
            vocab_file=None,
            vocab_threshold=config.vocab_threshold,
            vocab_from_file=False,
            train_split=train_split,
        )
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    model = build_model(config, vocab).to(device)
    data = TrainingData(config, model, vocab, train_split, val_split, rank, world, device)
    optimizer = make_optimizer(config, model)
    scheduler = make_scheduler(config, optimizer, config.epochs * len(data.train))
    autocast, scaler = autocast_for(config, device)
    history, start_epoch, best_cider, stale = new_history(), 0, -1.0, 0
    if resume_state:
        load_model_state(
            model,
            resume_state["model"],
            last_path,
            "config " + str({k: getattr(config, k) for k in ARCHITECTURE_FIELDS}),
        )
        optimizer.load_state_dict(resume_state["optimizer"])
        scheduler.load_state_dict(resume_state["scheduler"])
        if scaler and resume_state.get("scaler"):
            scaler.load_state_dict(resume_state["scaler"])
        set_rng_state(resume_state["rng"])
        history = resume_state["history"]
        start_epoch, best_cider, stale = (
            resume_state["epoch"] + 1,
            resume_state["best_cider"],
            resume_state["stale_epochs"],
        )
    ddp_model = (
        torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None
        )
        if world > 1
        else model
    )
    history["skipped_images"] = skipped
    if rank == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(output_dir)
        vocab.save(output_dir / "vocab.json")
        (output_dir / "config.json").write_text(json.dumps(asdict(config), indent=1))
    for epoch in range(start_epoch, config.epochs):
        if config.patience is not None and stale >= config.patience:
            break
        started = time.time()
        data.start_epoch(epoch)
        step_losses, train_loss = run_epoch(
            ddp_model,
            data.train,
            vocab,
            config,
            device,
            optimizer,
            scheduler,
            scaler,
            autocast,
            desc=f"epoch {epoch + 1}/{config.epochs}",
        )
        _, val_loss = run_epoch(
            model, data.val, vocab, config, device, autocast=autocast, desc="val loss"
        )
        cider = 0.0
        if rank == 0:
            predictions = predict_captions(
                model,
                vocab,
                data.val_images,
                device,
                max_len=config.max_caption_len,
                blind=config.blind,
            )
            cider = cider_score(predictions, data.val_references)
        if world > 1:
            shared = torch.tensor([cider], device=device)
            dist.broadcast(shared, 0)
            cider = float(shared.item())
        for key, value in (
            ("epoch", epoch + 1),
            ("train_loss", train_loss),
            ("train_perplexity", math.exp(train_loss)),
            ("val_loss", val_loss),
            ("val_perplexity", math.exp(val_loss)),
            ("val_cider", cider),
            ("lr", scheduler.get_last_lr()[0]),
            ("epoch_seconds", time.time() - started),
        ):
            history[key].append(value)
        history["step_loss"].extend(step_losses)
        improved = cider > best_cider
        best_cider, stale = (cider, 0) if improved else (best_cider, stale + 1)
        if rank == 0:
            state = {
                "config": asdict(config),
                "vocab": vocab.to_dict(),
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler else None,
                "rng": rng_state(),
                "epoch": epoch,
                "step": len(history["step_loss"]),
                "history": history,
                "best_cider": best_cider,
                "stale_epochs": stale,
            }
            save_checkpoint(state, last_path)
            if improved:
                save_checkpoint(
                    {
                        k: state[k]
                        for k in ("config", "vocab", "model", "epoch", "history", "best_cider")
                    },
                    best_path,
                )
            write_history(history, output_dir)
            tqdm.write(
                f"epoch {epoch + 1}: train loss {train_loss:.3f}, val loss {val_loss:.3f}, "
                f"val CIDEr {cider:.3f}{' (best)' if improved else ''}",
            )
    if world > 1:
        dist.barrier()
    return history


if __name__ == "__main__":
    train(parse_config(TrainConfig, description=train.__doc__))
