"""timm's image models as backbones ("timm:<model name>"): the names timm knows, the preprocessing
each model's weights were trained with, and the model itself; timm is imported only when one is
named (it is an optional extra: pip install timm)."""

import dataclasses

from captioning.errors import ConfigError
from model import WeightsError

TIMM_PREFIX = "timm:"


def timm_model_name(backbone):
    """The timm model a backbone name names ("timm:vit_base_patch16_clip_224.openai" ->
    "vit_base_patch16_clip_224.openai"), or None for a torchvision or the demo's backbone."""
    return backbone[len(TIMM_PREFIX) :] if backbone.startswith(TIMM_PREFIX) else None


def import_timm(backbone, field="backbone"):
    """The timm module; a `ConfigError` naming `field` and how to install it when it is missing."""
    try:
        import timm
    except ImportError:
        raise ConfigError(
            f"{field}: {backbone!r} needs timm, which is not installed; pip install timm (in "
            "this project: pip install -e .[timm])"
        ) from None
    return timm


def pretrained_cfg(backbone, field="backbone"):
    """timm's pretrained config of backbone "timm:<model name>" (its default tag's when the name
    has none): where its weights come from and what its images went through; a `ConfigError`
    naming `field` for a model or tag timm does not know."""
    timm = import_timm(backbone, field)
    name = timm_model_name(backbone)
    architecture, tag = timm.models.split_model_name_tag(name)
    if not name or not timm.is_model(architecture):
        raise ConfigError(
            f"{field}: {backbone!r} is not allowed; timm has no model {name!r} (timm.list_models() "
            "names them; CLIP towers: timm.list_models('*clip*', pretrained=True), e.g. "
            "timm:vit_base_patch16_clip_224.openai)"
        )
    try:
        return timm.models.get_pretrained_cfg(name)
    except RuntimeError:  # "Invalid pretrained tag"
        tags = [n.partition(".")[2] for n in timm.list_pretrained(f"{architecture}.*")]
        raise ConfigError(
            f"{field}: {backbone!r} is not allowed; timm has no weights tagged {tag!r} for "
            f"{architecture}; its tags: {', '.join(tags) or 'none'}"
        ) from None


def has_weights(cfg):
    """Whether a timm pretrained config says where to download weights from."""
    return bool(cfg is not None and (cfg.hf_hub_id or cfg.url or cfg.file))


def check_timm_backbone(backbone, pretrained=False, weights_path=None, field="backbone"):
    """Raise `ConfigError` (naming `field`) unless timm is installed and knows the model of
    "timm:<model name>", with weights to download when `pretrained` and no `weights_path`."""
    cfg = pretrained_cfg(backbone, field)
    if pretrained and weights_path is None and not has_weights(cfg):
        raise ConfigError(
            f"{field}: {backbone!r} is not allowed with pretrained=True: timm has no weights "
            "for it; name a tagged model (timm.list_pretrained()), or train it from random "
            "weights with pretrained=False (--no-pretrained)"
        )


def timm_data_config(backbone):
    """What the images of backbone "timm:<model name>" went through when its weights were trained:
    timm's resolved data config (input_size, interpolation, mean, std, crop_pct, crop_mode) and
    fixed_input_size (True for a ViT, whose position embeddings fit one size)."""
    import timm.data

    cfg = pretrained_cfg(backbone)
    return {
        **timm.data.resolve_data_config(pretrained_cfg=dataclasses.asdict(cfg)),
        "fixed_input_size": bool(cfg.fixed_input_size),
    }


def fixed_input_size(backbone):
    """(height, width): the one input size of a timm model that takes no other (a ViT); None for
    one that takes any size, or for a backbone not from timm."""
    if timm_model_name(backbone) is None:
        return None
    config = timm_data_config(backbone)
    return tuple(config["input_size"][1:]) if config["fixed_input_size"] else None


def weights_source(cfg):
    """(where timm downloads a model's weights from, the folder it keeps them in)."""
    if cfg.hf_hub_id:
        from huggingface_hub import constants

        return f"the Hugging Face hub ({cfg.hf_hub_id})", constants.HF_HUB_CACHE  # HF_HOME moves it
    import torch

    return cfg.url, f"{torch.hub.get_dir()}/checkpoints"


def create_timm_model(backbone, pretrained=True, weights_path=None):
    """timm's model of "timm:<model name>" without its classifier (num_classes=0), with its
    pretrained weights (`pretrained`: downloaded from the Hugging Face hub once, then cached), a
    local file's (`weights_path`: the hub's model.safetensors or a state dict, read by timm with
    weights_only=True) or random ones."""
    check_timm_backbone(backbone, pretrained, weights_path)
    timm = import_timm(backbone)
    name = timm_model_name(backbone)
    if weights_path is not None:
        # timm reads the file as it reads a download: its key mapping and classifier removal apply.
        try:
            return timm.create_model(name, pretrained=True, num_classes=0,
                                     pretrained_cfg_overlay={"file": str(weights_path)})  # fmt: skip
        except FileNotFoundError:
            raise FileNotFoundError(f"{weights_path}: weights file not found") from None
        except Exception as e:  # a pickle refused, keys or shapes that do not fit, a bad file
            detail = " ".join(str(e).split())[:300]
            raise WeightsError(
                f"{weights_path}: not usable {backbone} weights ({type(e).__name__}: {detail}); "
                "give the model.safetensors of its Hugging Face hub repository, or a state dict "
                "saved with torch.save(model.state_dict(), path)"
            ) from None
    if not pretrained:
        return timm.create_model(name, pretrained=False, num_classes=0)
    try:
        return timm.create_model(name, pretrained=True, num_classes=0)
    except OSError as e:  # huggingface_hub's LocalEntryNotFoundError, a connection error
        source, cache = weights_source(pretrained_cfg(backbone))
        detail = " ".join(str(e).split()).split(". ")[0][:200]  # huggingface_hub's run on
        raise WeightsError(
            f"Could not download the pretrained weights of {backbone} from {source} "
            f"({type(e).__name__}: {detail}). Connect to the internet once (timm keeps them in "
            f"{cache}; with HF_HUB_OFFLINE=1 it reads that cache without trying the network), "
            "or pass weights_path=<local model.safetensors>, or train from random weights with "
            "--no-pretrained (pretrained=False)."
        ) from None
