"""Flickr8k: the folder `download.py --dataset flickr8k` leaves is read by the karpathy reader, its
preset is COCO's on data/flickr8k (the transformer's warm-up kept in epochs), train.py's auto
preset picks it, and the notebooks know the dataset."""

import dataclasses
import os
import shutil

import pytest

from captioning import notebooks
from captioning.data.annotations import detect_layout, read_split
from captioning.notebooks import data_settings, describe_download, get_data, holds_dataset
from captioning.presets import coco_config, flickr8k_config
from captioning.training.train import parse_command_line
from tests.flickr8k_folder import captions_of, make_flickr8k_folder


@pytest.fixture(scope="module")
def flickr8k_root(tmp_path_factory):
    return make_flickr8k_folder(tmp_path_factory.mktemp("flickr8k") / "flickr8k")


def test_the_karpathy_reader_reads_each_split_of_a_flickr8k_folder(flickr8k_root):
    assert detect_layout(flickr8k_root) == "karpathy"
    first = {"train": 0, "val": 24, "test": 30}  # the split file's images, in order
    for split, count in (("train", 24), ("val", 6), ("test", 6)):
        captions = read_split(flickr8k_root, split)
        assert (captions.name, captions.layout) == (split, "karpathy")
        assert captions.source == flickr8k_root / "dataset_flickr8k.json"
        assert captions.image_ids == list(range(first[split], first[split] + count))
        assert all(os.path.isfile(path) for path in captions.image_paths)
        assert {os.path.dirname(path) for path in captions.image_paths} == {
            str(flickr8k_root / "Flicker8k_Dataset")
        }
        image = first[split] + 1
        assert captions.references()[image] == captions_of(image)


@pytest.mark.parametrize("decoder", ["showtell", "attention", "transformer"])
def test_the_flickr8k_preset_is_cocos_on_data_flickr8k(decoder):
    coco = coco_config(decoder, scst=True)
    flickr8k = flickr8k_config(decoder, scst=True)
    assert flickr8k.data_dir == "data/flickr8k" and flickr8k.scst_epochs == coco.scst_epochs == 20
    assert flickr8k_config(decoder).scst_epochs == 0
    changed = {
        f.name
        for f in dataclasses.fields(coco)
        if getattr(coco, f.name) != getattr(flickr8k, f.name)
    }
    assert changed == ({"data_dir", "warmup_steps"} if decoder == "transformer" else {"data_dir"})
    if decoder == "transformer":
        # The same share of an epoch: COCO's 113,287 and Flickr8k's 6,000 training images, 10 a step.
        coco_epochs = coco.warmup_steps / -(-113_287 // coco.batch_size)
        flickr8k_epochs = flickr8k.warmup_steps / (6_000 // flickr8k.batch_size)
        assert flickr8k_epochs == pytest.approx(coco_epochs, abs=1e-3)
    assert notebooks.training_preset("flickr8k", decoder, scst=True) == flickr8k
    assert flickr8k_config(decoder, lr=1e-4).lr == 1e-4


def test_train_command_picks_the_flickr8k_preset_for_a_flickr8k_folder(flickr8k_root, tmp_path):
    # The transformer's presets differ by more than data_dir (its warm-up), so each pick shows.
    def preset_of(*flags):
        return parse_command_line([*flags, "--decoder", "transformer"])

    folder = str(flickr8k_root)
    assert preset_of("--data-dir", folder) == flickr8k_config("transformer", data_dir=folder)
    assert parse_command_line(["--data-dir", folder]) == flickr8k_config(data_dir=folder)
    # A folder where the reader reads COCO's split file (dataset_coco.json comes first) is COCO.
    both = tmp_path / "both"
    shutil.copytree(flickr8k_root, both)
    (both / "dataset_coco.json").write_text('{"images": []}')
    assert preset_of("--data-dir", str(both)) == coco_config("transformer", data_dir=str(both))
    # Named, the preset serves any folder; a missing or empty folder stays COCO's under auto.
    assert preset_of("--data-dir", str(both), "--preset", "flickr8k") == (
        flickr8k_config("transformer", data_dir=str(both))
    )
    for other in (str(tmp_path / "missing"), str(tmp_path)):
        assert preset_of("--data-dir", other) == coco_config("transformer", data_dir=other)


def test_what_a_flickr8k_user_is_told_before_downloading(flickr8k_root, tmp_path, monkeypatch):
    assert data_settings("flickr8k") == notebooks.DataSettings(
        "flickr8k", "data/flickr8k", "karpathy", "test"
    )
    settings = data_settings("flickr8k", tmp_path / "flickr8k")
    assert describe_download(settings) == (
        "flickr8k: 2 archives (Flickr8k_Dataset.zip, caption_datasets.zip), about 1 GB to download "
        "besides caption_datasets.zip (size not published); about as much again once unpacked "
        f"into {tmp_path / 'flickr8k'} (the archives can be deleted then)"
    )
    downloads = []
    monkeypatch.setattr(
        notebooks, "download_flickr8k", lambda root, progress: downloads.append(root) or root
    )
    assert get_data(settings, download=True, progress=False) == tmp_path / "flickr8k"
    assert downloads == [tmp_path / "flickr8k"]
    # A folder holding Flickr8k (downloaded by this project or other means) is used as it is.
    held = data_settings("flickr8k", flickr8k_root)
    assert holds_dataset(held) and describe_download(held).endswith(
        f"{flickr8k_root} holds it already: nothing to download"
    )
    assert get_data(held, download=True) == flickr8k_root and len(downloads) == 1
    (flickr8k_root / "downloads").mkdir()
    (flickr8k_root / "downloads" / "Flickr8k_Dataset.zip.part").write_bytes(b"half")
    assert not holds_dataset(held)
    shutil.rmtree(flickr8k_root / "downloads")
    with pytest.raises(FileNotFoundError, match="run 0_Dataset.ipynb with DATASET = 'flickr8k'"):
        get_data(data_settings("flickr8k", tmp_path / "nowhere"))
