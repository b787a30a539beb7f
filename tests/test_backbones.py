"""Any torchvision classification backbone by name: pooled vector and grid, captions of a real COCO
image, local weights, checkpoints saved before the adapter, clear errors for unknown names and
failed downloads."""

import ast
import dataclasses
import sys
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision

import model as model_module
from captioning.backbones import TORCHVISION_BACKBONES, build_backbone
from captioning.checkpoint import build_model, load_trained, save_checkpoint
from captioning.config import ConfigError, TrainConfig
from captioning.data.annotations import read_split
from captioning.data.loading import load_image, make_transform
from captioning.data.vocabulary import Vocabulary
from captioning.decoding import decode_captions
from model import EncoderCNN

FAMILIES = ["vgg16", "efficientnet_b0", "convnext_tiny", "vit_b_16", "resnet50", "regnet_x_400mf",
            "swin_t", "densenet121"]  # fmt: skip


@pytest.fixture(scope="module")
def coco_images(coco_sample):
    """Two real COCO sample images at 224 px, and a vocabulary of their split's captions."""
    split = read_split(coco_sample, "val")
    transform = make_transform(224)
    images = torch.stack([transform(load_image(p)) for p in split.image_paths[:2]])
    vocab = Vocabulary(vocab_threshold=1, vocab_file=None, captions=split.tokenized())
    return images, vocab


@pytest.mark.parametrize("name", FAMILIES)
def test_each_family_gives_pooled_features_and_grid_and_captions_a_coco_image(name, coco_images):
    images, vocab = coco_images
    assert name in TORCHVISION_BACKBONES
    torch.manual_seed(0)
    encoder = EncoderCNN(32, build_backbone(name, pretrained=False)).eval()
    with torch.no_grad():
        pooled = encoder.extract(images)  # (2, feature_size)
        grid = encoder.extract_grid(images)  # (2, positions, feature_size)
    assert pooled.shape == (2, encoder.feature_size) and grid.shape[::2] == (
        2,
        encoder.feature_size,
    )
    assert grid.shape[1] == (196 if name == "vit_b_16" else 49)  # 7x7 at 224 px; ViT: 14x14
    # Relative to the features' scale: random EfficientNet weights give values near 1e-14.
    scale = grid.abs().max()
    if name != "vit_b_16":  # the pooled vector is the grid's average (ViT: its class token)
        assert (pooled - grid.mean(dim=1)).abs().max() <= 1e-4 * scale
    if name != "vgg16":  # and what torchvision's own forward gives its classifier (VGG: 7x7)
        net = encoder.backbone if name == "resnet50" else encoder.backbone.net
        with torch.no_grad():
            own = net(images).flatten(1)
        assert (pooled - own).abs().max() <= 1e-4 * own.abs().max()
    assert (grid[0] - grid[1]).abs().max() > 1e-2 * scale  # two images, two grids
    for decoder in ("showtell", "attention"):
        config = TrainConfig(backbone=name, pretrained=False, decoder=decoder, embed_size=32,
                             hidden_size=32, max_caption_len=6)  # fmt: skip
        captioner = build_model(config, vocab).eval()
        with torch.no_grad():
            ids, captions = decode_captions(captioner.decoder, captioner.encode(images), vocab,
                                            max_len=6)  # fmt: skip
        assert len(captions) == 2 and all(1 < len(row) <= 6 for row in ids)
        assert all(isinstance(c, str) for c in captions)


def test_trainable_blocks_unfreeze_the_last_stages():
    encoder = EncoderCNN(32, build_backbone("vgg16", pretrained=False), trainable_blocks=1)
    trainable = {n for n, p in encoder.backbone.net.named_parameters() if p.requires_grad}
    # VGG16's last block: the three 3x3 convolutions after the fourth max-pooling layer.
    assert trainable == {f"features.{k}.{w}" for k in (24, 26, 28) for w in ("weight", "bias")}
    vit = EncoderCNN(32, build_backbone("vit_b_16", pretrained=False), trainable_blocks=2)
    layers = {n.split(".")[2] for n, p in vit.backbone.net.named_parameters() if p.requires_grad}
    assert layers == {f"encoder_layer_{k}" for k in range(6, 12)}  # 12 layers in 4 groups


def test_a_local_weights_file_is_loaded(tmp_path):
    torch.manual_seed(1)
    source = torchvision.models.efficientnet_b0(weights=None)
    torch.save(source.state_dict(), tmp_path / "weights.pth")
    backbone = build_backbone("efficientnet_b0", weights_path=str(tmp_path / "weights.pth"))
    mine = backbone.net.state_dict()
    assert all(torch.equal(mine[k], v) for k, v in source.state_dict().items() if k in mine)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        build_backbone("convnext_tiny", weights_path=str(tmp_path / "missing.pth"))
    with pytest.raises(RuntimeError, match="weights.pth: not usable convnext_tiny weights"):
        build_backbone("convnext_tiny", weights_path=str(tmp_path / "weights.pth"))


def test_a_checkpoint_saved_before_the_adapter_loads(tmp_path):
    vocab = Vocabulary(vocab_threshold=1, vocab_file=None, captions=[["a", "cat"]])
    config = TrainConfig(backbone="squeezenet1_0", pretrained=False, embed_size=8, hidden_size=8)
    torch.manual_seed(0)
    captioner = build_model(config, vocab)
    saved = captioner.state_dict()
    # Before backbones.py's adapter, the torchvision network was the backbone itself.
    old_layout = {
        k.replace("encoder.backbone.net.", "encoder.backbone."): v for k, v in saved.items()
    }
    assert "encoder.backbone.features.0.weight" in old_layout
    state = {"config": dataclasses.asdict(config), "vocab": vocab.to_dict(), "model": old_layout}
    save_checkpoint(state, tmp_path / "old.pt")
    loaded = load_trained(tmp_path / "old.pt")[0].state_dict()
    assert list(loaded) == list(saved) and all(torch.equal(loaded[k], saved[k]) for k in saved)


def test_a_failed_download_says_where_the_weights_come_from(monkeypatch):
    def offline(*args, **kwargs):
        if kwargs.get("weights") is not None:
            raise urllib.error.URLError("no network")
        return real(*args, **kwargs)

    real = torchvision.models.get_model
    monkeypatch.setattr(model_module.torchvision.models, "get_model", offline)
    with pytest.raises(RuntimeError, match="convnext_tiny.*download.pytorch.org.*weights_path"):
        build_backbone("convnext_tiny", pretrained=True)


def test_unknown_names_are_refused_with_the_names_there_are():
    with pytest.raises(ValueError, match="vgg16.*vit_b_16") as error:
        build_backbone("resnet51")
    assert "'resnet51'" in str(error.value)
    with pytest.raises(ConfigError, match="'googlenet' is not allowed; choose one of .*'vgg16'"):
        TrainConfig(backbone="googlenet")


def test_model_imports_only_torch_torchvision_and_the_standard_library():
    # At the top; the project's backbones module only inside EncoderCNN, for other networks
    # than ResNets (test_model checks that ResNets build without it).
    def imported(nodes):
        names = {a.name for n in nodes if isinstance(n, ast.Import) for a in n.names}
        return {n.split(".")[0] for n in names} | {
            n.module.split(".")[0] for n in nodes if isinstance(n, ast.ImportFrom)
        }

    tree = ast.parse(Path(model_module.__file__).read_text())
    allowed = {"torch", "torchvision"} | set(sys.stdlib_module_names)
    assert imported(tree.body) <= allowed, imported(tree.body)
    assert imported(list(ast.walk(tree))) <= allowed | {"captioning"}
