"""Figures people look at: learning curves and images with their captions (matplotlib)."""

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg") if not matplotlib.get_backend().lower().startswith(
    ("module://", "nbagg")
) else None
import matplotlib.pyplot as plt  # noqa: E402

from captioning.atomic_file import atomic_path  # noqa: E402


def _save(fig, path, bbox_inches="tight"):
    if path is None:
        return fig
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches=bbox_inches)
    plt.close(fig)
    return Path(path)


def plot_learning_curves(history, path=None):
    """Loss, perplexity, val CIDEr and token accuracy per epoch, and the self-critical stage's
    rewards if it ran; saved to `path` (PNG) or returned as a figure."""
    epochs = history["epoch"]
    rewards = [r is not None for r in history.get("reward", [])]
    accuracy = any(a is not None for a in history.get("val_accuracy", []))
    panels = ["loss", "perplexity", "cider"] + ["accuracy"] * accuracy + ["reward"] * any(rewards)
    # Fixed margins, not tight_layout: training redraws this every epoch, and the layout
    # passes cost more than the drawing (0.5 s a plot on a CPU core).
    fig, axes = plt.subplots(
        1,
        len(panels),
        figsize=(4.3 * len(panels), 3.6),
        gridspec_kw=dict(left=0.05, right=0.99, bottom=0.15, top=0.91, wspace=0.22),
    )
    ax = dict(zip(panels, axes))
    # None (no train loss in self-critical epochs) is drawn as a gap.
    for key, label in (("train_loss", "train"), ("val_loss", "val")):
        ax["loss"].plot(epochs, history[key], marker="o", label=label)
    for key, label in (("train_perplexity", "train"), ("val_perplexity", "val")):
        ax["perplexity"].plot(epochs, history[key], marker="o", label=label)
    ax["cider"].plot(epochs, history["val_cider"], marker="o", color="tab:green")
    titles = {"loss": "cross-entropy loss", "perplexity": "perplexity",
              "cider": "val CIDEr (greedy)", "accuracy": "token accuracy (teacher forcing)",
              "reward": "self-critical reward (CIDEr-D)"}  # fmt: skip
    if accuracy:
        for key, label in (("train_accuracy", "train"), ("val_accuracy", "val")):
            ax["accuracy"].plot(epochs, history[key], marker="o", label=label)
        ax["accuracy"].legend()
    if any(rewards):
        for key, label in (("reward", "sampled captions"), ("baseline", "baseline")):
            ax["reward"].plot(epochs, history[key], marker="o", label=label)
        positive = ax["reward"].twinx()
        positive.plot(epochs, history["positive_advantage"], ls=":", color="grey")
        positive.set_ylabel("share of positive advantages (dotted)")
        ax["reward"].legend()
        first = epochs[rewards.index(True)]
        for name in ("loss", "perplexity", "cider"):
            ax[name].axvline(first - 0.5, color="grey", ls="--", lw=1)  # self-critical from here
    for name, a in ax.items():
        a.set_title(titles[name])
        a.set_xlabel("epoch")
        a.grid(alpha=0.3)
    ax["loss"].legend()
    ax["perplexity"].legend()
    ax["perplexity"].set_yscale("log")
    return _save(fig, path, bbox_inches=None)


def plot_captioned_images(images, captions, path=None, columns=4, titles=None):
    """A grid of images (PIL or HxWx3 arrays), each caption (then its title, if any) written under it."""
    texts = [
        _wrap(caption, 34) + (_wrap(titles[k], 34) if titles else [])
        for k, caption in enumerate(captions)
    ]
    rows = max(1, math.ceil(len(images) / columns))
    # Room under each row for its longest text: tight_layout does not see axes text.
    lines = max((len(t) for t in texts), default=1)
    fig, axes = plt.subplots(
        rows, columns, figsize=(3.2 * columns, (3.1 + 0.17 * lines) * rows), squeeze=False
    )
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, text in zip(axes.flat, images, texts):
        ax.imshow(image)
        ax.text(
            0.5, -0.04, "\n".join(text), transform=ax.transAxes, ha="center", va="top", fontsize=9
        )
    fig.tight_layout()
    fig.subplots_adjust(hspace=0.06 * lines + 0.1)
    return _save(fig, path)


def plot_attention(image, words, weights, path=None, columns=5):
    """One panel per generated word: the image with that word's attention map over it.

    `image` is a PIL image or an (H, W, 3) array; `weights` (words, positions) come from the
    attention decoder over a square grid of positions, upsampled here to the image's size.
    """
    import numpy as np

    pixels = np.asarray(image)
    weights = np.asarray(weights, dtype=np.float64)
    side = math.isqrt(weights.shape[1])
    if side * side != weights.shape[1]:
        raise ValueError(f"attention over {weights.shape[1]} positions is not a square grid")
    rows = math.ceil(len(words) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.4 * rows), squeeze=False)
    height, width = pixels.shape[:2]
    for ax in axes.flat:
        ax.axis("off")
    for ax, word, alpha in zip(axes.flat, words, weights):
        ax.imshow(pixels)
        # Nearest-neighbour blocks: each block is one grid position the decoder attended to.
        ax.imshow(alpha.reshape(side, side), cmap="jet", alpha=0.45,
                  extent=(-0.5, width - 0.5, height - 0.5, -0.5),
                  interpolation="nearest", vmin=0.0, vmax=max(float(alpha.max()), 1e-9))  # fmt: skip
        ax.set_title(word, fontsize=10)
    return _save(fig, path)


def _wrap(text, width):
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + [line] if line else lines
