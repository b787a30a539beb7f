"""Training: `train(config) -> history`, resumable, single- or multi-process (torchrun), CLI on top."""

import argparse
import contextlib
import csv
import dataclasses
import io
import json
import math
import random
import secrets
import time
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from captioning import distributed
from captioning.atomic_file import remove_temporaries, write_json, write_text
from captioning.checkpoint import (
    CheckpointError,
    build_model,
    load_checkpoint,
    load_model_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from captioning.command import add_debug_flag, command, progress_disabled
from captioning.config import ConfigError, TrainConfig, parse_config, resume_conflicts
from captioning.data.annotations import read_split
from captioning.data.feature_files import check_feature_files, folder_feature_size
from captioning.data.loading import (
    find_unreadable_images,
    load_or_build_vocab,
    preprocessing,
)
from captioning.data.training_data import TrainingData, to_device
from captioning.data.vocabulary import Vocabulary
from captioning.demo.dataset import resolve_data_dir
from captioning.evaluation.coco_metrics import cider_score
from captioning.evaluation.evaluate import predict_captions
from captioning.presets import PRESETS, preset_config
from captioning.training.loss_log import LossLog
from captioning.training.self_critical import CaptionReward, run_self_critical_epoch
from model import scored_positions, select_outputs


class CaptionLoss(NamedTuple):
    """One batch's teacher-forced loss terms, all tensors on the batch's device."""

    loss: torch.Tensor  # mean cross-entropy per scored token
    tokens: torch.Tensor  # tokens scored
    penalty: torch.Tensor | float  # attention regulariser to add when training (0: Show and Tell)
    correct: torch.Tensor  # tokens whose highest score is the reference word


class CaptionBatch(NamedTuple):
    """One teacher-forced batch on its device: images (cached features with `cached`), caption
    ids (captions, seq_len), for grouped batches the input row of each caption (else None),
    and the flat positions (n,) among the (captions, seq_len - 1) outputs that are scored."""

    inputs: torch.Tensor
    captions: torch.Tensor
    owners: torch.Tensor | None
    scored: torch.Tensor


def caption_batch(batch, pad_id, device):
    """A loader's (inputs, captions) or (inputs, captions, owners) as a `CaptionBatch` on
    `device`. `<start>` is given, never predicted; padding is not scored either, nor even
    computed. Which words are scored is found here, on the host: on the GPU, that count would
    make the host wait for every step queued before it."""
    inputs, captions, owners = (*batch, None)[:3]
    scored = scored_positions(captions != pad_id)  # (n,), on the loader's (host) tensors
    tensors = [inputs, captions, scored] + ([] if owners is None else [owners])
    inputs, captions, scored, owners = (*to_device(tensors, device), None)[:4]
    return CaptionBatch(inputs, captions, owners, scored)


def caption_loss(model, batch, cached=False):
    """Teacher-forced cross-entropy per scored token of a `CaptionBatch`, as a `CaptionLoss`;
    nothing in it waits for the device."""
    output = model(batch.inputs, batch.captions, batch.owners, batch.scored, cached)
    scores = output.scores  # (scored, vocab)
    penalty = getattr(model, "module", model).decoder.regulariser(output)  # (DDP: `.module`)
    targets = select_outputs(batch.captions[:, 1:], batch.scored)  # (scored,)
    correct = (scores.detach().argmax(dim=1) == targets).sum()
    tokens = torch.full((), len(batch.scored), dtype=torch.long, device=targets.device)
    return CaptionLoss(F.cross_entropy(scores.float(), targets), tokens, penalty, correct)


def amp_dtype(config, device):
    """The autocast dtype on CUDA, or None (no mixed precision): `auto` takes bf16 only where
    the GPU computes it natively (compute capability 8.0 on, Ampere and later), else fp16."""
    if device.type != "cuda" or config.amp == "off":
        return None
    if config.amp == "auto":
        # is_bf16_supported() also counts emulated bf16 (T4, V100): slow, and no better than fp16.
        native = torch.cuda.get_device_capability(device) >= (8, 0)
        return torch.bfloat16 if native else torch.float16
    return torch.bfloat16 if config.amp == "bf16" else torch.float16


def autocast_for(config, device):
    """Mixed-precision context and gradient scaler (fp16 only) for CUDA, else a no-op and None."""
    dtype = amp_dtype(config, device)
    if dtype is None:
        return contextlib.nullcontext(), None
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    return torch.autocast("cuda", dtype=dtype), scaler


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
    """(rank, world size, device); joins the torchrun process group when there is one, whose
    collectives wait `config.collective_timeout` minutes for a late process."""
    return distributed.start(config.device, timeout=timedelta(minutes=config.collective_timeout))


def offset_random_streams(seed, rank, epoch):
    """Give every rank but 0 random streams of its own (dropout, self-critical sampling) from
    here on. DDP keeps the weights alike, and the same streams on every rank would draw the
    same dropout masks and captions on each. Rank 0 keeps its stream, so that one process
    trains as it always has; `epoch` gives a resumed rank (which restored rank 0's saved
    streams) new ones too."""
    if rank:
        derived = int(np.random.SeedSequence([seed, rank, epoch]).generate_state(1)[0])
        random.seed(derived)
        np.random.seed(derived)
        torch.manual_seed(derived)  # every device's generator


def check_resumable(saved_config, config, path):
    """Refuse to resume a run whose config differs in anything but where and how long it runs."""
    conflicts = resume_conflicts(saved_config, config)
    if conflicts:
        raise CheckpointError(
            f"{path}: cannot resume with a different configuration: " + "; ".join(conflicts)
            + ". Change these back, or start a new run in another output_dir."
        )  # fmt: skip


def ddp_share(tokens):
    """Factor for this process's mean loss so that DDP's gradient average weights every token alike.

    DDP averages the processes' gradients; a process holding more tokens than another must
    count for more, so that the update is that of one batch holding all of them.
    """
    total = distributed.sum_tensor(tokens.detach().clone())
    return tokens * distributed.world_size() / total


def optimizer_step(model, loss, optimizer, scheduler, scaler, grad_clip):
    """Backpropagate `loss`, clip the gradient norm, and step the optimizer and schedule."""
    optimizer.zero_grad(set_to_none=True)
    (scaler.scale(loss) if scaler else loss).backward()
    if scaler:
        scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    scheduler.step()


def make_step(model, optimizer, scheduler, scaler, grad_clip):
    """`step(loss, tokens, penalty=0)`: one update, each process's loss weighted by its share of
    the tokens, plus a regulariser (the attention decoder's) as it is."""

    def step(loss, tokens, penalty=0.0):
        objective = (loss * ddp_share(tokens) if distributed.active() else loss) + penalty
        optimizer_step(model, objective, optimizer, scheduler, scaler, grad_clip)

    return step


def run_epoch(model, loader, vocab, config, device, optimizer=None, scheduler=None, scaler=None,
              autocast=None, desc="", forecast=False):  # fmt: skip
    """One pass over `loader`: trains when an optimizer is given, else evaluates; with
    `forecast`, prints how long the epoch takes from its first steps.

    Returns each step's loss, and the epoch's token-weighted mean loss and token accuracy (the
    share of next words predicted right) over all processes. The losses stay on the device and
    are read every `config.log_every` steps and at the end: reading one makes the host wait for
    the GPU, which could otherwise be queueing the next steps.
    """
    training = optimizer is not None
    cached = config.reads_features
    model.train(training)
    step = make_step(model, optimizer, scheduler, scaler, config.grad_clip) if training else None
    # Loss x tokens, tokens, right tokens: float64 sums, in the order the host summed them before.
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    bar = tqdm(
        loader, desc=desc, unit="batch", disable=progress_disabled(config.progress), leave=False
    )
    losses = LossLog(config.log_every, bar, desc, "lower the learning rate or check the data",
                     forecast=len(loader) if forecast else None)  # fmt: skip
    with torch.set_grad_enabled(training):
        for batch in bar:
            batch = caption_batch(batch, vocab.pad_id, device)
            with autocast or contextlib.nullcontext():
                loss, n, penalty, correct = caption_loss(model, batch, cached)
            if training:
                step(loss, n, penalty)
            loss = loss.detach()
            sums += torch.stack([loss.double() * n, n.double(), correct.double()])
            losses.add(loss)
    step_losses = losses.close()
    # Each rank saw its own shard: the epoch's figures are token-weighted over all.
    total, tokens, correct = distributed.sum_tensor(sums).tolist()
    return step_losses, total / max(tokens, 1), correct / max(tokens, 1)


def write_history(history, output_dir, plot=True):
    """history.json, history.csv and (with `plot`) learning_curves.png in `output_dir`."""
    from captioning.plots import plot_learning_curves

    output_dir = Path(output_dir)
    write_json(history, output_dir / "history.json")
    columns = [k for k, v in history.items() if k != "step_loss" and isinstance(v, list)]
    table = io.StringIO()
    writer = csv.writer(table)
    writer.writerow(columns)
    writer.writerows(zip(*(history[c] for c in columns)))
    write_text(output_dir / "history.csv", table.getvalue())
    if plot:
        plot_learning_curves(history, output_dir / "learning_curves.png")


def drop_unreadable_images(split, config, rank=0, world=1):
    """`split` without the images that cannot be read, and how many were dropped. Each of
    `world` processes reads its own share of the images; all drop what any found."""
    n = len(split.image_ids)
    start, stop = rank * n // world, (rank + 1) * n // world
    share = split.without_images([*range(start), *range(stop, n)]) if world > 1 else split
    found = find_unreadable_images(share, config.num_workers, config.progress)
    found = {start + k: message for k, message in found.items()}
    bad = distributed.union_of_indices(found, n)
    if bad:
        owner = next(r for r in range(world) if bad[0] < (r + 1) * n // world)
        first = distributed.broadcast_text(found.get(bad[0], ""), owner)
        tqdm.write(f"skipping {len(bad)} unreadable {split.name} image(s); first: {first}")
    return split.without_images(bad), len(bad)


def read_splits(config, rank=0, world=1):
    """The training and validation splits, without unreadable images if asked; and how many."""
    data_dir = resolve_data_dir(config.data_dir)
    splits = [
        read_split(data_dir, name, config.layout, config.strip_punctuation)
        for name in ("train", "val")
    ]
    skipped = {}
    if config.skip_bad_images and config.features_dir is None:  # features need no images
        for k, split in enumerate(splits):
            splits[k], skipped[split.name] = drop_unreadable_images(split, config, rank, world)
    return splits, skipped


# Per-epoch figures of the self-critical stage (None in cross-entropy epochs), and the token
# accuracies (share of next words predicted right under teacher forcing; no train figure in
# self-critical epochs).
RANKS_CHECK = ".ranks-check"  # written by rank 0, read by every rank: one shared output_dir
# Drawing the curves takes about a second on a CPU: redrawn after every epoch, a run of short
# epochs (the demo, the tests) would spend a third of its time drawing.
PLOT_EVERY_SECONDS = 60
SELF_CRITICAL_FIGURES = ("reward", "baseline", "positive_advantage")
ACCURACY_FIGURES = ("train_accuracy", "val_accuracy")


class RunState:
    """What changes from epoch to epoch besides the weights: history, the best validation
    figure (`best_score`: CIDEr, or minus the loss with select_by="loss"), patience."""

    def __init__(self):
        self.history = {
            key: []
            for key in ("epoch", "train_loss", "train_perplexity", "val_loss", "val_perplexity",
                        "val_cider", "lr", "epoch_seconds", "stage", *SELF_CRITICAL_FIGURES,
                        *ACCURACY_FIGURES, "step_loss")
        }  # fmt: skip
        self.next_epoch, self.best_score, self.stale = 0, -math.inf, 0
        self.plotted_at, self.plot_behind = -math.inf, False  # learning_curves.png's last drawing

    def record_epoch(self, epoch, train_loss, val_loss, cider, lr, seconds, step_losses,
                     stage="xe", figures=None, select_by="cider"):  # fmt: skip
        """Append one epoch's figures; returns whether its `select_by` figure (val CIDEr or
        val loss, the same on every rank; CIDEr in the self-critical stage) is the best so far.

        `train_loss` is None in the self-critical stage. `figures` hold the token accuracies
        and, in that stage, its mean reward, mean baseline and share of positive advantages.
        """
        done = len(self.history["epoch"])
        # Histories of runs started before the self-critical stage existed lack its columns.
        self.history.setdefault("stage", ["xe"] * done)
        for key in SELF_CRITICAL_FIGURES + ACCURACY_FIGURES:
            self.history.setdefault(key, [None] * done)
        figures = figures or {}
        for key, value in (
            ("epoch", epoch + 1), ("stage", stage), ("train_loss", train_loss),
            ("train_perplexity", None if train_loss is None else math.exp(train_loss)),
            ("val_loss", val_loss), ("val_perplexity", math.exp(val_loss)),
            ("val_cider", cider), ("lr", lr), ("epoch_seconds", seconds),
            *((key, figures.get(key)) for key in SELF_CRITICAL_FIGURES + ACCURACY_FIGURES),
        ):  # fmt: skip
            self.history[key].append(value)
        self.history["step_loss"].extend(step_losses)
        by_loss = select_by == "loss" and stage == "xe"
        score = -val_loss if by_loss else cider  # higher is better
        improved = score > self.best_score
        self.best_score, self.stale = (score, 0) if improved else (self.best_score, self.stale + 1)
        self.next_epoch = epoch + 1
        return improved


def restore_run(state, path, config, model, optimizer, scheduler, scaler):
    """Load a `last.pt` checkpoint's weights, optimizer, schedule and RNG; returns its RunState."""
    load_model_state(model, state["model"], path, f"config {config.output_dir}")
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    run = RunState()
    run.history = state["history"]
    # Checkpoints written before select_by hold the best CIDEr as "best_cider".
    best = state["best_score"] if "best_score" in state else state["best_cider"]
    run.next_epoch, run.best_score, run.stale = state["epoch"] + 1, best, state["stale_epochs"]
    return run


def save_run(output_dir, config, vocab, model, optimizer, scheduler, scaler, run, improved):
    """last.pt (all a resume needs), best.pt when this epoch is the best, and the history files.

    The optimizer and schedule are those of the stage of the last epoch (`history["stage"]`).
    The learning curves are redrawn at most every PLOT_EVERY_SECONDS (`train` draws the last).
    """
    state = {
        "config": asdict(config), "vocab": vocab.to_dict(), "model": model.state_dict(),
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler else None, "rng": rng_state(),
        "epoch": run.next_epoch - 1, "step": len(run.history["step_loss"]), "history": run.history,
        "best_score": run.best_score, "stale_epochs": run.stale,
        "preprocessing": preprocessing(config),  # what caption and evaluate feed the model
    }  # fmt: skip
    save_checkpoint(state, output_dir / "last.pt")
    if improved:
        best = ("config", "vocab", "model", "epoch", "history", "best_score", "preprocessing")
        save_checkpoint({k: state[k] for k in best}, output_dir / "best.pt")
    plot = time.time() - run.plotted_at >= PLOT_EVERY_SECONDS
    write_history(run.history, output_dir, plot)
    run.plotted_at, run.plot_behind = (time.time(), False) if plot else (run.plotted_at, True)


def validation_cider(model, vocab, data, config, device, rank, world):
    """Greedy CIDEr of the validation images: every rank captions its share, rank 0 scores
    all the captions, and every rank gets its value (it decides `best.pt` and early stopping,
    so every rank must hold the same one)."""
    predictions = predict_captions(
        model, vocab, data.val_images, device, max_len=config.max_caption_len,
        cached=config.reads_features,
    )  # fmt: skip
    if world > 1:  # JSON keys are strings: the image ids are read back as ints
        shares = distributed.all_texts(json.dumps(predictions))
        predictions = {int(i): text for share in shares for i, text in json.loads(share).items()}
    cider = cider_score(predictions, data.val_references) if rank == 0 else 0.0
    return distributed.broadcast_value(cider)


def check_shared_output_dir(output_dir, rank):
    """Stop every rank with an error naming `output_dir` unless all see rank 0's folder: with
    their own folders, ranks would resume or start the self-critical stage from other files."""
    token = distributed.broadcast_text(secrets.token_hex(8) if rank == 0 else "")
    if rank == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        write_text(output_dir / RANKS_CHECK, token)
    distributed.barrier()  # written before any rank looks
    seen = None
    for _ in range(50):  # a network file system may show the new file a moment later
        with contextlib.suppress(OSError):
            seen = (output_dir / RANKS_CHECK).read_text()
        if seen == token:
            break
        time.sleep(0.1)
    if distributed.any_rank(seen != token):
        raise distributed.DistributedError(
            f"{output_dir}: the processes do not all see the same output_dir (a rank did not "
            "find the file rank 0 wrote there); on several machines output_dir must be a "
            "folder they share"
        )


def check_same_start(epoch, path):
    """Stop every rank unless all resume from the same epoch of `path` (or none resumes)."""
    if distributed.min_value(epoch) != distributed.max_value(epoch):
        raise distributed.DistributedError(
            f"{path}: the processes found different checkpoints to resume from; they must "
            "share output_dir"
        )


def train(config):
    """Train a captioning model as `config` says; returns the history (per-epoch metrics)."""
    if config.features_dir is not None and config.feature_size is None:  # saved in checkpoints
        config = dataclasses.replace(config, feature_size=folder_feature_size(config.features_dir))
    rank, world, device = init_distributed(config)
    output_dir = Path(config.output_dir)
    if world > 1:
        check_shared_output_dir(output_dir, rank)
    last_path = output_dir / "last.pt"
    resume_state = load_checkpoint(last_path) if config.resume and last_path.exists() else None
    if resume_state:
        check_resumable(resume_state["config"], config, last_path)
    if world > 1:
        check_same_start(resume_state["epoch"] if resume_state else -1, last_path)
    init_state = load_checkpoint(config.init_from) if config.init_from else None
    (train_split, val_split), skipped = read_splits(config, rank, world)
    if config.features_dir is not None:
        for split in (train_split, val_split):
            check_feature_files(config.features_dir, split, config.feature_size)
    if resume_state or init_state:
        # The cross-entropy checkpoint's weights only make sense with its vocabulary.
        vocab = Vocabulary.from_dict((resume_state or init_state)["vocab"])
    else:
        vocab = load_or_build_vocab(
            vocab_file=None, vocab_threshold=config.vocab_threshold, vocab_from_file=False,
            train_split=train_split,
        )  # fmt: skip
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    model = build_model(config, vocab).to(device)
    if init_state and not resume_state:
        load_model_state(
            model, init_state["model"], config.init_from, f"config {config.output_dir}"
        )
    data = TrainingData(config, model, vocab, train_split, val_split, rank, world, device)
    if rank == 0 and data.captions_cut:
        cut, total = data.captions_cut
        tqdm.write(f"training captions cut to {config.max_caption_len - 2} words: {cut} of {total}")
    reward = CaptionReward(train_split, vocab) if config.scst_epochs else None
    xe_epochs = 0 if config.init_from else config.epochs
    stage_of = lambda epoch: "xe" if epoch < xe_epochs else "scst"  # noqa: E731
    last_done = resume_state["epoch"] if resume_state else 0
    stage = stage_of(last_done)
    optimizer, scheduler = make_stage(
        config,
        model,
        stage,
        len(data.train),
        len(data.images) if data.images is not None else 0,
    )
    autocast, scaler = autocast_for(config, device)
    run = RunState()
    if resume_state:
        run = restore_run(resume_state, last_path, config, model, optimizer, scheduler, scaler)
    offset_random_streams(config.seed, rank, run.next_epoch)  # after the model is built
    ddp_model = model
    if world > 1:
        device_ids = [device] if device.type == "cuda" else None
        ddp_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    run.history["skipped_images"] = skipped
    if rank == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        remove_temporaries(output_dir)
        vocab.save(output_dir / "vocab.json")
        write_json(asdict(config), output_dir / "config.json")
    total_epochs = xe_epochs + config.scst_epochs
    epoch, forecast_stages = run.next_epoch, set()
    while epoch < total_epochs:
        if stage_of(epoch) != stage:
            stage = "scst"
            optimizer, scheduler = begin_self_critical(
                config, model, run, output_dir, rank, world, len(data.images)
            )
        if config.patience is not None and run.stale >= config.patience:
            if stage == "xe" and config.scst_epochs:
                epoch = xe_epochs  # cross-entropy has converged: on to the self-critical stage
                continue
            break
        started = time.time()
        data.start_epoch(epoch)
        desc = f"epoch {epoch + 1}/{total_epochs}" + (" (self-critical)" if stage == "scst" else "")
        figures = None
        forecast = stage not in forecast_stages  # the first epoch of each stage in this run
        forecast_stages.add(stage)
        if stage == "xe":
            step_losses, train_loss, train_accuracy = run_epoch(
                ddp_model, data.train, vocab, config, device, optimizer, scheduler, scaler,
                autocast, desc=desc, forecast=forecast,
            )  # fmt: skip
        else:
            step = make_step(ddp_model, optimizer, scheduler, scaler, config.grad_clip)
            step_losses, figures = run_self_critical_epoch(
                model, ddp_model, data.images, reward, vocab, config, device, step, autocast, desc,
                forecast,
            )  # fmt: skip
            train_loss = train_accuracy = None
        _, val_loss, val_accuracy = run_epoch(
            model, data.val, vocab, config, device, autocast=autocast, desc="val loss"
        )
        cider = validation_cider(model, vocab, data, config, device, rank, world)
        figures = {**(figures or {}), "train_accuracy": train_accuracy,
                   "val_accuracy": val_accuracy}  # fmt: skip
        improved = run.record_epoch(
            epoch, train_loss, val_loss, cider, scheduler.get_last_lr()[0],
            time.time() - started, step_losses, stage, figures, config.select_by,
        )  # fmt: skip
        if rank == 0:
            save_run(output_dir, config, vocab, model, optimizer, scheduler, scaler, run, improved)
            trained = (
                f"train loss {train_loss:.3f}" if stage == "xe"
                else f"reward {figures['reward']:.3f} (baseline {figures['baseline']:.3f})"
            )  # fmt: skip
            tqdm.write(
                f"epoch {epoch + 1}: {trained}, val loss {val_loss:.3f}, "
                f"val CIDEr {cider:.3f}{' (best)' if improved else ''}"
            )
        epoch += 1
    if rank == 0 and run.plot_behind:
        from captioning.plots import plot_learning_curves

        plot_learning_curves(run.history, output_dir / "learning_curves.png")
    if world > 1:
        distributed.barrier()
    return run.history


def make_stage(config, model, stage, xe_steps, scst_steps):
    """Optimizer and learning-rate schedule of one stage: cross-entropy ("xe") or self-critical."""
    if stage == "xe":
        optimizer = make_optimizer(config, model)
        return optimizer, make_scheduler(config, optimizer, config.epochs * xe_steps)
    # The self-critical stage fine-tunes: its own rate (the CNN's scaled alike), no warm-up.
    scst = dataclasses.replace(
        config, lr=config.scst_lr, backbone_lr=config.backbone_lr * config.scst_lr / config.lr,
        warmup_steps=0,
    )  # fmt: skip
    optimizer = make_optimizer(scst, model)
    return optimizer, make_scheduler(scst, optimizer, config.scst_epochs * scst_steps)


def begin_self_critical(config, model, run, output_dir, rank, world, steps):
    """Leave cross-entropy: keep its best checkpoint as best_cross_entropy.pt, go on from its
    weights with the self-critical optimizer; patience counts afresh. The stage goes by CIDEr:
    with select_by="loss", the CIDEr to beat becomes that of the epoch kept."""
    if world > 1:
        distributed.barrier()  # rank 0 has written the last epoch's files
    best = output_dir / "best.pt"
    state = load_checkpoint(best) if best.exists() else None  # read once, copied and loaded
    if rank == 0 and state:
        save_checkpoint(state, output_dir / "best_cross_entropy.pt")
    if state:
        load_model_state(model, state["model"], best, f"config {output_dir}")
    # The stage starts from rank 0's weights on every rank, whatever each one read.
    distributed.broadcast_module(model)
    run.stale = 0
    if config.select_by == "loss":  # rank 0's figure: the others may not see best.pt
        kept = state["history"]["val_cider"][state["epoch"]] if state else -math.inf
        run.best_score = distributed.broadcast_value(kept)
    return make_stage(config, model, "scst", 0, steps)


def parse_command_line(argv=None):
    """The `TrainConfig` of train.py's flags, whose defaults are those of the --preset."""
    preset = argparse.ArgumentParser(add_help=False)
    preset.add_argument(
        "--preset", choices=PRESETS, default="auto",
        help="the defaults below: coco, presets.coco_config(decoder) (the published COCO "
        "recipes, docs/coco_recipes.md); flickr8k, presets.flickr8k_config(decoder); demo, "
        "presets.demo_config(decoder); none, TrainConfig's own; auto: demo for the demo dataset "
        "(no --data-dir, data/demo, or a folder with its marker file), flickr8k for a folder "
        "whose Karpathy split file is dataset_flickr8k.json, else coco. Flags override them; "
        "--help with --data-dir, --decoder or --preset shows that preset's values",
    )  # fmt: skip
    add_debug_flag(preset)  # shown in --help, acted on by `command`
    # The preset depends on the data and the decoder: read them before the full parse.
    peek = argparse.ArgumentParser(add_help=False, parents=[preset])
    peek.add_argument("--data-dir", type=lambda text: None if text.lower() == "none" else text)
    peek.add_argument("--decoder", default="showtell")
    known, _ = peek.parse_known_args(argv)
    try:
        base = preset_config(known.preset, known.data_dir, known.decoder)
    except ConfigError:
        base = None  # an unknown decoder: the full parse names it and the choices
    return parse_config(TrainConfig, argv, train.__doc__, base=base, parents=[preset])


@command
def main(argv=None):
    """train.py: train with the command line's config; the history."""
    return train(parse_command_line(argv))
