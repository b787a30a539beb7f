"""The real COCO material of the tests and benchmarks: found through $CAPTIONING_TEST_DATA, and
made from any COCO 2017 download by `python -m bench.real_data`."""

import json
from pathlib import Path

from bench import real_data
from captioning.data.annotations import read_split


def test_the_variable_names_the_folder_and_the_skip_reason_says_how_to_make_one(monkeypatch):
    monkeypatch.setenv("CAPTIONING_TEST_DATA", "/data/my-coco-test")
    assert str(real_data.coco_sample()) == "/data/my-coco-test/coco-sample"
    assert str(real_data.val_captions()).startswith("/data/my-coco-test/coco-captions-val2017/")
    reason = real_data.missing(real_data.coco_sample())
    assert "CAPTIONING_TEST_DATA" in reason and "python -m bench.real_data COCO_ROOT" in reason
    monkeypatch.delenv("CAPTIONING_TEST_DATA")
    assert real_data.real_data_dir() == real_data.DEFAULT


def test_a_coco_download_makes_a_folder_the_tests_read(coco_sample, tmp_path, monkeypatch):
    # The developers' sample is itself in the COCO 2017 layout: a download in small.
    real_data.main([str(coco_sample), str(tmp_path / "made")])
    made = real_data.make_real_data(coco_sample, tmp_path / "small", {"train": 3, "val": 4})
    monkeypatch.setenv("CAPTIONING_TEST_DATA", str(made))
    train, val = (read_split(real_data.coco_sample(), s) for s in ("train", "val"))
    assert len(train.image_ids) == 3 and len(val.image_ids) == 4
    assert all(Path(p).is_file() for p in [*train.image_paths, *val.image_paths])
    whole = json.loads(real_data.val_captions().read_text())
    assert len(whole["images"]) == 159  # the download's whole val captions file
    assert sorted(train.image_ids) == train.image_ids  # the first images by id
    assert len(list((tmp_path / "made" / "coco-sample" / "train2017").iterdir())) == 80
