"""What images go through: crop or whole-image resizing, photos turned upright by their EXIF tag,
and checkpoints that caption with the preprocessing they were trained with, whatever the defaults."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from captioning import caption, checkpoint, config
from captioning.checkpoint import build_model, load_checkpoint, save_checkpoint
from captioning.data import loading as data_loader
from captioning.data.annotations import CaptionSplit, read_split
from captioning.data.feature_cache import cached_features, cached_images
from captioning.data.loading import (
    CaptionDataset,
    ImageDataset,
    load_image,
    load_or_build_vocab,
    make_pixel_transform,
    make_transform,
    pixels_to_input,
)
from captioning.data.training_data import TrainingData
from captioning.demo.small_cnn import SmallCNN
from captioning.evaluation import evaluate
from captioning.training.train import train
from model import EncoderCNN
from tests.helpers import tiny_config

# ImageNet's statistics, as every checkpoint so far was trained with them.
MEAN, STD = list(data_loader.IMAGENET_MEAN), list(data_loader.IMAGENET_STD)
EXIF_ORIENTATION = 0x0112
ROTATE_TO_UPRIGHT = {6: Image.Transpose.ROTATE_270, 8: Image.Transpose.ROTATE_90}


def bands(width=96, height=32):
    """Red | green | blue vertical bands: a centre crop keeps the green one only."""
    pixels = np.zeros((height, width, 3), np.uint8)
    for channel in range(3):
        pixels[:, channel * width // 3 : (channel + 1) * width // 3, channel] = 255
    return Image.fromarray(pixels)


def write_photo(path, orientation=6, seed=0):
    """A 48x24 noise JPEG stored sideways, with the EXIF tag that says how to turn it upright."""
    noise = np.random.default_rng(seed).integers(0, 256, (24, 48, 3), np.uint8)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    Image.fromarray(noise).save(path, quality=95, exif=exif)
    return path


def upright(path):
    """The photo at `path` turned as its tag says, without `load_image`."""
    with Image.open(path) as raw:
        orientation = raw.getexif().get(EXIF_ORIENTATION, 1)
        image = raw.convert("RGB")
    return image.transpose(ROTATE_TO_UPRIGHT[orientation]) if orientation != 1 else image


@pytest.fixture
def photos(tmp_path):
    """A split of two tagged phone photos (orientations 6 and 8) and one untagged wide image."""
    paths = [write_photo(tmp_path / "six.jpg", 6), write_photo(tmp_path / "eight.jpg", 8, 1)]
    bands().save(tmp_path / "wide.png")
    paths.append(tmp_path / "wide.png")
    return CaptionSplit("train", "csv", tmp_path, [0, 1, 2], [str(p) for p in paths],
                        ["a red cat", "a blue dog", "three bands"], np.arange(3))  # fmt: skip


def test_full_resize_keeps_the_sides_and_only_flips_when_augmenting():
    image = bands()
    full = make_transform(32, resize="full", normalize=False)(image)
    crop = make_transform(32, normalize=False)(image)
    assert full.shape == crop.shape == (3, 32, 32)
    assert full[0, :, 0].min() > 0.9 and full[2, :, -1].min() > 0.9  # red left, blue right
    assert crop[1].min() > 0.9 and crop[[0, 2]].max() < 0.1  # the centre crop: green only
    drawn = []
    for seed in range(8):
        torch.manual_seed(seed)
        augmented = make_transform(32, train=True, resize="full", normalize=False)(image)
        assert torch.equal(augmented, full) or torch.equal(augmented, full.flip(-1)), seed
        drawn.append(torch.equal(augmented, full))
    assert any(drawn) and not all(drawn)
    # The image cache holds what the model is fed, bit for bit.
    pixels = make_pixel_transform(32, "full")(image)
    assert torch.equal(pixels_to_input(pixels.numpy()), make_transform(32, resize="full")(image))
    with pytest.raises(ValueError, match="'squash' is not one of"):
        make_transform(32, resize="squash")


def test_photos_are_turned_upright_for_captioning_and_training(photos):
    for path in photos.image_paths[:2]:
        loaded = load_image(path)
        assert loaded.size == (24, 48)  # stored 48x24, shown as a portrait
        assert np.array_equal(np.asarray(loaded), np.asarray(upright(path)))
    assert np.array_equal(np.asarray(load_image(photos.image_paths[2])), np.asarray(bands()))
    vocab = load_or_build_vocab(
        vocab_file=None, vocab_threshold=1, vocab_from_file=False, train_split=photos
    )
    for dataset in (CaptionDataset(photos, vocab), ImageDataset(photos)):
        assert [dataset[i][0].size for i in range(3)] == [(24, 48), (24, 48), (96, 32)]


def test_a_cache_of_one_resize_is_never_read_for_the_other(photos, tmp_path):
    options = dict(cache_dir=tmp_path, progress=False)
    crop = cached_images(photos, 32, **options)
    full = cached_images(photos, 32, resize="full", **options)  # built after the crop one
    torch.manual_seed(0)
    encoder = EncoderCNN(8, SmallCNN(), trainable_blocks=0).eval()
    features = {}
    for resize, pixels in (("crop", crop), ("full", full)):
        transform = make_transform(32, resize=resize)
        features[resize] = cached_features(encoder, photos, transform, **options)
        for row, path in zip(pixels, photos.image_paths):  # upright, resized as asked
            assert np.array_equal(row, make_pixel_transform(32, resize)(upright(path)).numpy())
        with torch.no_grad():
            images = torch.stack([transform(upright(p)) for p in photos.image_paths])
            expected = encoder.backbone_features(images).numpy().astype(np.float16)
        assert np.array_equal(features[resize], expected), resize
    assert crop.filename != full.filename
    assert features["crop"].filename != features["full"].filename


@pytest.mark.parametrize(("augment", "cache_images"), [(True, False), (False, True)])
def test_training_reads_images_as_its_resize_says(photos, demo_root, tmp_path, augment,
                                                  cache_images):  # fmt: skip
    run = tiny_config(
        demo_root, tmp_path, resize="full", augment=augment, cache_images=cache_images
    )
    vocab = load_or_build_vocab(
        vocab_file=None, vocab_threshold=1, vocab_from_file=False, train_split=photos
    )
    data = TrainingData(run, build_model(run, vocab), vocab, photos, photos, 0, 1, "cpu")
    for index, path in enumerate(photos.image_paths):
        whole = make_transform(32, resize="full")(upright(path))
        seen = data.train_captions.image_input(index)
        assert torch.equal(seen, whole) or (augment and torch.equal(seen, whole.flip(-1)))
        assert torch.equal(data.val.dataset.captions.image_input(index), whole)


@pytest.fixture(scope="module")
def checkpoints(demo_root, tmp_path_factory):
    """(new, old, unnamed): an attention checkpoint trained on whole images, the same weights
    saved as before checkpoints recorded their preprocessing (no record, no `resize` in the
    config), and as before records named the interpolation."""
    out = tmp_path_factory.mktemp("preprocessing")
    train(tiny_config(demo_root, out, epochs=1, resize="full", decoder="attention"))
    state = load_checkpoint(out / "best.pt")
    del state["preprocessing"]["interpolation"]
    unnamed = save_checkpoint(state, out / "unnamed.pt")
    del state["preprocessing"], state["config"]["resize"]
    return out / "best.pt", save_checkpoint(state, out / "old.pt"), unnamed


@pytest.fixture
def model_inputs(monkeypatch):
    """The image batches the models that `checkpoint.load_trained` builds from now on receive."""
    seen, real = [], checkpoint.load_trained

    def load_trained(*args, **kwargs):
        model, vocab, saved = real(*args, **kwargs)
        model.encoder.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0]))
        return model, vocab, saved

    monkeypatch.setattr(checkpoint, "load_trained", load_trained)
    return seen


@pytest.fixture
def other_defaults(monkeypatch):
    """Today's defaults changed: another normalisation and resampling, and whole images for
    configs naming none."""
    monkeypatch.setattr(data_loader, "IMAGENET_MEAN", (0.5, 0.5, 0.5))
    monkeypatch.setattr(data_loader, "IMAGENET_STD", (0.25, 0.25, 0.25))
    monkeypatch.setattr(data_loader, "DEFAULT_INTERPOLATION", "nearest")
    real = config.config_from_dict
    monkeypatch.setattr(
        config, "config_from_dict", lambda cls, d: real(cls, {"resize": "full", **d})
    )


def test_a_checkpoint_records_what_its_images_went_through(checkpoints):
    record = {"image_size": 32, "resize": "full", "mean": MEAN, "std": STD,
              "interpolation": "bilinear", "backbone": "smallcnn", "grid_size": None}  # fmt: skip
    for name in ("best.pt", "last.pt"):
        saved = load_checkpoint(checkpoints[0].parent / name)["preprocessing"]
        assert saved == record and json.loads(json.dumps(saved)) == saved  # plain data


def test_old_and_new_checkpoints_caption_with_their_own_preprocessing(
    checkpoints, photos, model_inputs, other_defaults
):
    new, old, unnamed = checkpoints
    photo = photos.image_paths[0]  # stored sideways
    for path, resize in ((new, "full"), (old, "crop"), (unnamed, "full")):
        model_inputs.clear()
        assert checkpoint.load_trained(path)[0].preprocessing["resize"] == resize
        caption.caption_images(path, [photo])
        caption.attention_maps(path, [photo])
        expected = make_transform(32, resize=resize, mean=MEAN, std=STD)(upright(photo))
        assert len(model_inputs) == 2 and all(torch.equal(x[0], expected) for x in model_inputs)


@pytest.mark.filterwarnings("ignore:.*the same caption")  # a tiny model
def test_evaluate_feeds_a_checkpoint_its_own_preprocessing(
    checkpoints, demo_root, model_inputs, other_defaults, monkeypatch
):
    from captioning.evaluation import coco_metrics

    monkeypatch.setattr(coco_metrics, "score_captions", lambda *a, **k: ({}, {}))
    paths = read_split(demo_root, "test").image_paths[:2]
    for path, resize in zip(checkpoints, ("full", "crop", "full")):
        model_inputs.clear()
        evaluate.evaluate(path, data_dir=str(demo_root), limit=2, num_workers=0, progress=False)
        transform = make_transform(32, resize=resize, mean=MEAN, std=STD)
        assert torch.equal(model_inputs[0], torch.stack([transform(load_image(p)) for p in paths]))
