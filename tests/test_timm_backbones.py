"""timm's image models as backbones ("timm:<name>"): a CNN and a CLIP tower give the pooled vector
and the grid, unfreeze by stages, are fed the preprocessing their weights were trained with from
training to captioning, and fail in one line without timm, without a network or with a bad name.
Random weights only (pretrained=False): nothing is downloaded."""

import dataclasses
import sys

import numpy as np
import pytest
import torch

from captioning import caption, checkpoint
from captioning.backbones import build_backbone
from captioning.checkpoint import build_model, load_checkpoint
from captioning.config import ConfigError, TrainConfig
from captioning.data.annotations import CaptionSplit, read_split
from captioning.data.loading import load_image, load_or_build_vocab, make_transform
from captioning.data.training_data import TrainingData
from captioning.evaluation import evaluate
from captioning.training import train as train_command
from captioning.training.train import train
from model import EncoderCNN, WeightsError
from tests.helpers import tiny_config

timm = pytest.importorskip("timm")

# The smallest CLIP image tower timm has (TinyCLIP's ViT, 8M weights): 224 px, 16 px patches.
CLIP = "timm:vit_xsmall_patch16_clip_224.tinyclip_yfcc15m"
# OpenAI CLIP's normalisation, which its towers (and TinyCLIP's) were trained with.
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def clip_transform(**changes):
    """What a CLIP tower's images go through: bicubic resizing, CLIP's mean and std."""
    return make_transform(224, **{"mean": CLIP_MEAN, "std": CLIP_STD, "interpolation": "bicubic",
                                  **changes})  # fmt: skip


@pytest.mark.parametrize(
    "name, size, positions",
    [("timm:resnet18", 64, 4), ("timm:mobilenetv3_small_050", 64, 4), (CLIP, 224, 196)],
)
def test_a_timm_cnn_and_a_clip_tower_give_the_pooled_vector_and_the_grid(name, size, positions):
    torch.manual_seed(0)
    encoder = EncoderCNN(16, build_backbone(name, pretrained=False)).eval()
    net, images = encoder.backbone.net, torch.randn(2, 3, size, size)
    with torch.no_grad():
        pooled = encoder.extract(images)  # (2, feature_size)
        grid = encoder.extract_grid(images)  # (2, positions, feature_size)
        features = net.forward_features(images)
    assert pooled.shape == (2, encoder.feature_size) and grid.shape == (
        2,
        positions,
        pooled.shape[1],
    )
    if name == CLIP:  # the pooled vector is the class token, as CLIP's tower pools
        assert encoder.feature_size == 256 and torch.allclose(pooled, features[:, 0], atol=1e-5)
    else:  # a CNN's: the grid's average (MobileNetV3's head convolution, wider, left out)
        assert torch.allclose(pooled, grid.mean(dim=1), atol=1e-5)
    assert (grid[0] - grid[1]).abs().max() > 1e-3  # two images, two grids


def test_a_vit_grid_is_its_patch_tokens_in_rows_without_the_class_token():
    torch.manual_seed(0)
    backbone = build_backbone(CLIP, pretrained=False).eval()
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        tokens = backbone.net.forward_features(images)  # (1, 1 + 196, 256): class token first
        grid = backbone.feature_map(images)  # (1, 256, 14, 14)
    assert tokens.shape == (1, 197, 256) and grid.shape == (1, 256, 14, 14)
    for row, column in ((0, 0), (0, 13), (5, 2), (13, 13)):
        assert torch.equal(grid[0, :, row, column], tokens[0, 1 + row * 14 + column])
    with pytest.raises(ValueError, match=f"{CLIP} takes 224x224 images, not 64x64: set image_size"):
        backbone.feature_map(torch.zeros(1, 3, 64, 64))


def trainable(encoder):
    """The names of the backbone weights that `trainable_blocks` left trainable."""
    return {n for n, p in encoder.backbone.net.named_parameters() if p.requires_grad}


def test_trainable_blocks_unfreeze_the_last_stages_of_a_timm_model():
    resnet = build_backbone("timm:resnet18", pretrained=False)
    for blocks, layers in ((0, set()), (1, {"layer4"}), (2, {"layer3", "layer4"})):
        encoder = EncoderCNN(16, resnet, trainable_blocks=blocks)
        assert {n.split(".")[0] for n in trainable(encoder)} == layers
    vit = build_backbone(CLIP, pretrained=False)  # 10 blocks in 4 runs: 0-1, 2-4, 5-6, 7-9
    last = {n.split(".")[0] + (n.split(".")[1] if n.startswith("blocks") else "")
            for n in trainable(EncoderCNN(16, vit, trainable_blocks=1))}  # fmt: skip
    assert last == {"blocks7", "blocks8", "blocks9", "norm"}
    every = trainable(EncoderCNN(16, vit, trainable_blocks=4))
    stem = {n for n, _ in vit.net.named_parameters()} - every
    assert stem == {"cls_token", "pos_embed", "patch_embed.proj.weight", "norm_pre.weight",
                    "norm_pre.bias"}  # fmt: skip


@pytest.fixture
def demo_images(demo_root):
    """A split of three demo images (64 px), which a CLIP tower sees resized to 224."""
    paths = read_split(demo_root, "train").image_paths[:3]
    return CaptionSplit("train", "csv", demo_root, [0, 1, 2], paths,
                        ["a red cat", "a blue dog", "two shapes"], np.arange(3))  # fmt: skip


@pytest.mark.parametrize("cache_images", [False, True])
def test_training_feeds_a_clip_tower_clips_preprocessing(demo_root, demo_images, tmp_path,
                                                         cache_images):  # fmt: skip
    config = tiny_config(demo_root, tmp_path, backbone=CLIP, image_size=224,
                         cache_images=cache_images)  # fmt: skip
    vocab = load_or_build_vocab(
        vocab_file=None, vocab_threshold=1, vocab_from_file=False, train_split=demo_images
    )
    model = build_model(config, vocab)
    data = TrainingData(config, model, vocab, demo_images, demo_images, 0, 1, "cpu")
    for index, path in enumerate(demo_images.image_paths):
        expected = clip_transform()(load_image(path))
        assert torch.equal(data.train_captions.image_input(index), expected)
        assert torch.equal(data.val.dataset.captions.image_input(index), expected)
        assert not torch.allclose(expected, make_transform(224)(load_image(path)), atol=0.1)


@pytest.fixture(scope="module")
def clip_run(demo_root, tmp_path_factory):
    """A frozen CLIP tower (its grid cached) and an attention decoder trained 1 epoch, then
    resumed for a second: (output folder, configuration, each batch of images the encoder saw)."""
    out = tmp_path_factory.mktemp("timm")
    seen, real = [], EncoderCNN.backbone_features

    def backbone_features(self, images):
        seen.append(images)
        return real(self, images)

    config = tiny_config(demo_root, out, backbone=CLIP, image_size=224, trainable_blocks=0,
                         decoder="attention", epochs=1)  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(EncoderCNN, "backbone_features", backbone_features)
        first = train(config)
    second = train(dataclasses.replace(config, epochs=2, resume=True))
    return out, config, seen, (first, second)


@pytest.mark.filterwarnings("ignore:use_java=False")  # scored in Python: no Java needed
def test_a_clip_tower_trains_resumes_and_is_scored(clip_run, demo_root):
    out, config, _, (first, second) = clip_run
    assert len(first["train_loss"]) == 1 and len(second["train_loss"]) == 2
    record = load_checkpoint(out / "best.pt")["preprocessing"]
    assert record == {"image_size": 224, "resize": "crop", "mean": CLIP_MEAN, "std": CLIP_STD,
                      "interpolation": "bicubic", "backbone": CLIP, "grid_size": None}  # fmt: skip
    with pytest.warns(UserWarning, match="the same caption"):  # an untrained tower, 2 epochs
        result = evaluate.evaluate(out / "best.pt", data_dir=str(demo_root), limit=4,
                                   num_workers=0, progress=False, use_java=False)  # fmt: skip
    assert len(result["predictions"]) == 4 and np.isfinite(result["metrics"]["CIDEr"])


def test_a_timm_checkpoint_captions_an_image_as_it_was_trained(clip_run, demo_root, monkeypatch):
    out, _, seen, _ = clip_run
    trained_on = seen[0][0]  # the feature cache's first batch: the training split's first image
    first_image = read_split(demo_root, "train").image_paths[0]
    captioned_with = []
    real = checkpoint.load_trained

    def load_trained(*args, **kwargs):
        model, vocab, saved = real(*args, **kwargs)
        model.encoder.register_forward_pre_hook(lambda m, inputs: captioned_with.append(inputs[0]))
        return model, vocab, saved

    monkeypatch.setattr(checkpoint, "load_trained", load_trained)
    captions = caption.caption_images(out / "best.pt", [first_image])
    assert isinstance(captions[str(first_image)], str) and len(captioned_with) == 1
    assert torch.equal(captioned_with[0][0], trained_on)
    assert torch.equal(trained_on, clip_transform()(load_image(first_image)))


def test_without_timm_each_command_says_how_to_install_it_in_one_line(clip_run, demo_root,
                                                                      monkeypatch, capsys):  # fmt: skip
    out = clip_run[0]
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    message = (f"TrainConfig.backbone: {CLIP!r} needs timm, which is not installed; pip install "
               "timm (in this project: pip install -e .[timm])")  # fmt: skip
    with pytest.raises(ConfigError) as error:
        TrainConfig(backbone=CLIP)
    assert str(error.value) == message
    monkeypatch.setattr(sys, "argv", ["the-command.py"])
    for main, args, status in (
        (train_command.main, ["--data-dir", str(demo_root), "--backbone", CLIP], 2),  # argparse's
        (caption.main, [str(out / "best.pt"), str(read_split(demo_root, "test").image_paths[0])], 1),
    ):  # fmt: skip
        with pytest.raises(SystemExit) as stop:
            main(args)
        lines = capsys.readouterr().err.strip().splitlines()
        assert stop.value.code == status and lines[-1].endswith(f"error: {message}")
        assert [line for line in lines if "error" in line] == lines[-1:]


def test_offline_without_cached_weights_is_one_line_naming_how_to_get_them(
    demo_root, tmp_path, monkeypatch, capsys
):
    from huggingface_hub import constants

    # No network for the hub (HF_HUB_OFFLINE) and an empty cache: the download cannot happen.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(WeightsError) as error:
        build_backbone("timm:resnet18", pretrained=True)
    message = str(error.value)
    assert "\n" not in message and message.startswith(
        "Could not download the pretrained weights of timm:resnet18 from the Hugging Face hub"
    )
    for advice in (str(tmp_path / "hub"), "HF_HUB_OFFLINE=1", "weights_path=", "--no-pretrained"):
        assert advice in message
    monkeypatch.setattr(sys, "argv", ["the-command.py"])
    with pytest.raises(SystemExit) as stop:
        train_command.main(["--data-dir", str(demo_root), "--output-dir", str(tmp_path / "run"),
                            "--preset", "none", "--backbone", "timm:resnet18", "--pretrained",
                            "--vocab-threshold", "1", "--num-workers", "0", "--no-progress"])  # fmt: skip
    lines = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 1 and lines[-1] == f"the-command.py: error: {message}"


def test_a_local_weights_file_is_read_as_timm_reads_a_download(tmp_path):
    torch.manual_seed(1)
    source = timm.create_model("resnet18")  # with its classifier, as the hub's files have it
    torch.save(source.state_dict(), tmp_path / "weights.pth")
    backbone = build_backbone("timm:resnet18", weights_path=str(tmp_path / "weights.pth"))
    mine, theirs = backbone.net.state_dict(), source.state_dict()
    assert set(theirs) - set(mine) == {"fc.weight", "fc.bias"}  # the classifier is dropped
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    with pytest.raises(FileNotFoundError, match="missing.pth: weights file not found"):
        build_backbone("timm:resnet18", weights_path=str(tmp_path / "missing.pth"))
    torch.save({"layer": torch.nn.Linear(2, 2)}, tmp_path / "code.pth")  # a pickled module
    with pytest.raises(WeightsError, match="code.pth: not usable timm:resnet18 weights"):
        build_backbone("timm:resnet18", weights_path=str(tmp_path / "code.pth"))


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(backbone="timm:resnet_18"), "'timm:resnet_18' is not allowed; timm has no model "
         "'resnet_18'"),
        (dict(backbone="timm:resnet18.clip"), "'timm:resnet18.clip' is not allowed; timm has no "
         "weights tagged 'clip' for resnet18; its tags: a1_in1k, "),
        (dict(backbone="timm:beit3_giant_patch14_224"), "'timm:beit3_giant_patch14_224' is not "
         "allowed with pretrained=True: timm has no weights for it"),
        (dict(backbone=CLIP, image_size=256), "TrainConfig.image_size: 256 is not allowed with "
         f"backbone {CLIP!r}, which takes 224x224 images only"),
        (dict(backbone="resnet51"), "TrainConfig.backbone: 'resnet51' is not allowed; choose one "
         "of 'alexnet', "),
    ],
)  # fmt: skip
def test_a_backbone_name_is_checked_when_the_config_is_made(changes, message):
    with pytest.raises(ConfigError) as error:
        TrainConfig(**changes)
    assert message in str(error.value) and "\n" not in str(error.value)
    assert TrainConfig(backbone="timm:beit3_giant_patch14_224", pretrained=False).image_size == 224
