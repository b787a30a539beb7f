"""Checkpoints: state dicts plus config and vocabulary, written atomically, read without pickle."""

import dataclasses
import random
from pathlib import Path

import numpy as np
import torch

from captioning.atomic_file import atomic_path
from captioning.backbones import build_backbone
from captioning.data.feature_files import PrecomputedFeatures
from captioning.data.loading import IMAGENET_MEAN, IMAGENET_STD, preprocessing
from captioning.errors import CheckpointError
from captioning.transformer import TransformerDecoder
from model import AttentionDecoder, CaptionModel, DecoderRNN, EncoderCNN

# The decoders that read the CNN's spatial grid (batch, positions, feature_size), not the pooled
# feature: their encoder gives the grid, their feature cache holds it, they have attention maps.
GRID_DECODERS = ("attention", "transformer")

# What the images of checkpoints saved before they recorded it went through (and the resizing of
# those whose record predates its `interpolation`: torchvision's bilinear default), fixed here so
# that a later change of the defaults never changes how those models are fed.
LEGACY_PREPROCESSING = {"resize": "crop", "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                        "interpolation": "bilinear"}  # fmt: skip


def save_checkpoint(state, path):
    """Write `state` to `path` atomically, so no reader (or resumed run) sees half a file."""
    with atomic_path(path, sync=True) as tmp:
        torch.save(state, tmp)
    return Path(path)


def load_checkpoint(path, map_location="cpu"):
    """Read a checkpoint with `weights_only=True` (tensors and plain data only, never code)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError... by cause
        raise CheckpointError(
            f"{path}: not a usable checkpoint ({type(e).__name__}: {str(e).splitlines()[0]}). "
            "Checkpoints are read with weights_only=True, so files holding code are refused; "
            "a truncated file means the run was stopped while an older version wrote it."
        ) from None
    if not isinstance(state, dict) or "config" not in state or "model" not in state:
        raise CheckpointError(f"{path}: not a checkpoint of this project (no 'config'/'model')")
    return state


def rng_state():
    """Python, NumPy and torch RNG states as plain data and tensors (weights_only-safe).

    Of CUDA, only the current device's generator: a run resumed on a machine with another
    number of GPUs restores the one it uses.
    """
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    """Restore what `rng_state` returned."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        # Older checkpoints hold every GPU of the saving machine: take ours, or the first.
        if isinstance(cuda, (list, tuple)):
            index = torch.cuda.current_device()
            cuda = cuda[index] if index < len(cuda) else cuda[0]
        torch.cuda.set_rng_state(cuda)


def submodule_state(state_dict, name):
    """The entries of a `CaptionModel` state dict under `name` ("encoder" or "decoder"), without
    that prefix: what an `EncoderCNN` or a decoder built by hand loads (CVND's way)."""
    prefix = name + "."
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}


def load_model_state(model, state_dict, path, expected):
    """`model.load_state_dict`, but a mismatch names both sides instead of a shape traceback."""
    own = model.state_dict()
    state_dict = backbone_net_keys(state_dict, own)
    problems = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state_dict.items()
        if k in own and own[k].shape != v.shape
    ]
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    if problems or missing or unexpected:
        detail = "; ".join(
            problems[:5]
            + [f"missing {missing[:5]}"] * bool(missing)
            + [f"unexpected {unexpected[:5]}"] * bool(unexpected)
        )
        raise CheckpointError(
            f"{path}: checkpoint does not fit the model being built ({expected}): {detail}"
        )
    model.load_state_dict(state_dict)


def backbone_net_keys(state_dict, model_state):
    """`state_dict` under the adapter's `encoder.backbone.net.` names where `model_state` has them."""
    # Checkpoints saved before backbones.py wrapped torchvision networks other than ResNets in an
    # adapter name those weights `encoder.backbone.<...>`.
    old, new = "encoder.backbone.", "encoder.backbone.net."
    saved_wrapped = any(k.startswith(new) for k in state_dict)
    built_wrapped = any(k.startswith(new) for k in model_state)
    if saved_wrapped or not built_wrapped:
        return state_dict  # ResNets and the demo CNN keep their names; so do newer checkpoints
    return {new + k[len(old) :] if k.startswith(old) else k: v for k, v in state_dict.items()}


def build_model(config, vocab):
    """Encoder and decoder described by `config`."""
    if config.features_dir is not None:  # precomputed features: no CNN, their size
        backbone = PrecomputedFeatures(config.feature_size)
    else:
        backbone = build_backbone(config.backbone, config.pretrained, config.weights_path)
    encoder = EncoderCNN(
        config.embed_size, backbone, config.pretrained, config.weights_path,
        config.trainable_blocks, config.feature_norm, grid=config.decoder in GRID_DECODERS,
        grid_size=config.grid_size,
    )  # fmt: skip
    common = dict(dropout=config.dropout, end_id=vocab.end_id, start_id=vocab.start_id,
                  forget_bias=config.forget_bias)  # fmt: skip
    # Precomputed regions vary in number: the grid decoders read a mask (feature_files).
    regions = dict(region_mask=config.features_dir is not None)
    if config.decoder == "transformer":
        decoder = TransformerDecoder(
            encoder.feature_size, len(vocab), config.embed_size, config.heads,
            config.encoder_layers, config.decoder_layers, config.feed_forward, config.dropout,
            end_id=vocab.end_id, start_id=vocab.start_id, **regions,
        )  # fmt: skip
    elif config.decoder == "attention":
        decoder = AttentionDecoder(
            encoder.feature_size, config.embed_size, config.hidden_size, len(vocab),
            attention_size=config.attention_size, attention_weight=config.attention_weight,
            word_in_query=config.word_in_query, coverage=config.coverage, **common, **regions,
        )  # fmt: skip
    else:
        decoder = DecoderRNN(
            config.embed_size, config.hidden_size, len(vocab), config.num_layers, **common
        )
    return CaptionModel(encoder, decoder, blind=config.blind)


def decoder_sizes(decoder):
    """The config fields that size a decoder of kind `decoder`, besides embed_size."""
    if decoder == "transformer":
        return ("encoder_layers", "decoder_layers", "heads", "feed_forward")
    return ("hidden_size", "num_layers")


def checkpoint_preprocessing(state, config):
    """The checkpoint's `preprocessing` record, with the keys it predates (interpolation) as they
    were then; for a checkpoint without one, that of its `config` with the preprocessing of its
    time."""
    record = state.get("preprocessing")
    if record:
        return {**LEGACY_PREPROCESSING, **record}
    return {**preprocessing(config), **LEGACY_PREPROCESSING}


def load_trained(path, device="cpu", decoder=None):
    """(model in eval mode, vocabulary, config) rebuilt from a checkpoint's config and weights;
    `model.preprocessing` is what its images went through (`checkpoint_preprocessing`).

    `decoder` ("showtell", "attention" or "transformer", or a tuple of them), when given, is
    the kind the caller needs: a checkpoint of another kind is refused.
    """
    from captioning.config import TrainConfig, config_from_dict
    from captioning.data.vocabulary import Vocabulary

    state = load_checkpoint(path)
    config = config_from_dict(TrainConfig, state["config"])
    kinds = (decoder,) if isinstance(decoder, str) else decoder
    if kinds is not None and config.decoder not in kinds:
        wanted = " or ".join(map(repr, kinds))
        raise CheckpointError(
            f"{path}: a checkpoint of a {config.decoder!r} decoder, not {wanted}; "
            f"train one with decoder={kinds[0]!r}"
        )
    vocab = Vocabulary.from_dict(state["vocab"])
    # The checkpoint holds every weight: build without downloading ImageNet weights.
    shell = dataclasses.replace(config, pretrained=False, weights_path=None)
    model = build_model(shell, vocab)
    load_model_state(
        model,
        state["model"],
        path,
        f"vocabulary of {len(vocab)} words, "
        + ", ".join(
            f"{k}={getattr(config, k)}"
            for k in ("decoder", "backbone", "embed_size", *decoder_sizes(config.decoder))
        ),
    )
    model.preprocessing = checkpoint_preprocessing(state, config)
    return model.to(device).eval(), vocab, config
