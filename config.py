"""Run configuration: one dataclass, saved in every checkpoint, with command-line flags made from it."""

import argparse
import dataclasses
import types
from dataclasses import dataclass

ARCHITECTURE_FIELDS = ("backbone", "embed_size", "hidden_size", "num_layers", "feature_norm")


@dataclass
class TrainConfig:
    """Everything a training run depends on; saved in every checkpoint."""

    data_dir: str | None = None  # None: the built-in demo dataset
    layout: str = "auto"  # auto | coco | karpathy | csv
    output_dir: str = "runs/latest"
    vocab_threshold: int = 5
    backbone: str = "resnet50"  # resnet18..resnet152, or smallcnn for small images
    pretrained: bool = True
    weights_path: str | None = None  # local backbone weights instead of a download
    trainable_blocks: int = 0  # 0: frozen CNN + feature cache; k: fine-tune last k; -1: all
    image_size: int = 224
    augment: bool = False  # random crop + flip (fine-tuning only)
    cache_images: bool = False  # unfrozen CNN, no augment: decode and resize each image once
    # (uint8 on disk) instead of every epoch
    feature_norm: str = "batch"  # batch | layer | none: normalisation of the image feature
    embed_size: int = 256
    hidden_size: int = 512
    num_layers: int = 1
    dropout: float = 0.3
    forget_bias: float = 1.0  # initial LSTM forget-gate bias; higher remembers the image longer
    batch_by: str = "image"  # image: batch_size images, each with all its captions;
    # length: batch_size captions of one length (CVND)
    batch_size: int = 64
    captions_per_image: int | None = None  # batch_by=image: a random subset per image and epoch
    epochs: int = 10
    optimizer: str = "adamw"  # adam | adamw
    lr: float = 1e-3
    backbone_lr: float = 1e-4  # for unfrozen CNN blocks of a pretrained backbone
    weight_decay: float = 0.0
    lr_schedule: str = "cosine"  # cosine | constant
    warmup_steps: int = 0
    grad_clip: float = 5.0
    amp: str = "auto"  # auto | bf16 | fp16 | off (CUDA only)
    max_caption_len: int = 20
    val_images: int | None = 500  # images scored by CIDEr after each epoch; None: all
    patience: int | None = 3  # epochs without a better val CIDEr before stopping
    skip_bad_images: bool = False  # drop unreadable images (reported) instead of stopping
    blind: bool = False  # zero image features (the ablation)
    seed: int = 0
    num_workers: int = 2
    device: str = "auto"
    resume: bool = False  # continue from output_dir/last.pt if it exists
    progress: bool = True


def config_from_dict(cls, data):
    """A `cls` from saved values; keys this version does not know are ignored."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


def _flag_type(field):
    """The parser for one field's flag; 'none' means None for optional fields."""
    kinds = [t for t in getattr(field.type, "__args__", (field.type,)) if t is not type(None)]
    kind = kinds[0] if kinds else str
    optional = isinstance(field.type, types.UnionType)
    return lambda text: None if optional and text.lower() == "none" else kind(text)


def parse_config(cls, argv=None, description=None):
    """A `cls` config from command-line flags, one per dataclass field (--data-dir ...)."""
    parser = argparse.ArgumentParser(description=description)
    for field in dataclasses.fields(cls):
        flag = "--" + field.name.replace("_", "-")
        if field.type is bool:
            parser.add_argument(flag, default=field.default, action=argparse.BooleanOptionalAction)
        else:
            parser.add_argument(
                flag,
                default=field.default,
                type=_flag_type(field),
                metavar=getattr(field.type, "__name__", "VALUE").upper(),
            )
    return cls(**vars(parser.parse_args(argv)))
