"""Tests for the synthetic shapes captioning dataset."""

import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from captioning.demo import dataset as demo_dataset
from captioning.demo.dataset import (
    COLOURS,
    MARKER_NAME,
    SHAPES,
    SPLITS,
    main,
    make_demo_dataset,
    names_objects_correctly,
    parse_objects,
)
from captioning.demo.scoring import object_accuracy
from tests.helpers import right_and_wrong_captions

SMALL = {"n_train": 30, "n_val": 10, "n_test": 10, "image_size": 64, "progress": False}


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    """A small demo dataset shared by the read-only tests."""
    return make_demo_dataset(tmp_path_factory.mktemp("demo") / "demo", seed=0, **SMALL)


def load_split(root, split):
    """Return the parsed captions JSON of one split."""
    return json.loads((root / "annotations" / f"captions_{split}.json").read_text())


def file_bytes(root):
    """Return every file under root by relative path, as bytes."""
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_layout_loads_with_pycocotools(demo_root):
    for split, n_images in zip(SPLITS, (30, 10, 10)):
        coco = COCO(str(demo_root / "annotations" / f"captions_{split}.json"))
        assert len(coco.getImgIds()) == n_images
        assert len(coco.getAnnIds()) == 5 * n_images
        for image in coco.loadImgs(coco.getImgIds()):
            assert (demo_root / split / image["file_name"]).is_file()
    assert (demo_root / MARKER_NAME).is_file()
    assert not list(demo_root.parent.glob("demo.tmp-*"))


def test_image_ids_are_unique_across_splits(demo_root):
    ids = [image["id"] for split in SPLITS for image in load_split(demo_root, split)["images"]]
    assert len(ids) == len(set(ids))


def test_five_distinct_captions_per_image(demo_root):
    for split in SPLITS:
        captions = Counter()
        distinct = {}
        for annotation in load_split(demo_root, split)["annotations"]:
            captions[annotation["image_id"]] += 1
            distinct.setdefault(annotation["image_id"], set()).add(annotation["caption"])
        assert set(captions.values()) == {5}
        assert all(len(texts) == 5 for texts in distinct.values())


def test_images_are_rgb_of_stated_size(demo_root):
    for split in SPLITS:
        for image in load_split(demo_root, split)["images"]:
            with Image.open(demo_root / split / image["file_name"]) as picture:
                assert picture.mode == "RGB"
                assert picture.size == (image["width"], image["height"]) == (64, 64)


def test_objects_are_valid_and_all_counts_present(demo_root):
    counts = Counter()
    for image in load_split(demo_root, "train2017")["images"]:
        objects = image["objects"]
        counts[len(objects)] += 1
        assert len({(o["color"], o["shape"]) for o in objects}) == len(objects)
        for o in objects:
            assert (
                o["shape"] in SHAPES and o["color"] in COLOURS and o["size"] in ("small", "large")
            )
            assert 0 <= o["x"] < 64 and 0 <= o["y"] < 64
    assert counts == {1: 10, 2: 10, 3: 10}


def test_every_caption_names_exactly_its_images_objects(demo_root):
    for split in SPLITS:
        data = load_split(demo_root, split)
        objects_by_id = {image["id"]: image["objects"] for image in data["images"]}
        for annotation in data["annotations"]:
            objects = objects_by_id[annotation["image_id"]]
            assert names_objects_correctly(annotation["caption"], objects), (annotation, objects)


def test_same_seed_is_identical_and_other_seed_differs(tmp_path):
    first = file_bytes(make_demo_dataset(tmp_path / "a", seed=3, **SMALL))
    second = file_bytes(make_demo_dataset(tmp_path / "b", seed=3, **SMALL))
    other = file_bytes(make_demo_dataset(tmp_path / "c", seed=4, **SMALL))
    assert first == second
    assert first.keys() == other.keys()
    assert (
        first["annotations/captions_train2017.json"] != other["annotations/captions_train2017.json"]
    )
    assert sum(first[name] != other[name] for name in first if name.endswith(".png")) > 40


def test_splits_differ(demo_root):
    pixels = [np.asarray(Image.open(next((demo_root / split).glob("*.png")))) for split in SPLITS]
    assert not np.array_equal(pixels[0], pixels[1]) and not np.array_equal(pixels[1], pixels[2])


def test_second_call_returns_at_once_without_rewriting(tmp_path):
    root = make_demo_dataset(tmp_path / "demo", seed=0, **SMALL)
    watched = [
        root / MARKER_NAME,
        root / "annotations" / "captions_train2017.json",
        root / "train2017" / "000000000001.png",
    ]
    before = [path.stat().st_mtime_ns for path in watched]
    started = time.perf_counter()
    assert make_demo_dataset(tmp_path / "demo", seed=0, **SMALL) == root
    assert time.perf_counter() - started < 0.5
    assert [path.stat().st_mtime_ns for path in watched] == before


def test_other_parameters_replace_the_dataset(tmp_path):
    root = make_demo_dataset(tmp_path / "demo", seed=0, **SMALL)
    make_demo_dataset(root, seed=0, **{**SMALL, "n_train": 12})
    assert len(load_split(root, "train2017")["images"]) == 12
    assert len(list((root / "train2017").glob("*.png"))) == 12
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]


def test_stale_root_without_marker_is_replaced(tmp_path):
    (tmp_path / "demo" / "train2017").mkdir(parents=True)
    (tmp_path / "demo" / "train2017" / "half-written.png").write_bytes(b"")
    root = make_demo_dataset(tmp_path / "demo", seed=0, **SMALL)
    assert not (root / "train2017" / "half-written.png").exists()
    assert (root / MARKER_NAME).is_file()


def test_failure_leaves_no_half_written_dataset(tmp_path, monkeypatch):
    def fail(*args):
        raise RuntimeError("disk full")

    monkeypatch.setattr(demo_dataset, "draw_image", fail)
    with pytest.raises(RuntimeError):
        make_demo_dataset(tmp_path / "demo", seed=0, **SMALL)
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_replace_a_foreign_folder(tmp_path):
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "thesis.tex").write_text("precious")
    with pytest.raises(FileExistsError):
        make_demo_dataset(tmp_path / "demo", seed=0, **SMALL)
    assert (tmp_path / "demo" / "thesis.tex").read_text() == "precious"


def test_parse_objects_maps_synonyms_and_ignores_other_words():
    caption = (
        "there is a big red box to the left of a tiny blue disc which is above a green triangle."
    )
    assert parse_objects(caption) == [("red", "square"), ("blue", "circle"), ("green", "triangle")]
    assert parse_objects("a circle near a purple star <end>") == [("purple", "star")]
    assert parse_objects("a red and blue picture") == []


def test_names_objects_correctly_rejects_wrong_missing_and_extra_objects():
    objects = [
        {"shape": "circle", "color": "red", "size": "small", "x": 10, "y": 10},
        {"shape": "square", "color": "blue", "size": "large", "x": 40, "y": 40},
    ]
    assert names_objects_correctly("a small red circle above a big blue box", objects)
    assert names_objects_correctly("a blue square and a red circle", objects)
    assert not names_objects_correctly("a small green circle above a big blue box", objects)
    assert not names_objects_correctly("a red circle", objects)
    assert not names_objects_correctly("a red circle, a blue square and a yellow star", objects)
    assert not names_objects_correctly("a red circle and a square", objects)


def test_object_accuracy_counts_fractions_by_number_of_objects(demo_root):
    annotations_file = demo_root / "annotations" / "captions_val2017.json"
    images = load_split(demo_root, "val2017")["images"]
    truth = {image["id"]: image["objects"] for image in images}
    by_count = {n: [i for i in truth if len(truth[i]) == n] for n in (1, 2, 3)}
    right = {i: " and ".join(f"a {o['color']} {o['shape']}" for o in truth[i]) for i in truth}
    predictions = {
        by_count[1][0]: right[by_count[1][0]],
        by_count[1][1]: "a purple cross",
        by_count[2][0]: right[by_count[2][0]],
        by_count[2][1]: right[by_count[2][1]],
        by_count[3][0]: right[by_count[3][0]].rsplit(" and ", 1)[0],
    }
    result = object_accuracy(predictions, annotations_file)
    assert result == {
        "accuracy": pytest.approx(3 / 5),
        "by_count": {1: 0.5, 2: 1.0, 3: 0.0},
        "n": 5,
    }


def test_object_accuracy_rejects_unknown_ids(demo_root):
    annotations_file = demo_root / "annotations" / "captions_val2017.json"
    with pytest.raises(ValueError, match="captions_val2017.json"):
        object_accuracy({987654321: "a red circle"}, annotations_file)


def test_redrawn_references_name_the_same_objects_in_new_phrasings(demo_root):
    from captioning.demo.scoring import redraw_references

    path = demo_root / "annotations" / "captions_test2017.json"
    coco = json.loads(path.read_text())
    objects = {image["id"]: image["objects"] for image in coco["images"]}
    original = {}
    for a in coco["annotations"]:
        original.setdefault(a["image_id"], []).append(a["caption"])
    first = redraw_references(coco["images"], np.random.default_rng(0))
    assert first == redraw_references(coco["images"], np.random.default_rng(0))
    second = redraw_references(coco["images"], np.random.default_rng(1))
    assert sorted(first) == sorted(objects)
    for image_id, captions in first.items():
        assert len(set(captions)) == 5
        assert all(names_objects_correctly(c, objects[image_id]) for c in captions)
    assert first != second and first != original


def test_cider_over_redrawn_references_ranks_right_objects_above_wrong(demo_root):
    from captioning.demo.scoring import cider_over_redrawn_references

    path = demo_root / "annotations" / "captions_test2017.json"
    images = json.loads(path.read_text())["images"]
    right, wrong = right_and_wrong_captions(path)  # the same captions, each on the next image
    scores = cider_over_redrawn_references(
        {"right": right, "wrong": wrong}, path, draws=3, progress=False
    )
    assert all(r > w + 1.0 for r, w in zip(scores["right"], scores["wrong"]))
    assert len(set(scores["right"])) == 3  # each draw writes other references
    again = cider_over_redrawn_references({"right": right}, path, draws=3, progress=False)
    assert again["right"] == scores["right"]
    # Each draw's score is pycocoevalcap's Cider on the same references.
    from captioning.demo.scoring import redraw_references
    from captioning.evaluation.coco_metrics import cider_score

    for draw in range(3):
        references = redraw_references(images, np.random.default_rng([0, draw]))
        for name, captions in (("right", right), ("wrong", wrong)):
            assert scores[name][draw] == pytest.approx(cider_score(captions, references), abs=1e-9)


def test_command_line_writes_dataset(tmp_path, capsys):
    main(
        [
            "--root",
            str(tmp_path / "cli"),
            "--n-train",
            "3",
            "--n-val",
            "3",
            "--n-test",
            "3",
            "--image-size",
            "32",
            "--quiet",
        ]
    )
    assert str(tmp_path / "cli") in capsys.readouterr().out
    assert len(load_split(tmp_path / "cli", "test2017")["images"]) == 3


def test_the_demo_folder_named_or_not_is_made_on_first_use(tmp_path, monkeypatch):
    made = []
    monkeypatch.setattr(demo_dataset, "DEFAULT_DEMO_ROOT", tmp_path / "data" / "demo")
    monkeypatch.setattr(demo_dataset, "make_demo_dataset", lambda root: made.append(root) or root)
    monkeypatch.chdir(tmp_path)
    assert demo_dataset.resolve_data_dir(None) == tmp_path / "data" / "demo"
    assert demo_dataset.resolve_data_dir("data/demo") == Path("data/demo")  # as given
    assert made == [tmp_path / "data" / "demo"] * 2
    (tmp_path / "data" / "demo").mkdir(parents=True)
    (tmp_path / "data" / "demo" / MARKER_NAME).write_text("{}")  # made before: used as it is
    demo_dataset.resolve_data_dir("data/demo")
    assert demo_dataset.resolve_data_dir(tmp_path / "coco") == tmp_path / "coco"
    assert len(made) == 2
