"""Run configuration: one dataclass, checked when made, saved in every checkpoint, flags made from it."""

import argparse
import dataclasses
import math
import numbers
import re
import types
from dataclasses import dataclass, field

from captioning.backbones import check_backbone
from captioning.data.annotations import LAYOUTS
from captioning.data.loading import RESIZE_MODES
from captioning.errors import ConfigError
from captioning.timm_models import fixed_input_size

# What a resumed run may change: how long and where it runs, never what it trains.
RESUMABLE_CHANGES = (
    "epochs", "patience", "resume", "progress", "num_workers", "device", "amp",
    "output_dir", "data_dir", "val_images", "skip_bad_images", "scst_epochs", "log_every",
    "length_penalty", "collective_timeout", "features_dir",
)  # fmt: skip
DEVICE_PATTERN = r"auto|cpu|mps|cuda(:\d+)?"


def option(default, help, choices=None, low=None, high=None, low_open=False, high_open=False,
           before=None):  # fmt: skip
    """A config field with its explanation (shown by --help) and the values it accepts;
    `before`: the value that configs saved before the field existed had (None: the default)."""
    limits = dict(choices=choices, low=low, high=high, low_open=low_open, high_open=high_open)
    return field(default=default, metadata={"help": help, "before": before, **limits})


@dataclass
class TrainConfig:
    """Everything a training run depends on; checked when made and saved in every checkpoint."""

    data_dir: str | None = option(None, "dataset root; none: the built-in demo dataset")
    layout: str = option("auto", "annotation layout of data_dir", choices=LAYOUTS)
    output_dir: str = option("runs/latest", "where checkpoints, history and curves go")
    features_dir: str | None = option(
        None, "precomputed image features instead of images and a CNN: a folder of one file per "
        "image, <image id>.npy (a pooled vector) or <image id>.npz (its 'feat' array of regions); "
        "none: images",
    )  # fmt: skip
    feature_size: int | None = option(
        None, "size of the precomputed features; none: read from features_dir's files", low=1
    )
    vocab_threshold: int = option(5, "keep words seen at least this often", low=1)
    # Off by default, as the demo's figures were made and as checkpoints from before the option
    # trained (its default is their value); the COCO preset turns it on.
    strip_punctuation: bool = option(
        False, "words only: punctuation tokens (. , ; ...) dropped from the training and "
        "validation captions, so from the vocabulary too, as the published COCO recipes train",
    )  # fmt: skip
    backbone: str = option(
        "resnet50",
        "image network: a torchvision classification network by name (resnet50, vgg16, "
        "efficientnet_b0, convnext_tiny, vit_b_16, ...: backbones.TORCHVISION_BACKBONES), smallcnn "
        "for small images, or timm:<model name> for one of timm's (pip install timm), such as "
        "the CLIP tower timm:vit_base_patch16_clip_224.openai, fed as its weights were trained",
    )
    pretrained: bool = option(
        True, "pretrained weights for the CNN, downloaded once: ImageNet's, or for timm:NAME the "
        "weights its tag names",
    )  # fmt: skip
    weights_path: str | None = option(None, "local CNN weights file instead of a download")
    trainable_blocks: int = option(
        0, "CNN blocks trained: 0 frozen (feature cache), k the last k, -1 all", low=-1, high=4
    )
    image_size: int = option(224, "images are resized and cropped to this many pixels", low=16)
    resize: str = option(
        "crop", "crop: shorter side to image_size, centre crop (random crop with augment); full: "
        "the whole image to image_size x image_size, aspect not kept (flip only with augment)",
        choices=RESIZE_MODES,
    )  # fmt: skip
    augment: bool = option(False, "random crop and flip (fine-tuning only)")
    cache_images: bool = option(
        False, "unfrozen CNN without augment: decode and resize each image once (uint8 on disk)"
    )
    feature_norm: str = option(
        "batch", "normalisation of the image feature", choices=("batch", "layer", "none")
    )
    decoder: str = option(
        "showtell",
        "showtell: the image seen once, pooled (Show and Tell); attention: soft attention over "
        "the CNN's grid at every word (Show, Attend and Tell); transformer: a transformer "
        "encoder over the CNN's grid and a causal transformer decoder over the words",
        choices=("showtell", "attention", "transformer"),
    )
    grid_size: int | None = option(
        None, "attention: the CNN grid pooled to grid_size x grid_size; none: as it is", low=1
    )
    attention_size: int | None = option(
        None, "attention: size of the additive attention layer; none: hidden_size", low=1
    )
    attention_weight: float = option(
        1.0, "attention: weight of the doubly stochastic attention regulariser", low=0
    )
    # Off: Show, Attend and Tell as published. Older checkpoints had both built in.
    word_in_query: bool = option(
        False, "attention: the word just read joins the hidden state in the attention query",
        before=True,
    )  # fmt: skip
    coverage: bool = option(
        False, "attention: the attention each position has had so far enters its score "
        "(coverage, Tu et al. 2016)", before=True,
    )  # fmt: skip
    # The transformer's width is embed_size and its dropout is dropout (their help says so); it
    # reads the grid that grid_size sizes, as attention does.
    encoder_layers: int = option(6, "transformer: encoder layers over the CNN grid", low=1)
    decoder_layers: int = option(6, "transformer: decoder layers over the words", low=1)
    heads: int = option(8, "transformer: attention heads (embed_size must be a multiple)", low=1)
    feed_forward: int = option(2048, "transformer: units of each layer's feed-forward block", low=1)
    embed_size: int = option(
        256, "image feature and word embedding size; transformer: its width (d_model)", low=1
    )
    hidden_size: int = option(512, "LSTM hidden units", low=1)
    num_layers: int = option(1, "LSTM layers", low=1)
    dropout: float = option(
        0.3, "dropout on embeddings and LSTM outputs; transformer: on embeddings, attention "
        "weights and every sublayer's output (nn.TransformerDecoderLayer's dropout)",
        low=0, high=1, high_open=True,
    )  # fmt: skip
    forget_bias: float = option(1.0, "initial LSTM forget-gate bias; higher keeps the image longer")
    batch_by: str = option(
        "image",
        "image: batch_size images with all their captions; length: captions of one length (CVND)",
        choices=("image", "length"),
    )
    batch_size: int = option(64, "images (batch_by=image) or captions per batch and process", low=1)
    captions_per_image: int | None = option(
        None, "batch_by=image: a random subset of each image's captions per epoch; none: all", low=1
    )
    epochs: int = option(10, "training epochs", low=1)
    optimizer: str = option("adamw", "optimizer", choices=("adam", "adamw"))
    lr: float = option(1e-3, "learning rate", low=0, low_open=True)
    backbone_lr: float = option(
        1e-4, "learning rate of unfrozen blocks of a pretrained CNN", low=0, low_open=True
    )
    weight_decay: float = option(0.0, "weight decay", low=0)
    lr_schedule: str = option(
        "cosine", "learning rate after warm-up, per step", choices=("cosine", "constant")
    )
    warmup_steps: int = option(0, "steps of linear learning-rate warm-up", low=0)
    grad_clip: float = option(5.0, "gradient norm clip", low=0, low_open=True)
    amp: str = option(
        "auto", "mixed precision on CUDA (auto: bf16 where supported)",
        choices=("auto", "bf16", "fp16", "off"),
    )  # fmt: skip
    scst_epochs: int = option(
        0, "self-critical epochs (SCST: CIDEr-D of sampled captions as the reward) after the "
        "cross-entropy ones, starting from the best cross-entropy weights", low=0,
    )  # fmt: skip
    scst_lr: float = option(5e-5, "learning rate of the self-critical stage", low=0, low_open=True)
    scst_samples: int = option(5, "self-critical: captions sampled per image", low=1)
    scst_baseline: str = option(
        "mean",
        "self-critical baseline: mean, the mean reward of the image's other samples; greedy, the "
        "reward of the greedy caption (Rennie et al.)",
        choices=("mean", "greedy"),
    )
    scst_temperature: float = option(
        1.0, "self-critical: sampling temperature", low=0, low_open=True
    )
    init_from: str | None = option(
        None, "a cross-entropy checkpoint: skip that stage, start the self-critical one from it"
    )
    max_caption_len: int = option(
        20, "longest generated caption, <start> and <end> included", low=2
    )
    length_penalty: float = option(
        0.0, "beam search's default for this model (evaluate, caption): captions ranked by "
        "summed log-probability / length ** length_penalty; 0: the sum, below 0: shorter "
        "captions favoured; choose it on the validation split",
    )  # fmt: skip
    # Off by default: the demo trains on whole captions (up to 24 words), as its figures were made.
    cut_captions: bool = option(
        False, "cut training captions to what decoding can give: max_caption_len - 2 words, then "
        "<end> (counted and printed once per run)",
    )  # fmt: skip
    val_images: int | None = option(
        500, "validation images scored by CIDEr after each epoch; none: all", low=1
    )
    select_by: str = option(
        "cider", "the validation figure that picks best.pt and counts patience: cider (the "
        "highest CIDEr) or loss (the lowest cross-entropy); self-critical epochs go by CIDEr, "
        "the figure they raise",
        choices=("cider", "loss"),
    )  # fmt: skip
    patience: int | None = option(
        3, "epochs without a better validation figure (select_by) before stopping; none: never "
        "stop", low=1,
    )  # fmt: skip
    log_every: int = option(
        50, "training steps between reads of the loss from the device (progress bar, the check "
        "for a non-finite loss); each read waits for the GPU", low=1,
    )  # fmt: skip
    skip_bad_images: bool = option(False, "drop unreadable images (reported) instead of stopping")
    blind: bool = option(False, "zero image features: how much of a caption comes from the image")
    seed: int = option(0, "random seed", low=0)
    num_workers: int | None = option(
        None, "data-loading processes per training process; none: the CPUs this process may "
        "use (shared among the processes of a machine), at most 8", low=0,
    )  # fmt: skip
    device: str = option("auto", "auto (CUDA when available), cpu, cuda, cuda:N or mps")
    collective_timeout: float = option(
        30.0, "several processes: minutes a process waits for the others in a collective before "
        "the run stops (NCCL's own default, 10, is short of a cache share's lag on a slow shared "
        "disk at COCO scale)", low=0, low_open=True,
    )  # fmt: skip
    resume: bool = option(False, "continue from output_dir/last.pt if it exists")
    progress: bool = option(
        True,
        "progress bars: on when output is a terminal; off in logs and CI unless "
        "CAPTIONING_PROGRESS=1",
    )

    def choose_length_penalty(self, given=None):
        """Beam search's length penalty: `given`, or this model's `length_penalty` when None."""
        return self.length_penalty if given is None else given

    @property
    def reads_features(self):
        """Whether training reads cached backbone features rather than images: with a frozen
        CNN (the feature cache), precomputed features, or blind (zeros, no images)."""
        return self.blind or self.trainable_blocks == 0 or self.features_dir is not None

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            check_value(f, value)
            kind = field_kinds(f)[0][0]
            if value is not None and kind in (int, float):
                # Plain Python numbers: checkpoints and config.json hold no NumPy scalars.
                setattr(self, f.name, kind(value))
        check_backbone(self.backbone, self.pretrained, self.weights_path, "TrainConfig.backbone")
        size = fixed_input_size(self.backbone)
        if size is not None and size != (self.image_size, self.image_size):
            raise ConfigError(
                f"TrainConfig.image_size: {self.image_size} is not allowed with backbone "
                f"{self.backbone!r}, which takes {size[0]}x{size[1]} images only (a ViT's "
                f"position embeddings fit one size); set image_size={size[0]}"
            )
        if not re.fullmatch(DEVICE_PATTERN, self.device):
            raise ConfigError(
                f"TrainConfig.device: {self.device!r} is not allowed; use auto, cpu, cuda, "
                "cuda:N or mps"
            )
        if self.scst_epochs and self.scst_baseline == "mean" and self.scst_samples < 2:
            raise ConfigError(
                "TrainConfig.scst_samples: 1 is not allowed with scst_baseline='mean' (the "
                "baseline is the mean of the image's other samples); use 2 or more, or 'greedy'"
            )
        if self.init_from is not None and not self.scst_epochs:
            raise ConfigError(
                "TrainConfig.init_from: it starts the self-critical stage; set scst_epochs >= 1"
            )
        if self.decoder == "transformer" and self.embed_size % self.heads:
            raise ConfigError(
                f"TrainConfig.heads: {self.heads} does not divide embed_size {self.embed_size} "
                "(the transformer's width); choose heads and embed_size to match"
            )
        if self.features_dir is not None and self.blind:
            raise ConfigError(
                "TrainConfig.features_dir: a blind model reads no features; leave one of "
                "features_dir and blind unset"
            )
        if self.features_dir is not None and (self.trainable_blocks or self.cache_images):
            raise ConfigError(
                "TrainConfig.features_dir: precomputed features replace the CNN and the images; "
                "set trainable_blocks=0 and cache_images=False"
            )
        if self.cache_images and self.augment:
            raise ConfigError(
                "TrainConfig.cache_images: True needs augment=False (a cached image is cropped "
                "once); set one of them to False"
            )


def field_kinds(f):
    """The types a field accepts, None excluded, and whether None is allowed."""
    kinds = [t for t in getattr(f.type, "__args__", (f.type,)) if t is not type(None)]
    return kinds, isinstance(f.type, types.UnionType)


def check_value(f, value):
    """Raise `ConfigError` unless `value` has field `f`'s type and lies in its choices and range."""
    kinds, optional = field_kinds(f)
    if value is None and optional:
        return
    name, meta = f"TrainConfig.{f.name}", f.metadata
    kind = kinds[0]
    # NumPy numbers count: a notebook's np.int64(32) is a batch size.
    accepted = {int: numbers.Integral, float: numbers.Real}.get(kind, kind)
    if isinstance(value, bool) != (kind is bool) or not isinstance(value, accepted):
        expected = kind.__name__ + (" or None" if optional else "")
        raise ConfigError(f"{name}: {value!r} is not allowed; it must be a {expected}")
    if meta.get("choices") is not None and value not in meta["choices"]:
        allowed = ", ".join(map(repr, meta["choices"]))
        raise ConfigError(f"{name}: {value!r} is not allowed; choose one of {allowed}")
    if kind in (int, float):
        low, high = meta.get("low"), meta.get("high")
        too_low = low is not None and (value <= low if meta["low_open"] else value < low)
        too_high = high is not None and (value >= high if meta["high_open"] else value > high)
        if too_low or too_high or (kind is float and not math.isfinite(value)):
            raise ConfigError(f"{name}: {value!r} is not allowed; it must be {describe_range(f)}")


def describe_range(f):
    """Words for a numeric field's allowed values: 'at least 1', 'in [0, 1)'."""
    meta = f.metadata
    low, high = meta.get("low"), meta.get("high")
    if low is not None and high is not None:
        return (
            f"in {'(' if meta['low_open'] else '['}{low}, {high}{')' if meta['high_open'] else ']'}"
        )
    if low is not None:
        return f"{'above' if meta['low_open'] else 'at least'} {low}"
    if high is not None:
        return f"{'below' if meta['high_open'] else 'at most'} {high}"
    return "a finite number"


def config_from_dict(cls, data):
    """A `cls` from saved values; keys this version does not know are ignored, and fields the
    saved config predates take the value they had then (their `before`)."""
    fields = dataclasses.fields(cls)
    older = {f.name: f.metadata["before"] for f in fields if f.metadata.get("before") is not None}
    names = {f.name for f in fields}
    return cls(**{**older, **{k: v for k, v in data.items() if k in names}})


def resume_conflicts(saved, config):
    """'field: checkpoint X vs config Y' for each field a resumed run may not change."""
    saved = dataclasses.asdict(config_from_dict(type(config), saved))
    return [
        f"{f.name}: checkpoint {saved[f.name]!r} vs config {getattr(config, f.name)!r}"
        for f in dataclasses.fields(config)
        if f.name not in RESUMABLE_CHANGES and saved[f.name] != getattr(config, f.name)
    ]


def _flag_type(f):
    """The parser for one field's flag; 'none' means None for optional fields."""
    kinds, optional = field_kinds(f)
    kind = kinds[0] if kinds else str
    return lambda text: None if optional and text.lower() == "none" else kind(text)


def parse_config(cls, argv=None, description=None, base=None, parents=()):
    """A `cls` config from command-line flags, one per dataclass field (--data-dir ...), whose
    defaults are `base`'s values (None: the dataclass's); `parents`' flags are shown, not kept."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        parents=list(parents),
    )  # fmt: skip
    fields = dataclasses.fields(cls)
    for f in fields:
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        default = f.default if base is None else getattr(base, f.name)
        if f.type is bool:
            parser.add_argument(
                flag, default=default, action=argparse.BooleanOptionalAction, help=help_text
            )
        else:
            choices = f.metadata.get("choices")
            listed = choices and len(choices) <= 10  # the backbones are named in the help text
            metavar = "{" + ",".join(choices) + "}" if listed else f.name.upper()
            parser.add_argument(
                flag, default=default, type=_flag_type(f), metavar=metavar, help=help_text
            )
    try:
        values = vars(parser.parse_args(argv))
        return cls(**{f.name: values[f.name] for f in fields})
    except ConfigError as e:
        parser.error(str(e))


FIELDS_BEGIN = "<!-- fields: generated by make docs -->"
FIELDS_END = "<!-- end of fields -->"


def _markdown_cell(text):
    """Text safe in a Markdown table cell: no column break, no HTML tag (`<end>`)."""
    return str(text).replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def fields_markdown(cls=TrainConfig):
    """A Markdown table of every field: its flag, default, allowed values, `--help` text and
    whether a resumed run may change it (docs/training.md holds it; `make docs` rewrites it)."""
    rows = [
        "| field (flag) | default | allowed | meaning | `--resume` may change |",
        "|---|---|---|---|---|",
    ]
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        kinds, optional = field_kinds(f)
        choices = f.metadata.get("choices")
        default = "none" if f.default is None else f.default
        if f.type is bool:
            flag, allowed = f"{flag}, --no-{flag[2:]}", "on, off"
            default = "on" if f.default else "off"
        elif choices:  # as parse_config: a long list (the backbones) is named in the help text
            allowed = ", ".join(map(str, choices)) if len(choices) <= 10 else "see meaning"
        elif kinds[0] in (int, float):
            allowed = describe_range(f)
        else:
            allowed = "text"
        allowed += ", or none" if optional else ""
        cells = [f"`{f.name}` (`{flag}`)", default, allowed, f.metadata.get("help", "")]
        cells.append("yes" if f.name in RESUMABLE_CHANGES else "")
        rows.append("| " + " | ".join(map(_markdown_cell, cells)) + " |")
    return "\n".join(rows) + "\n"


def write_fields_doc(path="docs/training.md"):
    """Rewrite the table between FIELDS_BEGIN and FIELDS_END in `path` with `fields_markdown()`."""
    from pathlib import Path

    text = Path(path).read_text(encoding="utf-8")
    head, rest = text.split(FIELDS_BEGIN + "\n", 1)
    tail = rest.split(FIELDS_END, 1)[1]
    table = fields_markdown()
    Path(path).write_text(f"{head}{FIELDS_BEGIN}\n{table}{FIELDS_END}{tail}", encoding="utf-8")
