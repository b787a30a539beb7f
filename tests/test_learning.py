"""Learning from the image: a short run uses what it sees; a blind model sees only zero features."""

import dataclasses
import warnings

import numpy as np
import pytest
import torch

from captioning import decoding, plots
from captioning.caption import caption_images
from captioning.checkpoint import load_checkpoint, load_trained, save_checkpoint
from captioning.data.annotations import read_split
from captioning.data.loading import (
    CaptionDataset,
    ImageCaptionsDataset,
    load_image,
    make_image_captions_loader,
    make_transform,
    preprocessing_transform,
)
from captioning.data.training_data import image_inputs
from captioning.demo.dataset import make_demo_dataset
from captioning.demo.scoring import object_accuracy
from captioning.evaluation import coco_metrics
from captioning.evaluation import evaluate as evaluate_module
from captioning.evaluation.evaluate import evaluate
from captioning.training.train import caption_batch, caption_loss, train
from tests.helpers import tiny_config


@pytest.fixture(scope="module")
def one_shape_demo(tmp_path_factory):
    """Demo images with one shape each, at 32 px: enough for a model to learn in seconds."""
    root = tmp_path_factory.mktemp("one_shape") / "demo"
    return make_demo_dataset(
        root, n_train=400, n_val=100, n_test=20, image_size=32, max_shapes=1, seed=2, progress=False
    )


@pytest.fixture(scope="module")
def trained_and_blind(one_shape_demo, tmp_path_factory):
    """(config, checkpoint) of a short run on the images and of the same run blind."""
    out = tmp_path_factory.mktemp("learning")
    config = tiny_config(
        one_shape_demo, out / "seeing", embed_size=64, hidden_size=96, dropout=0.0, forget_bias=5.0,
        batch_size=32, epochs=12, lr=3e-3, lr_schedule="constant", cache_images=True, seed=0,
    )  # fmt: skip
    blind = dataclasses.replace(config, output_dir=str(out / "blind"), blind=True)
    with pytest.MonkeyPatch.context() as patch:
        # Drawing the learning curves takes seconds; they are no matter here.
        patch.setattr(plots, "plot_learning_curves", lambda *a, **k: None)
        for run in (config, blind):
            train(run)
    return config, out / "seeing" / "last.pt", out / "blind" / "last.pt"


def validation_loss(model, vocab, split, owner_of_image):
    """Mean validation loss when caption k is given the features of image owner_of_image[its image]."""
    captions = CaptionDataset(split, vocab, make_transform(32))
    loader = make_image_captions_loader(ImageCaptionsDataset(captions), 50, shuffle=False)
    losses, start = [], 0
    model.eval()
    with torch.no_grad():
        for images, ids, owners in loader:
            n = len(images)
            rows = torch.as_tensor(owner_of_image[start : start + n]) - start  # (images,)
            batch = caption_batch((images, ids, rows[owners]), vocab.pad_id, "cpu")
            loss = caption_loss(model, batch).loss
            losses.append(float(loss))
            start += n
    return float(np.mean(losses))


def test_model_learns_from_the_image(trained_and_blind, one_shape_demo):
    _, seeing, blind = trained_and_blind
    model, vocab, _ = load_trained(seeing)
    split = read_split(one_shape_demo, "val")
    n = len(split.image_ids)
    right = validation_loss(model, vocab, split, np.arange(n))
    # Each image's captions given another image's features (a rotation within each batch).
    other = np.concatenate([np.roll(np.arange(s, min(s + 50, n)), 1) for s in range(0, n, 50)])
    shuffled = validation_loss(model, vocab, split, other)
    assert shuffled > 1.3 * right, (right, shuffled)

    annotations = one_shape_demo / "annotations" / "captions_val2017.json"
    scores = {}
    for name, checkpoint in (("seeing", seeing), ("blind", blind)):
        result = evaluate(checkpoint, "val", data_dir=one_shape_demo, num_workers=0,
                          progress=False, use_java=False)  # fmt: skip
        scores[name] = object_accuracy(result["predictions"], annotations)["accuracy"]
    assert scores["seeing"] > scores["blind"] + 0.2, scores


def test_blind_model_sees_zero_features_everywhere(demo_root, tmp_path, monkeypatch):
    config = tiny_config(demo_root, tmp_path / "run", backbone="resnet18", trainable_blocks=0,
                         blind=True, epochs=1)  # fmt: skip
    train(config)
    # Batch-norm running statistics far from 0 and 1, as a pretrained ResNet's are: a black
    # image then gives no zero feature.
    state = load_checkpoint(tmp_path / "run" / "best.pt")
    generator = torch.Generator().manual_seed(0)
    for name, value in state["model"].items():
        if name.startswith("encoder.backbone") and name.endswith("running_mean"):
            state["model"][name] = torch.randn(value.shape, generator=generator)
        elif name.startswith("encoder.backbone") and name.endswith("running_var"):
            state["model"][name] = torch.rand(value.shape, generator=generator) * 3 + 0.5
    checkpoint = save_checkpoint(state, tmp_path / "shifted.pt")
    model, vocab, loaded = load_trained(checkpoint)
    zero = model.encoder.project(torch.zeros(1, model.encoder.feature_size))  # (1, embed)
    assert not torch.allclose(model.encoder(torch.zeros(1, 3, 32, 32)), zero, atol=1e-3)

    # Training: the data holds zero features, and the model sees zeros whatever it is given.
    splits = [read_split(demo_root, s) for s in ("train", "val")]
    for inputs in image_inputs(loaded, model.encoder, splits, 0, 1, "cpu"):
        assert not np.asarray(inputs["features"]).any()
    images = torch.randn(4, 3, 32, 32)
    assert torch.allclose(model.encode(images), zero.expand(4, -1), atol=1e-6)

    seen = []
    real_decode = decoding.decode_captions

    def spy(decoder, features, *args, **kwargs):
        seen.append(features)
        return real_decode(decoder, features, *args, **kwargs)

    monkeypatch.setattr(evaluate_module, "decode_captions", spy)
    evaluate(checkpoint, "val", data_dir=demo_root, batch_size=8, num_workers=0, progress=False,
             use_java=False)  # fmt: skip
    monkeypatch.setattr(decoding, "decode_captions", spy)
    caption_images(checkpoint, splits[1].image_paths[:3])
    features = torch.cat(seen)  # (val images + 3, embed)
    assert len(features) == len(splits[1].image_ids) + 3
    assert torch.allclose(features, zero.expand_as(features), atol=1e-6)


def test_batched_evaluation_pairs_each_caption_with_its_image(trained_and_blind, one_shape_demo):
    _, seeing, _ = trained_and_blind
    options = dict(data_dir=one_shape_demo, num_workers=0, progress=False, use_java=False)
    batched = evaluate(seeing, "val", batch_size=16, **options)["predictions"]
    alone = evaluate(seeing, "val", batch_size=1, **options)["predictions"]
    assert batched == alone
    assert len(set(alone.values())) > 5  # captions differ, so a wrong pairing would show


def test_evaluate_command_captions_with_the_beam_size_it_is_given(
    trained_and_blind, one_shape_demo, monkeypatch
):
    _, seeing, _ = trained_and_blind
    model, vocab, config = load_trained(seeing)
    split = read_split(one_shape_demo, "val")
    n = 20
    transform = preprocessing_transform(model.preprocessing)
    images = torch.stack([transform(load_image(path)) for path in split.image_paths[:n]])
    with torch.no_grad():
        features = model.encode(images)
        captions = {
            size: decoding.decode_captions(
                model.decoder, features, vocab, size, config.max_caption_len
            )[1]
            for size in (1, 3)
        }
    assert captions[1] != captions[3]  # else greedy captions would pass for beam search
    # Python scoring: Java's METEOR start-up takes seconds, and the scores are no matter here.
    monkeypatch.setattr(coco_metrics, "java_available", lambda: False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # METEOR skipped
        result = evaluate_module.main(
            [str(seeing), "--split", "val", "--data-dir", str(one_shape_demo), "--beam", "3",
             "--limit", str(n)]
        )  # fmt: skip
    assert result["predictions"] == dict(zip(split.image_ids[:n], captions[3]))
