"""Precomputed features, one file per image (--features-dir): .npy pooled vectors and .npz region
arrays of varying size, read, padded with a mask that the grid decoders obey, and trained on,
resumed, evaluated and captioned by image id."""

import json

import numpy as np
import pytest
import torch

from captioning.caption import caption_images
from captioning.caption import main as caption_main
from captioning.config import ConfigError
from captioning.data.annotations import read_split
from captioning.data.feature_files import (
    FeatureFiles,
    folder_feature_size,
    model_input,
    read_feature_file,
    stack_inputs,
)
from captioning.decoding import beam_search, greedy_decode
from captioning.evaluation.evaluate import evaluate
from captioning.training.train import train
from captioning.transformer import TransformerDecoder
from model import AttentionDecoder
from tests.helpers import make_feature_folder, tiny_config

SIZE = 24  # feature size of the test folders
TRANSFORMER = dict(encoder_layers=1, decoder_layers=1, heads=2, feed_forward=32)


@pytest.fixture(scope="module")
def folders(demo_root, tmp_path_factory):
    """{"npy": folder of pooled vectors, "npz": folder of 3 to 9 regions} for every demo image."""
    root = tmp_path_factory.mktemp("features")
    return {
        kind: make_feature_folder(root / kind, demo_root, kind, SIZE) for kind in ("npy", "npz")
    }


def test_files_are_read_as_a_model_reads_them(folders, tmp_path):
    image_id = next(folders["npz"].iterdir()).stem
    regions = read_feature_file(folders["npz"] / f"{image_id}.npz")
    assert regions.dtype == np.float32 and regions.shape[1] == SIZE and 3 <= len(regions) < 10
    assert np.allclose(model_input(folders["npz"] / f"{image_id}.npz", False), regions.mean(0))
    masked = model_input(folders["npz"] / f"{image_id}.npz", True)
    assert masked.shape == (len(regions), SIZE + 1) and (masked[:, -1] == 1).all()
    pooled = model_input(folders["npy"] / f"{image_id}.npy", True)  # a vector: one region
    assert pooled.shape == (1, SIZE + 1)
    assert folder_feature_size(folders["npz"]) == SIZE
    # Padding: zero rows, the mask channel 0 too.
    batch = stack_inputs([torch.ones(2, 3), torch.ones(4, 3)])
    assert batch.shape == (2, 4, 3) and batch[0, 2:].abs().sum() == 0
    np.savez(tmp_path / "7.npz", features=np.zeros((2, SIZE)))
    with pytest.raises(ValueError, match=r"7.npz: no 'feat' array"):
        read_feature_file(tmp_path / "7.npz")
    np.save(tmp_path / "8.npy", np.zeros((2, SIZE)))
    with pytest.raises(ValueError, match=r"8.npy: features of shape \(2, 24\)"):
        read_feature_file(tmp_path / "8.npy")
    with pytest.raises(FileNotFoundError, match=r"9.npz: feature file not found"):
        FeatureFiles(tmp_path, [9], True)[0]


def padded_batch(seed):
    """Two images' regions (5 and 3) with the mask channel, the second padded by 2 rows."""
    torch.manual_seed(seed)
    first, second = torch.rand(5, SIZE), torch.rand(3, SIZE)
    return stack_inputs([torch.cat([x, torch.ones(len(x), 1)], 1) for x in (first, second)])


def region_decoders():
    torch.manual_seed(0)
    attention = AttentionDecoder(SIZE, 16, 16, 30, region_mask=True)
    transformer = TransformerDecoder(SIZE, 30, 16, 2, 1, 2, 32, 0.0, region_mask=True)
    return {"attention": attention.eval(), "transformer": transformer.eval()}


@pytest.mark.parametrize("kind", ["attention", "transformer"])
def test_padding_regions_change_nothing_the_decoder_gives(kind):
    decoder = region_decoders()[kind]
    grid = padded_batch(1)
    changed = grid.clone()
    changed[1, 3:, :-1] = torch.randn(2, SIZE) * 100  # the padding's features, mask kept 0
    captions = torch.randint(4, 30, (2, 6))
    with torch.no_grad():
        scores, weights = decoder.score(grid, captions)
        other, other_weights = decoder.score(changed, captions)
        torch.testing.assert_close(other, scores)
        assert not weights[1, :, 3:].any()  # no attention on padding
        for decode in (greedy_decode, lambda d, f, **k: beam_search(d, f, beam_size=2, **k)):
            ids, alpha = decode(decoder, grid, max_len=6, with_attention=True)
            torch.testing.assert_close(decode(decoder, changed, max_len=6, with_attention=True),
                                       (ids, alpha))  # fmt: skip
        # A real region changed does change the scores: the test can see a difference.
        real = grid.clone()
        real[1, 0, :-1] = torch.randn(SIZE) * 100
        assert not torch.allclose(decoder.score(real, captions).scores[1], scores[1])


def config_for(demo_root, out, folder, **changes):
    return tiny_config(demo_root, out, trainable_blocks=0, features_dir=str(folder), **changes)


@pytest.mark.parametrize(
    "kind, decoder",
    [("npy", {}), ("npz", dict(decoder="attention")), ("npz", dict(decoder="transformer", **TRANSFORMER))],
)  # fmt: skip
def test_trains_resumes_evaluates_and_captions_from_a_features_folder(
    demo_root, folders, tmp_path, kind, decoder
):
    config = config_for(demo_root, tmp_path / "run", folders[kind], epochs=1, **decoder)
    train(config)
    history = train(config_for(demo_root, tmp_path / "run", folders[kind], epochs=2, resume=True,
                               **decoder))  # fmt: skip
    assert history["epoch"] == [1, 2] and np.isfinite(history["val_loss"]).all()
    checkpoint = tmp_path / "run" / "best.pt"
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["feature_size"] == SIZE and saved["features_dir"] == str(folders[kind])
    result = evaluate(checkpoint, "test", limit=6, num_workers=0, progress=False, use_java=False)
    assert len(result["predictions"]) == 6
    ids = list(result["predictions"])[:3]
    captions = caption_images(checkpoint, ids)
    assert captions == {str(i): result["predictions"][i] for i in ids}  # by id, as evaluated
    files = [str(folders[kind] / f"{i}.{kind}") for i in ids]
    assert list(caption_images(checkpoint, files).values()) == list(captions.values())


def test_the_caption_command_takes_image_ids(demo_root, folders, tmp_path, capsys):
    train(config_for(demo_root, tmp_path / "run", folders["npz"], epochs=1, decoder="attention"))
    capsys.readouterr()
    image_id = read_split(demo_root, "test").image_ids[0]
    captions = caption_main([str(tmp_path / "run" / "best.pt"), str(image_id)])
    assert capsys.readouterr().out.startswith(f"{image_id}: {captions[str(image_id)]}")
    with pytest.raises(SystemExit):  # argparse: nothing to draw without images
        caption_main([str(tmp_path / "run" / "best.pt"), str(image_id), "--draw", str(tmp_path)])


def test_features_replace_the_cnn_and_every_image_needs_its_file(demo_root, folders, tmp_path):
    with pytest.raises(ConfigError, match="features_dir: .*trainable_blocks=0"):
        tiny_config(demo_root, tmp_path, features_dir=str(folders["npy"]))  # trains its CNN
    partial = tmp_path / "partial"
    partial.mkdir()
    train_ids = read_split(demo_root, "train").image_ids
    for image_id in train_ids[1:]:
        (partial / f"{image_id}.npy").write_bytes((folders["npy"] / f"{image_id}.npy").read_bytes())
    with pytest.raises(FileNotFoundError, match=f"no feature file for 1 of the {len(train_ids)} "
                       f"train images, the first {train_ids[0]}.npy"):  # fmt: skip
        train(config_for(demo_root, tmp_path / "run", partial, epochs=1))
