"""Training: resume equals uninterrupted, feature and image caches, atomic checkpoints, history, DDP,
real COCO fit."""

import json
import os
import shutil

import numpy as np
import pytest
import torch

from captioning.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_trained,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from captioning.config import TrainConfig
from captioning.data import feature_cache
from captioning.data import loading as data_loader
from captioning.data.annotations import read_split
from captioning.training import loss_log
from captioning.training import train as train_module
from captioning.training.loss_log import LossLog
from captioning.training.train import train
from model import DecoderOutput, DecoderRNN, select_outputs
from tests.helpers import interrupt_training_at_epoch, tiny_config


def test_caption_loss_scores_every_word_after_start_and_no_padding():
    vocab, pad = 6, 5

    class FixedScores(torch.nn.Module):
        """Scores (captions, seq_len - 1, vocab) whatever the inputs, as the decoder protocol
        aligns them: output t predicts captions[:, t + 1]."""

        def __init__(self, scores):
            super().__init__()
            self.scores, self.decoder = scores, DecoderRNN(2, 2, vocab)

        def forward(self, inputs, captions, owners=None, scored=None, cached=False):
            return DecoderOutput(select_outputs(self.scores, scored))

    captions = torch.tensor([[0, 3, 4, 1], [0, 2, 1, pad]])
    scores = torch.randn(2, 3, vocab)
    # Three of the five scored words right (3, 4 and the last 1), two wrong (the first 1, and 2).
    scores[0, 0, 3] = scores[0, 1, 4] = scores[1, 1, 1] = 10.0
    scores[0, 2, 0] = scores[1, 0, 5] = 10.0
    batch = train_module.caption_batch((torch.zeros(2, 3), captions), pad, "cpu")
    loss, scored, penalty, correct = train_module.caption_loss(FixedScores(scores), batch)
    assert int(scored) == 5 and penalty == 0.0
    predicted, targets = torch.cat([scores[0], scores[1, :2]]), torch.tensor([3, 4, 1, 2, 1])
    assert torch.allclose(loss, torch.nn.functional.cross_entropy(predicted, targets))
    assert int(correct) == 3
    changed = scores.clone()
    changed[1, 2] = torch.randn(vocab) * 10  # the output that would predict padding
    assert torch.allclose(
        train_module.caption_loss(FixedScores(changed), batch)[0],
        loss,
    )


def test_resume_continues_exactly_like_uninterrupted_run(demo_root, tmp_path, monkeypatch):
    full = train(tiny_config(demo_root, tmp_path / "full"))
    with monkeypatch.context() as m:
        interrupt_training_at_epoch(m, 2)
        with pytest.raises(KeyboardInterrupt):
            train(tiny_config(demo_root, tmp_path / "cut"))
    assert load_checkpoint(tmp_path / "cut" / "last.pt")["epoch"] == 0
    resumed = train(tiny_config(demo_root, tmp_path / "cut", resume=True))
    assert resumed["epoch"] == [1, 2, 3]
    assert len(resumed["step_loss"]) == len(full["step_loss"]) > 0
    assert resumed["step_loss"] == full["step_loss"]
    assert resumed["val_loss"] == full["val_loss"]


def test_outputs_history_and_checkpoint_contents(demo_root, tmp_path, monkeypatch):
    from captioning import plots

    drawn, draw = [], plots.plot_learning_curves
    monkeypatch.setattr(plots, "plot_learning_curves", lambda h, *a: drawn.append(h["epoch"][:]))
    history = train(tiny_config(demo_root, tmp_path, epochs=3))
    # Drawn after the first epoch, then at most once a minute, and always after the last.
    assert drawn == [[1], [1, 2, 3]]
    draw(history, tmp_path / "learning_curves.png")
    for name in (
        "last.pt",
        "best.pt",
        "history.json",
        "history.csv",
        "learning_curves.png",
        "vocab.json",
        "config.json",
    ):
        assert (tmp_path / name).exists(), name
    assert json.loads((tmp_path / "history.json").read_text())["val_loss"] == history["val_loss"]
    rows = (tmp_path / "history.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,train_loss") and len(rows) == 4
    state = load_checkpoint(tmp_path / "last.pt")
    assert {"config", "vocab", "model", "optimizer", "scheduler", "rng", "epoch", "step"} <= set(
        state
    )
    assert state["config"]["hidden_size"] == 48 and state["step"] == len(history["step_loss"])
    model, vocab, config = load_trained(tmp_path / "best.pt")
    assert config.backbone == "smallcnn" and len(vocab) == model.decoder.fc.out_features
    assert not list(tmp_path.glob(".*tmp*"))


def test_early_stopping_when_val_cider_stalls(demo_root, tmp_path, monkeypatch):
    # Scripted val CIDEr: best at epoch 2, a tie and a drop, then a rise that must never be reached.
    scores = iter([0.5, 0.6, 0.6, 0.55, 0.9, 0.9, 0.9])
    monkeypatch.setattr(train_module, "cider_score", lambda *a, **k: next(scores))
    history = train(tiny_config(demo_root, tmp_path, epochs=7, patience=2))
    assert history["epoch"] == [1, 2, 3, 4]
    assert history["val_cider"] == [0.5, 0.6, 0.6, 0.55]
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == 1  # 0-based: the second epoch


def test_select_by_loss_keeps_the_epoch_of_the_lowest_val_loss(demo_root, tmp_path, monkeypatch):
    # Scripted val CIDEr falls: by CIDEr the first epoch would be kept, by loss the lowest loss's.
    scores = iter([0.9, 0.5, 0.4, 0.3])
    monkeypatch.setattr(train_module, "cider_score", lambda *a, **k: next(scores))
    history = train(tiny_config(demo_root, tmp_path, epochs=4, select_by="loss", patience=None))
    lowest = int(np.argmin(history["val_loss"]))
    assert lowest > 0  # the loss fell after the first epoch: the two rules disagree
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == lowest
    assert load_checkpoint(tmp_path / "last.pt")["best_score"] == -min(history["val_loss"])


def test_patience_counts_epochs_without_a_lower_val_loss(demo_root, tmp_path, monkeypatch):
    # Scripted val losses: the lowest at epoch 2, then a tie and a rise; patience 2 stops at 4.
    losses = iter([0.8, 0.7, 0.7, 0.75, 0.1])
    real = train_module.run_epoch

    def run_epoch(model, loader, *args, **kwargs):
        step_losses, loss, accuracy = real(model, loader, *args, **kwargs)
        return step_losses, next(losses) if kwargs.get("desc") == "val loss" else loss, accuracy

    monkeypatch.setattr(train_module, "run_epoch", run_epoch)
    history = train(tiny_config(demo_root, tmp_path, epochs=5, select_by="loss", patience=2))
    assert history["val_loss"] == [0.8, 0.7, 0.7, 0.75]
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == 1


@pytest.mark.parametrize("scst_scores, best", [((0.3, 0.45), 3), ((0.3, 0.35), 1)])
def test_with_select_by_loss_self_critical_epochs_must_beat_the_kept_epochs_cider(
    demo_root, tmp_path, monkeypatch, scst_scores, best
):
    # Cross-entropy: val CIDEr 0.5 then 0.4, val loss 0.8 then 0.7: the second epoch is kept.
    # Its CIDEr, 0.4 (not the loss, nor the higher 0.5), is what self-critical epochs must beat.
    scores = iter([0.5, 0.4, *scst_scores])
    losses = iter([0.8, 0.7, 0.75, 0.75])
    monkeypatch.setattr(train_module, "cider_score", lambda *a, **k: next(scores))
    real = train_module.run_epoch

    def run_epoch(model, loader, *args, **kwargs):
        step_losses, loss, accuracy = real(model, loader, *args, **kwargs)
        return step_losses, next(losses) if kwargs.get("desc") == "val loss" else loss, accuracy

    monkeypatch.setattr(train_module, "run_epoch", run_epoch)
    config = tiny_config(
        demo_root, tmp_path, epochs=2, scst_epochs=2, select_by="loss", patience=None
    )
    history = train(config)
    assert history["stage"] == ["xe", "xe", "scst", "scst"]
    assert load_checkpoint(tmp_path / "best_cross_entropy.pt")["epoch"] == 1
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == best


def test_resume_reads_the_best_cider_of_checkpoints_from_before_select_by(demo_root, tmp_path):
    train(tiny_config(demo_root, tmp_path, epochs=1))
    state = load_checkpoint(tmp_path / "last.pt")
    state["best_cider"] = state.pop("best_score") + 100  # no later epoch can beat it
    torch.save(state, tmp_path / "last.pt")
    history = train(tiny_config(demo_root, tmp_path, epochs=2, resume=True))
    assert len(history["epoch"]) == 2
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == 0  # the second epoch did not beat it


def test_resume_refuses_other_architecture(demo_root, tmp_path):
    train(tiny_config(demo_root, tmp_path, epochs=1))
    with pytest.raises(CheckpointError, match="hidden_size: checkpoint 48 vs config 64"):
        train(tiny_config(demo_root, tmp_path, epochs=2, hidden_size=64, resume=True))


def test_nan_loss_stops_with_clear_message(demo_root, tmp_path, monkeypatch):
    train(tiny_config(demo_root, tmp_path, epochs=1))
    before = (tmp_path / "last.pt").read_bytes()
    real, calls = train_module.caption_loss, []

    def nan_at_third_step(*args, **kwargs):
        calls.append(1)
        terms = real(*args, **kwargs)
        return terms._replace(loss=terms.loss * float("nan")) if len(calls) == 3 else terms

    monkeypatch.setattr(train_module, "caption_loss", nan_at_third_step)
    # Read every step or once at the end of the epoch: the message names the step either way.
    for log_every in (1, 50):
        calls.clear()
        with pytest.raises(FloatingPointError, match=r"loss became nan at step 2 .*steps \[2[],]"):
            train(tiny_config(demo_root, tmp_path, epochs=2, resume=True, log_every=log_every))
        assert (tmp_path / "last.pt").read_bytes() == before


def test_losses_are_read_once_per_interval_and_equal_reading_every_step(
    demo_root, tmp_path, monkeypatch
):
    # What the loop did before it kept losses on the device: loss.item() after every step, the
    # epoch's loss the host's float64 sum of item * tokens over the tokens.
    real, seen = train_module.caption_loss, []

    def recording(*args, **kwargs):
        terms = real(*args, **kwargs)
        seen.append((terms.loss.item(), int(terms.tokens), int(terms.correct)))
        return terms

    reads, real_read = [], LossLog.read
    monkeypatch.setattr(train_module, "caption_loss", recording)
    monkeypatch.setattr(
        LossLog, "read", lambda log: (reads.append(len(log.pending)), real_read(log))
    )
    history = train(tiny_config(demo_root, tmp_path / "a", epochs=2, log_every=3))
    steps = len(history["step_loss"]) // 2  # per epoch; the validation passes come in between
    assert steps == 4 and [n for n in reads if n] == [3, 1, 2, 3, 1, 2]  # (val: 2 steps)
    train_steps = [s for k, s in enumerate(seen) if k % (steps + 2) < steps]
    assert history["step_loss"] == [loss for loss, _, _ in train_steps]  # exactly
    first = train_steps[:steps]
    total = 0.0
    for loss, tokens, _ in first:
        total = total + loss * tokens
    assert history["train_loss"][0] == total / sum(t for _, t, _ in first)  # exactly
    assert history["train_accuracy"][0] == sum(c for *_, c in first) / sum(t for _, t, _ in first)
    assert 0 < history["val_accuracy"][1] < 1
    other = train(tiny_config(demo_root, tmp_path / "b", epochs=2, log_every=1))
    assert other["step_loss"] == history["step_loss"] and other["val_loss"] == history["val_loss"]


def test_a_checkpoint_with_every_gpus_rng_resumes_where_one_is_visible(monkeypatch):
    # A machine with one GPU: torch.cuda stands in (no CUDA here), set_rng_state records.
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": torch.full((16,), 7))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device="cuda": restored.append(s))
    state = rng_state()
    assert torch.equal(state["cuda"], torch.full((16,), 7))  # this device's only
    set_rng_state(state)
    assert len(restored) == 1 and torch.equal(restored[0], torch.full((16,), 7))
    # Written by an older version on a machine with eight GPUs: one state each.
    state["cuda"] = [torch.full((16,), k, dtype=torch.uint8) for k in range(8)]
    set_rng_state(state)
    assert len(restored) == 2 and torch.equal(restored[1], state["cuda"][0])


@pytest.mark.parametrize("capability,amp,dtype", [
    ((7, 5), "auto", torch.float16), ((7, 0), "auto", torch.float16),
    ((8, 0), "auto", torch.bfloat16), ((9, 0), "auto", torch.bfloat16),
    ((7, 5), "bf16", torch.bfloat16), ((9, 0), "fp16", torch.float16), ((9, 0), "off", None),
])  # fmt: skip
def test_auto_mixed_precision_takes_bf16_only_where_the_gpu_has_it(
    demo_root, tmp_path, monkeypatch, capability, amp, dtype
):
    # T4 (7.5) and V100 (7.0) emulate bf16, and torch.cuda.is_bf16_supported() says yes there.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    config = tiny_config(demo_root, tmp_path, amp=amp)
    assert train_module.amp_dtype(config, torch.device("cuda", 0)) == dtype
    assert train_module.amp_dtype(config, torch.device("cpu")) is None


def test_each_process_checks_only_its_share_of_the_images(demo_root, tmp_path, monkeypatch):
    split = read_split(demo_root, "val")
    checked = []

    def find(share, *args):
        checked.append(list(share.image_ids))
        return {len(share.image_ids) - 1: f"{share.image_paths[-1]}: cannot read image"}

    monkeypatch.setattr(train_module, "find_unreadable_images", find)
    config = tiny_config(demo_root, tmp_path, skip_bad_images=True)
    n = len(split.image_ids)
    kept, dropped = train_module.drop_unreadable_images(split, config, rank=1, world=2)
    assert checked == [split.image_ids[n // 2 :]]  # rank 1's half only
    assert dropped == 1 and kept.image_ids == split.image_ids[:-1]  # the index maps back
    checked.clear()
    kept, _ = train_module.drop_unreadable_images(split, config, rank=0, world=2)
    assert checked == [split.image_ids[: n // 2]]
    assert kept.image_ids == split.image_ids[: n // 2 - 1] + split.image_ids[n // 2 :]


def test_atomic_checkpoint_write_keeps_old_file(tmp_path, monkeypatch):
    path = save_checkpoint({"config": {}, "model": {"w": torch.ones(3)}}, tmp_path / "c.pt")
    before = path.read_bytes()

    def dies_midway(obj, f, *a, **k):
        with open(f, "wb") as out:
            out.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"config": {}, "model": {"w": torch.zeros(3)}}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def test_frozen_encoder_trains_from_feature_cache(demo_root, tmp_path, monkeypatch, isolated_cache):
    config = tiny_config(
        demo_root, tmp_path / "a", backbone="resnet18", trainable_blocks=0, epochs=1
    )
    before = set((isolated_cache / "features").glob("*.npy"))  # other tests' caches
    train(config)
    files = sorted(set((isolated_cache / "features").glob("*.npy")) - before)
    assert len(files) == 2  # train and val images, each computed once
    cached = np.load(files[0], mmap_mode="r")
    assert cached.dtype == np.float16 and cached.shape[1] == 512 and isinstance(cached, np.memmap)
    # A second run with the same CNN reads the cache: the CNN never runs on images again.
    from model import EncoderCNN

    monkeypatch.setattr(EncoderCNN, "extract", lambda *a: pytest.fail("CNN re-run"))
    history = train(
        tiny_config(demo_root, tmp_path / "b", backbone="resnet18", trainable_blocks=0, epochs=1)
    )
    assert np.isfinite(history["train_loss"]).all()


def test_feature_cache_key_changes_with_weights(demo_root):
    from captioning.data.annotations import read_split
    from captioning.data.loading import make_transform
    from model import EncoderCNN

    split = read_split(demo_root, "val")
    a = EncoderCNN(8, "resnet18", pretrained=False)
    b = EncoderCNN(8, "resnet18", pretrained=False)
    t = make_transform(32)
    assert feature_cache.cache_key(a, split, t) == feature_cache.cache_key(a, split, t)
    assert feature_cache.cache_key(a, split, t) != feature_cache.cache_key(b, split, t)
    assert feature_cache.cache_key(a, split, t) != feature_cache.cache_key(
        a, split, make_transform(48)
    )


def test_image_cache_trains_exactly_as_reading_the_files(
    demo_root, tmp_path, isolated_cache, monkeypatch
):
    plain = train(tiny_config(demo_root, tmp_path / "files", epochs=2))
    cached = train(tiny_config(demo_root, tmp_path / "cached", epochs=2, cache_images=True))
    assert cached["step_loss"] == plain["step_loss"]
    assert (cached["val_loss"], cached["val_cider"]) == (plain["val_loss"], plain["val_cider"])
    from captioning.data.annotations import read_split
    from captioning.data.loading import make_pixel_transform

    for split in ("train", "val"):
        key = feature_cache.cache_key(None, read_split(demo_root, split), make_pixel_transform(32))
        assert np.load(isolated_cache / "images" / f"{key}.npy", mmap_mode="r").dtype == np.uint8
    # Once cached, no image file is decoded again.
    monkeypatch.setattr(data_loader, "load_image", lambda *a: pytest.fail("image file re-read"))
    again = train(tiny_config(demo_root, tmp_path / "again", epochs=2, cache_images=True))
    assert again["step_loss"] == plain["step_loss"]


def test_image_cache_refuses_augmentation(demo_root, tmp_path):
    with pytest.raises(ValueError, match="cache_images: True needs augment=False"):
        tiny_config(demo_root, tmp_path, epochs=1, cache_images=True, augment=True)


def test_image_cache_is_rebuilt_when_an_image_file_changes(demo_root, tmp_path):
    from PIL import Image

    from captioning.data.annotations import read_split

    data = tmp_path / "demo"
    shutil.copytree(demo_root, data)
    split = read_split(data, "val")
    before = feature_cache.cached_images(split, 32, cache_dir=tmp_path / "cache", progress=False)
    changed = split.image_paths[3]
    Image.open(changed).transpose(Image.Transpose.FLIP_TOP_BOTTOM).save(changed)
    os.utime(changed, ns=(1, 1))  # a rewrite within the same clock tick must not go unnoticed
    after = feature_cache.cached_images(split, 32, cache_dir=tmp_path / "cache", progress=False)
    assert np.array_equal(after[3], before[3][:, ::-1, :]) and not np.array_equal(
        after[3], before[3]
    )
    assert np.array_equal(np.delete(after, 3, 0), np.delete(before, 3, 0))
    assert len(list((tmp_path / "cache" / "images").glob("*.npy"))) == 2


def test_image_cache_left_unwritten_when_an_image_is_unreadable(demo_root, tmp_path):
    from captioning.data.annotations import read_split
    from captioning.data.loading import ImageLoadError

    data = tmp_path / "demo"
    shutil.copytree(demo_root, data)
    split = read_split(data, "val")
    with open(split.image_paths[-1], "wb") as f:
        f.write(b"not a png")
    with pytest.raises(ImageLoadError, match=os.path.basename(split.image_paths[-1])):
        feature_cache.cached_images(split, 32, cache_dir=tmp_path / "cache", progress=False)
    assert list((tmp_path / "cache" / "images").iterdir()) == []


def test_fits_real_coco_captions(coco_sample, tmp_path):
    # Train and validate on the same 20 real COCO images: training-set CIDEr must rise. No
    # pretrained weights offline, so the frozen ResNet-18 is random: the decoder memorises the
    # captions slowly (greedy CIDEr near 0.2 for ~20 epochs, then about 1.6 by epoch 30).
    data = tmp_path / "coco"
    (data / "annotations").mkdir(parents=True)
    captions = json.loads((coco_sample / "annotations" / "captions_train2017.json").read_text())
    kept = {image["id"] for image in captions["images"][:20]}
    captions["images"] = [i for i in captions["images"] if i["id"] in kept]
    captions["annotations"] = [a for a in captions["annotations"] if a["image_id"] in kept]
    for split in ("train", "val"):
        (data / "annotations" / f"captions_{split}2017.json").write_text(json.dumps(captions))
        os.symlink(coco_sample / "train2017", data / f"{split}2017")
    config = TrainConfig(
        data_dir=str(data),
        output_dir=str(tmp_path / "run"),
        backbone="resnet18",
        pretrained=False,
        image_size=128,
        vocab_threshold=1,
        embed_size=256,
        hidden_size=512,
        batch_size=8,
        epochs=30,
        lr=5e-3,
        dropout=0.0,
        val_images=None,
        patience=None,
        num_workers=0,
        progress=False,
    )
    history = train(config)
    assert max(history["val_cider"][:5]) < 0.5  # it starts from nothing ...
    assert history["val_cider"][-1] > 1.0  # ... and learns these images' captions
    assert history["train_loss"][-1] < 0.5 * history["train_loss"][0]


def test_learning_curves_show_token_accuracy():
    from captioning.plots import plot_learning_curves

    history = {
        "epoch": [1, 2], "train_loss": [2.0, 1.5], "train_perplexity": [7.4, 4.5],
        "val_loss": [2.1, 1.7], "val_perplexity": [8.2, 5.5], "val_cider": [0.2, 0.4],
        "train_accuracy": [0.30, 0.41], "val_accuracy": [0.28, 0.39],
    }  # fmt: skip
    fig = plot_learning_curves(history)
    panel = next(ax for ax in fig.axes if "token accuracy" in ax.get_title())
    lines = {line.get_label(): list(line.get_ydata()) for line in panel.get_lines()}
    assert lines == {"train": [0.30, 0.41], "val": [0.28, 0.39]}


def test_every_update_is_clipped_to_grad_clip(demo_root, tmp_path):
    # Far below this untrained model's gradient norms (about 1 and more), so every step is
    # clipped: each update's gradient norm is then grad_clip itself, neither more nor less.
    grad_clip, norms = 0.01, []

    def record_norm(optimizer, args, kwargs):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"]
                 if p.grad is not None]  # fmt: skip
        norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))

    from torch.optim.optimizer import register_optimizer_step_pre_hook

    hook = register_optimizer_step_pre_hook(record_norm)
    try:
        history = train(tiny_config(demo_root, tmp_path, epochs=1, grad_clip=grad_clip))
    finally:
        hook.remove()
    assert len(norms) == len(history["step_loss"]) > 0
    assert norms == pytest.approx([grad_clip] * len(norms), rel=1e-4)


def test_the_first_epoch_of_each_stage_forecasts_its_length(demo_root, tmp_path, monkeypatch,
                                                            capsys):  # fmt: skip
    # 60 training images in batches of 16: 4 steps an epoch; forecast after the first 2.
    monkeypatch.setattr(loss_log, "FORECAST_STEPS", 2)
    train(tiny_config(demo_root, tmp_path, epochs=2, scst_epochs=1, log_every=1,
                      trainable_blocks=0, scst_samples=2))  # fmt: skip
    lines = [line for line in capsys.readouterr().out.splitlines() if "the epoch takes" in line]
    assert len(lines) == 2, lines  # cross-entropy epoch 1 and the self-critical epoch, not epoch 2
    assert lines[0].startswith("epoch 1/3: 2 of 4 steps in ") and "on this machine" in lines[0]
    assert lines[1].startswith("epoch 3/3 (self-critical): 2 of 4 steps in ")


def test_a_forecast_scales_the_first_steps_time_to_the_epoch(capsys):
    log = loss_log.LossLog(5, None, "epoch 1/9", "", show_perplexity=False, forecast=100)
    log.announce(20, 6.0)  # 20 steps in 6 s: 100 take 30 s
    log.announce(40, 6.0)  # once only
    assert capsys.readouterr().out.splitlines() == [
        "epoch 1/9: 20 of 100 steps in 6.0 s; the epoch takes about 30 s on this machine"
    ]
    assert loss_log.duration_text(5400) == "1.5 h" and loss_log.duration_text(600) == "10 min"
