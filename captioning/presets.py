"""Training presets: the demo's, measured on two CPU cores, and COCO's and Flickr8k's, from the
published recipes."""

import dataclasses
from pathlib import Path

from captioning.config import TrainConfig
from captioning.data.annotations import KARPATHY_FILES, detect_layout
from captioning.demo.dataset import DEFAULT_DEMO_ROOT, read_marker

# Chosen by measurement on 2 CPU cores (docs/demo.md; the variants in docs/what_we_tried.md): the
# images' own 64 px (at 48 px shapes blur into their neighbours: 61% of captions right, not 68%); 32
# images a batch keeps batch norm statistics steady; one of each image's 5 captions per epoch, as
# the CNN learns slowest and needs image passes more than captions (at 20 epochs one caption does as
# well as two, 66% vs 67%, in less time, so 30 epochs fit: 77%); forget-gate bias 5 keeps the image,
# fed once, alive to the last word (bias 1: 19% objects right, not 54%). Decoding PNGs each epoch
# cost 30% of a training pass on two cores: the images are cached decoded, and with nothing left to
# overlap a loader process only competes with the training threads.
DEMO_CONFIG = TrainConfig(
    data_dir=str(DEFAULT_DEMO_ROOT),
    output_dir="outputs/demo/model",
    vocab_threshold=1,
    backbone="smallcnn",
    pretrained=False,
    trainable_blocks=-1,
    image_size=64,
    embed_size=256,
    hidden_size=256,
    dropout=0.0,
    forget_bias=5.0,
    batch_size=32,
    captions_per_image=1,
    epochs=30,
    lr=1e-3,
    val_images=300,
    patience=None,
    num_workers=0,
    cache_images=True,
)


# The attention decoder steps an LSTM cell per word in Python, so its preset is smaller where that
# costs time (word embedding, attention layer) and trains at a higher rate. The doubly stochastic
# regulariser is weak here: at weight 1 it asks each of the 16 grid positions, mostly background on
# these sparse images, for a word's worth of attention per caption, pulling the words' attention off
# the shapes (docs/demo.md; docs/what_we_tried.md has the variants). best.pt is the epoch of the
# lowest val loss: the val CIDEr of 300 images swings with the references' phrasings and kept
# mid-schedule epochs that named fewer objects (docs/what_we_tried.md has the runs). Its beam search
# favours shorter captions (length_penalty -0.5), as chosen on the validation splits of both grid
# decoders' checkpoints (docs/decoding.md).
ATTENTION_DEMO_CONFIG = dataclasses.replace(
    DEMO_CONFIG,
    output_dir="outputs/demo-attention/model",
    decoder="attention",
    embed_size=128,
    attention_size=128,
    attention_weight=0.1,
    word_in_query=True,
    coverage=True,
    lr=2e-3,
    epochs=16,
    select_by="loss",
    length_penalty=-0.5,
)


# Self-critical training after cross-entropy (`demo.py --scst`). Each self-critical epoch
# samples 5 captions for each of the 4000 images: about 3x (Show and Tell) and 2x (attention)
# the time of a cross-entropy epoch here, so the attention run trains 12 cross-entropy epochs
# (its validation CIDEr had levelled off by epoch 12) to stay near 10 minutes. The stage
# maximises CIDEr, so best.pt is picked by val CIDEr. Their beam search ranks by the summed
# log-probability, the rule their figures were measured with.
SCST_DEMO_CONFIG = dataclasses.replace(
    DEMO_CONFIG, output_dir="outputs/demo-scst/model", scst_epochs=3, scst_lr=5e-5
)
ATTENTION_SCST_DEMO_CONFIG = dataclasses.replace(
    ATTENTION_DEMO_CONFIG, output_dir="outputs/demo-attention-scst/model", epochs=12,
    scst_epochs=3, scst_lr=2e-4, select_by="cider", length_penalty=0.0,
)  # fmt: skip


# The transformer's demo preset: 1 encoder and 4 decoder layers 128 wide, 4 heads, no dropout
# (as the LSTM presets), a short warm-up, best.pt by the lowest val loss (as attention). Each
# decoder layer traded for an encoder layer named more objects in three-shape images
# (docs/what_we_tried.md has the runs).
TRANSFORMER_DEMO_CONFIG = dataclasses.replace(
    DEMO_CONFIG,
    output_dir="outputs/demo-transformer/model",
    decoder="transformer",
    embed_size=128,
    encoder_layers=1,
    decoder_layers=4,
    heads=4,
    feed_forward=512,
    dropout=0.0,
    lr=1e-3,
    warmup_steps=200,
    epochs=16,
    select_by="loss",
    length_penalty=-0.5,
)
# Two self-critical epochs, not three, keep its training within 10 minutes on 2 cores
# (docs/demo.md); the cross-entropy epoch kept goes by val loss, as in the preset above.
TRANSFORMER_SCST_DEMO_CONFIG = dataclasses.replace(
    TRANSFORMER_DEMO_CONFIG, output_dir="outputs/demo-transformer-scst/model", epochs=12,
    scst_epochs=2, scst_lr=2e-4, length_penalty=0.0,
)  # fmt: skip


def demo_config(decoder="showtell", scst=False):
    """The demo preset for one decoder, with the self-critical stage or without."""
    if decoder == "attention":
        return ATTENTION_SCST_DEMO_CONFIG if scst else ATTENTION_DEMO_CONFIG
    if decoder == "transformer":
        return TRANSFORMER_SCST_DEMO_CONFIG if scst else TRANSFORMER_DEMO_CONFIG
    return SCST_DEMO_CONFIG if scst else DEMO_CONFIG


# The published COCO recipes, field by field (docs/coco_recipes.md has each value's source and
# the reason wherever this preset differs): ruotianluo/self-critical.pytorch's FC and Att2in
# configs (configs/fc.yml, configs/a2i2.yml, fc_rl.yml; scripts/prepro_labels.py,
# prepro_feats.py) and sgrvinod's a-PyTorch-Tutorial-to-Image-Captioning (train.py, utils.py).
# Both recipes caption from a frozen ImageNet ResNet-101 with 512-wide embeddings and LSTM,
# dropout 0.5 and Adam; ruotianluo trains 30 epochs at 5e-4 on 10 images with 5 captions each
# per step, cuts training captions at 16 words and scores all 5000 validation images. Words
# are kept when seen more than 5 times in both: vocab_threshold counts "at least", hence 6.
# Both train on words without punctuation (ruotianluo: Karpathy's tokens, words only).
# The whole image is resized to 448 x 448 (ruotianluo's features come from the uncropped,
# unresized photo): a ResNet's last map is then 14 x 14, the grid of Show, Attend and Tell.
COCO_CONFIG = TrainConfig(
    data_dir="data/coco",
    vocab_threshold=6,
    backbone="resnet101",
    trainable_blocks=0,
    image_size=448,
    resize="full",
    embed_size=512,
    hidden_size=512,
    dropout=0.5,
    batch_size=10,
    captions_per_image=5,
    epochs=30,
    optimizer="adam",
    lr=5e-4,
    scst_lr=5e-5,
    scst_samples=5,
    max_caption_len=18,
    cut_captions=True,
    strip_punctuation=True,
    val_images=None,
    patience=None,
)

# Attention reads the 14 x 14 grid; its feature cache holds 196 x 2048 float16 values an image,
# about 95 GB for the 118k train and val images of Karpathy's COCO splits (4 x the 7 x 7 grid of
# 224 px; grid_size=7 keeps 448 px and averages it down to that).
ATTENTION_COCO_CHANGES = dict(decoder="attention", grid_size=14)

# ruotianluo's transformer (configs/transformer/transformer.yml): 6 encoder and 6 decoder layers,
# d_model 512 (embed_size), 8 heads, feed-forward 2048, dropout 0.1, 15 epochs, over the same
# 14 x 14 grid (and feature cache) as attention. Its Noam schedule (20000 warm-up steps, peak
# 512 ** -0.5 * 20000 ** -0.5 = 3.125e-4, then falling as 1 / sqrt(step)) becomes the same
# warm-up to the same peak, then cosine: over 15 epochs of 11,300 steps both average 1.6e-4.
# Its self-critical stage (transformer_nsc.yml) runs at 1e-5.
TRANSFORMER_COCO_CHANGES = dict(
    decoder="transformer", grid_size=14, encoder_layers=6, decoder_layers=6, heads=8,
    feed_forward=2048, dropout=0.1, epochs=15, lr=3.125e-4, warmup_steps=20000, scst_lr=1e-5,
)  # fmt: skip
COCO_CHANGES = {"attention": ATTENTION_COCO_CHANGES, "transformer": TRANSFORMER_COCO_CHANGES}


# Self-critical epochs after the cross-entropy ones, as the README's COCO command runs them.
COCO_SCST_EPOCHS = 20


def coco_config(decoder="showtell", scst=False, **changes):
    """The COCO preset for one decoder (docs/coco_recipes.md), with the self-critical stage or
    without, with `changes` applied."""
    preset = COCO_CHANGES.get(decoder, {"decoder": decoder})
    stage = {"scst_epochs": COCO_SCST_EPOCHS} if scst else {}
    return dataclasses.replace(COCO_CONFIG, **{**preset, **stage, **changes})


# Flickr8k (docs/coco_recipes.md#flickr8k): the COCO preset, whose frozen ImageNet ResNet-101
# suits Flickr's photos as well, on data/flickr8k (download.py --dataset flickr8k). Only the
# transformer's warm-up changes: it is counted in steps, and ruotianluo's 20,000 (1.77 of COCO's
# 11,329-step epochs) would outlast all 15 epochs of Flickr8k's 6,000 training images in batches of
# 10 (600 steps each, 9,000 in all); 1,059 steps are the same 1.77 epochs.
FLICKR8K_DATA_DIR = "data/flickr8k"
FLICKR8K_CHANGES = {"transformer": dict(warmup_steps=1059)}


def flickr8k_config(decoder="showtell", scst=False, **changes):
    """The Flickr8k preset for one decoder (docs/coco_recipes.md#flickr8k), with the self-critical
    stage or without, with `changes` applied."""
    preset = {"data_dir": FLICKR8K_DATA_DIR, **FLICKR8K_CHANGES.get(decoder, {})}
    return coco_config(decoder, scst, **{**preset, **changes})


PRESETS = ("auto", "coco", "demo", "flickr8k", "none")


def is_demo_data(data_dir):
    """Whether `data_dir` is the demo dataset: none (the built-in one), the folder that one is
    made in (data/demo, made or not yet), or a folder holding the demo's marker file."""
    if data_dir is None or Path(data_dir).resolve() == DEFAULT_DEMO_ROOT:
        return True
    return read_marker(data_dir) is not None


def is_flickr8k_data(data_dir):
    """Whether `data_dir` is a Karpathy-layout folder whose split file, the one the karpathy reader
    reads, is dataset_flickr8k.json (as download.py --dataset flickr8k leaves it)."""
    if data_dir is None or not Path(data_dir).is_dir():
        return False
    try:
        layout = detect_layout(data_dir)
    except FileNotFoundError:
        return False
    split_files = [name for name in KARPATHY_FILES if (Path(data_dir) / name).exists()]
    return layout == "karpathy" and split_files[0] == "dataset_flickr8k.json"


def choose_auto_preset(data_dir):
    """The preset auto names for `data_dir`: demo, flickr8k or coco."""
    if is_demo_data(data_dir):
        return "demo"
    return "flickr8k" if is_flickr8k_data(data_dir) else "coco"


def preset_config(name, data_dir=None, decoder="showtell"):
    """The config a preset names (train.py's --preset): coco, demo, flickr8k, none (TrainConfig's
    defaults), or auto, with `data_dir` kept: demo for the demo dataset (`is_demo_data`), flickr8k
    for a Flickr8k folder (`is_flickr8k_data`), else coco."""
    if name == "auto":
        # The demo's own settings, as demo.py trains it: coco's would fetch a ResNet-101 for
        # 64 px shapes. data_dir stays none for the built-in dataset, which is made on first use.
        name = choose_auto_preset(data_dir)
        return dataclasses.replace(preset_config(name, decoder=decoder), data_dir=data_dir)
    if name == "coco":
        return coco_config(decoder)
    if name == "flickr8k":
        return flickr8k_config(decoder)
    return demo_config(decoder) if name == "demo" else TrainConfig(decoder=decoder)
