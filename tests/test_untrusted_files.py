"""Untrusted and hostile files: pickled weights, decompression bombs, files rewritten in place
(same size), malformed Karpathy and CSV annotation rows; and annotations/vocabulary layering."""

import ast
import copy
import json
import os
import pickle
import re
import shutil
import warnings

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from captioning.data import annotations, feature_cache, vocabulary
from captioning.data.annotations import AnnotationError, read_split
from captioning.data.loading import ImageLoadError, load_image, make_transform
from model import EncoderCNN
from tests.helpers import ROOT

# --- 1. weights files are read as data, never as code -------------------------------------


class PlantsMarker:
    """Unpickling this runs code: it creates a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def write_torch_save(path, payload):
    torch.save(payload, path)


def write_plain_pickle(path, payload):
    path.write_bytes(pickle.dumps(payload, protocol=2))


@pytest.mark.parametrize("write", [write_torch_save, write_plain_pickle], ids=["torch", "pickle"])
@pytest.mark.parametrize(
    "wrap", [lambda evil: evil, lambda evil: {"state_dict": evil}], ids=["bare", "in-dict"]
)
def test_weights_file_that_would_run_code_is_refused(tmp_path, write, wrap):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    write(path, wrap(PlantsMarker(marker)))
    with pytest.raises(RuntimeError, match=rf"^{re.escape(str(path))}: .*weights_only=True"):
        EncoderCNN(8, "resnet18", pretrained=False, weights_path=path)
    assert not marker.exists()


@pytest.mark.parametrize(
    "wrap", [lambda state: state, lambda state: {"state_dict": state}], ids=["bare", "in-dict"]
)
def test_state_dict_weights_file_loads(tmp_path, wrap):
    reference = torchvision.models.resnet18(weights=None)
    torch.save(wrap(reference.state_dict()), tmp_path / "r18.pth")
    encoder = EncoderCNN(8, "resnet18", pretrained=False, weights_path=tmp_path / "r18.pth")
    loaded = encoder.backbone.state_dict()
    for name, tensor in reference.state_dict().items():
        if not name.startswith("fc."):  # the classifier is replaced by the identity
            assert torch.equal(loaded[name], tensor), name


def test_unusable_weights_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.pth: weights file not found"):
        EncoderCNN(8, "resnet18", pretrained=False, weights_path=tmp_path / "missing.pth")
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "full.pth")
    data = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), tmp_path / "r34.pth")
    for name in ("truncated.pth", "r34.pth"):
        with pytest.raises(RuntimeError, match=rf"{re.escape(name)}: not usable resnet18 weights"):
            EncoderCNN(8, "resnet18", pretrained=False, weights_path=tmp_path / name)


# --- 2. decompression bombs: Pillow's warning band is an error too ---------------------------

MAX_PIXELS = 1000  # a 40x40 image (1600 px) is in Pillow's warning band, 80x80 above 2x


@pytest.fixture
def small_bomb_limit(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", MAX_PIXELS)


def square_png(folder, side):
    path = folder / f"square{side}.png"
    Image.new("RGB", (side, side), (200, 30, 30)).save(path)
    return path


@pytest.mark.parametrize("side", [40, 80])
def test_decompression_bomb_warning_band_and_above_are_named_errors(
    tmp_path, small_bomb_limit, side
):
    path = square_png(tmp_path, side)
    # The premise: Pillow itself only warns for 40x40 and refuses 80x80.
    if side * side <= 2 * MAX_PIXELS:
        with pytest.warns(Image.DecompressionBombWarning):
            Image.open(path).close()
    else:
        with pytest.raises(Image.DecompressionBombError):
            Image.open(path)
    with pytest.raises(ImageLoadError, match=rf"{re.escape(str(path))}: cannot read image"):
        load_image(path)
    assert load_image(square_png(tmp_path, 30)).size == (30, 30)  # under the limit: fine


def test_bomb_warning_to_error_does_not_leak(tmp_path, small_bomb_limit):
    path = square_png(tmp_path, 40)
    before = list(warnings.filters)
    with pytest.raises(ImageLoadError):
        load_image(path)
    load_image(square_png(tmp_path, 30))
    assert warnings.filters == before
    with pytest.warns(Image.DecompressionBombWarning):  # outside load_image: still a warning
        Image.open(path).close()


# --- 3. image and feature caches see a file rewritten at the same size -----------------------

CHANGED, KEPT = 2, 5  # positions in the demo val split


def demo_copy_with_uncompressed_images(demo_root, tmp_path):
    """A copy of the demo dataset whose images CHANGED and KEPT are uncompressed PNGs (the size
    is then a function of the dimensions alone)."""
    data = tmp_path / "demo"
    shutil.copytree(demo_root, data)
    split = read_split(data, "val")
    for i in (CHANGED, KEPT):
        path = split.image_paths[i]
        with Image.open(path) as im:
            rgb = im.convert("RGB")
        rgb.save(path, format="PNG", compress_level=0)
    return split


def rewrite_same_size(path):
    """New pixels, same byte size, a different modification time."""
    st = os.stat(path)
    with Image.open(path) as im:
        width, height = im.size
    noise = np.random.default_rng(7).integers(0, 256, (height, width, 3), np.uint8)
    Image.fromarray(noise).save(path, format="PNG", compress_level=0)
    # Explicitly another mtime: a rewrite within the clock tick must not make the test flaky.
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 7_000_000_000))
    assert os.path.getsize(path) == st.st_size
    assert os.stat(path).st_mtime_ns != st.st_mtime_ns


def check_only_changed_row_differs(before, after, fresh):
    assert not np.array_equal(after[CHANGED], before[CHANGED])
    assert np.array_equal(after, fresh)  # what a cache built from scratch holds
    assert np.array_equal(np.delete(after, CHANGED, 0), np.delete(before, CHANGED, 0))


def test_feature_cache_rebuilt_when_image_rewritten_at_same_size(demo_root, tmp_path):
    split = demo_copy_with_uncompressed_images(demo_root, tmp_path)
    torch.manual_seed(0)
    encoder = EncoderCNN(8, "resnet18", pretrained=False)
    transform = make_transform(32)

    def features(cache):
        rows = feature_cache.cached_features(
            encoder, split, transform, cache_dir=tmp_path / cache, progress=False
        )
        return np.array(rows)

    before = features("cache")
    rewrite_same_size(split.image_paths[CHANGED])
    check_only_changed_row_differs(before, features("cache"), features("fresh"))


def test_image_cache_rebuilt_when_image_rewritten_at_same_size(demo_root, tmp_path):
    split = demo_copy_with_uncompressed_images(demo_root, tmp_path)

    def pixels(cache):
        rows = feature_cache.cached_images(split, 32, cache_dir=tmp_path / cache, progress=False)
        return np.array(rows)

    before = pixels("cache")
    rewrite_same_size(split.image_paths[CHANGED])
    check_only_changed_row_differs(before, pixels("cache"), pixels("fresh"))


# --- 4. token cache: rebuilt when the captions change, reused when they do not ----------------

CAPTIONS = ["A red circle on the left.", "Two blue squares", "a green triangle above", "big dog"]


def write_coco_captions(root, captions):
    path = root / "annotations" / "captions_val2017.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "images": [{"id": k, "file_name": f"{k}.png"} for k in range(2)],
        "annotations": [{"image_id": k % 2, "caption": c} for k, c in enumerate(captions)],
    }
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def never_tokenise(monkeypatch):
    monkeypatch.setattr(annotations, "tokenize", lambda c: pytest.fail("tokenised again"))


def test_token_cache_reused_when_file_unchanged(tmp_path, monkeypatch):
    path = write_coco_captions(tmp_path, CAPTIONS)
    first = read_split(tmp_path, "val").tokenized(cache_dir=tmp_path / "cache")
    assert first[0] == ["a", "red", "circle", "on", "the", "left", "."]
    never_tokenise(monkeypatch)
    assert read_split(tmp_path, "val").tokenized(cache_dir=tmp_path / "cache") == first
    os.utime(path, ns=(1, 1))  # touched (a checkout, a copy), same captions
    assert read_split(tmp_path, "val").tokenized(cache_dir=tmp_path / "cache") == first


def swap_letters(captions):
    return ["A red circle on the left.", "Two blue sqaures", *captions[2:]]


@pytest.mark.parametrize(
    "edit, same_size, keep_mtime",
    [
        (lambda caps: [*caps[:3], "big dogs"], False, False),
        (swap_letters, True, False),
        # Restored mtime: `cp -p`, `rsync -t`, an archive, or a rewrite within one clock tick.
        (swap_letters, True, True),
    ],
    ids=["longer", "same-size", "same-size-and-mtime"],
)
def test_token_cache_rebuilt_when_file_changes(tmp_path, monkeypatch, edit, same_size, keep_mtime):
    path = write_coco_captions(tmp_path, CAPTIONS)
    st = os.stat(path)
    first = read_split(tmp_path, "val").tokenized(cache_dir=tmp_path / "cache")
    write_coco_captions(tmp_path, edit(CAPTIONS))
    assert (os.path.getsize(path) == st.st_size) == same_size
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    split = read_split(tmp_path, "val")
    again = split.tokenized(cache_dir=tmp_path / "cache")
    assert again != first
    assert list(again) == [annotations.tokenize(c) for c in split.captions]
    never_tokenise(monkeypatch)  # and the new tokens are cached in turn
    assert read_split(tmp_path, "val").tokenized(cache_dir=tmp_path / "cache") == again


# --- 5. malformed Karpathy and CSV rows name the file and the row -----------------------------


def karpathy_images():
    return [
        {
            "filepath": "val2014",
            "filename": f"COCO_val2014_{k:012d}.jpg",
            "cocoid": k,
            "split": split,
            "sentences": [{"raw": f"caption {k} a"}, {"raw": f"caption {k} b"}],
        }
        for k, split in enumerate(["val", "val", "train"])
    ]


def set_key(key, value):
    def edit(images, row):
        images[row][key] = value

    return edit


def del_keys(*keys):
    def edit(images, row):
        for key in keys:
            del images[row][key]

    return edit


def replace_entry(value):
    def edit(images, row):
        images[row] = value

    return edit


KARPATHY_CASES = {
    "entry-text": (replace_entry("val2014/x.jpg"), r"expected an object, got str"),
    "entry-null": (replace_entry(None), r"expected an object, got NoneType"),
    "entry-list": (replace_entry([1, 2]), r"expected an object, got list"),
    "no-filename": (del_keys("filename"), r"missing key\(s\) \['filename'\]"),
    "no-sentences": (del_keys("sentences"), r"missing key\(s\) \['sentences'\]"),
    "no-id": (del_keys("cocoid"), r"missing key\(s\) \['cocoid/imgid'\]"),
    "sentences-text": (set_key("sentences", "a dog"), r"'sentences' is not a list \(got str\)"),
    "sentences-object": (set_key("sentences", {"raw": "a dog"}), r"'sentences' is not a list"),
    "sentence-empty": (set_key("sentences", [{"raw": "ok"}, {"raw": "  "}]), r", sentence 1: "),
    "sentence-number": (set_key("sentences", [{"raw": 5}]), r", sentence 0: caption is empty"),
    "sentence-no-raw": (set_key("sentences", [{"tokens": ["a"]}]), r", sentence 0: caption"),
    "sentence-list": (set_key("sentences", [["a", "dog"]]), r", sentence 0: caption is empty"),
    "split-list": (set_key("split", ["val"]), r"'split' is empty or not text: \['val'\]"),
    "split-number": (set_key("split", 1), r"'split' is empty or not text: 1"),
    "filename-number": (set_key("filename", 12), r"'filename' is empty or not text: 12"),
    "filename-empty": (set_key("filename", ""), r"'filename' is empty or not text"),
    "filepath-list": (set_key("filepath", ["val2014"]), r"'filepath' is not text"),
    "id-list": (set_key("cocoid", [1]), r"image id is not a number or text"),
}


@pytest.mark.parametrize("row", [1, 2])  # one of the split read, one of another split
@pytest.mark.parametrize("case", sorted(KARPATHY_CASES))
def test_malformed_karpathy_row_names_file_and_row(tmp_path, case, row):
    edit, message = KARPATHY_CASES[case]
    images = karpathy_images()
    edit(images, row)
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": images}))
    with pytest.raises(
        AnnotationError, match=rf"dataset_coco\.json, images row {row}\b.*{message}"
    ):
        read_split(tmp_path, "val")


def test_wellformed_karpathy_file_reads(tmp_path):
    images = karpathy_images()
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": copy.deepcopy(images)}))
    split = read_split(tmp_path, "val")
    assert split.image_ids == [0, 1] and split.image_rows == [0, 1]
    assert split.captions == ["caption 0 a", "caption 0 b", "caption 1 a", "caption 1 b"]
    assert split.caption_image.tolist() == [0, 0, 1, 1]
    assert split.image_paths[1] == os.path.join(tmp_path, "val2014", images[1]["filename"])
    assert read_split(tmp_path, "train").image_ids == [2]


CSV_CASES = {
    "one-column": ("image,caption\na.jpg,a dog\nb.jpg\n", 3, r"expected 'image,caption'"),
    "empty-caption": ("image,caption\na.jpg,a dog\nb.jpg,\n", 3, r"caption is empty"),
    "blank-caption": ("image,caption\na.jpg,   \n", 2, r"caption is empty"),
    "empty-image": ("image,caption\na.jpg,a dog\n,a cat\n", 3, r"image name is empty"),
    "blank-image": ("image,caption\n  ,a cat\n", 2, r"image name is empty"),
    "no-header": ("a.jpg,a dog\nb.jpg,a cat\n", 1, r"expected the header 'image,caption'"),
    "wrong-header": ("img,text\na.jpg,a dog\n", 1, r"expected the header 'image,caption'"),
    "one-column-header": ("image\na.jpg\n", 1, r"expected the header"),
    "empty-file": ("", 1, r"expected the header"),
    # Line numbers, not record numbers: blank lines and quoted captions spanning lines count.
    "after-blank-lines": ("image,caption\n\na.jpg,a dog\n\nb.jpg\n", 5, r"expected 'image,"),
    "after-multiline": ('image,caption\na.jpg,"a dog\non two lines"\nb.jpg,\n', 4, r"caption is"),
    "huge-field": (
        "image,caption\na.jpg,a dog\nb.jpg," + "x" * 200_000 + "\n",
        3,
        r"malformed CSV",
    ),
}


@pytest.mark.parametrize("case", sorted(CSV_CASES))
def test_malformed_csv_row_names_file_and_row(tmp_path, case):
    text, line, message = CSV_CASES[case]
    (tmp_path / "captions.txt").write_text(text, encoding="utf-8")
    for split in ("train", "val", "test"):  # every row is checked, whichever split it is in
        with pytest.raises(AnnotationError, match=rf"captions\.txt, row {line}: {message}"):
            read_split(tmp_path, split, layout="csv")


def test_csv_that_is_not_utf8_is_named(tmp_path):
    (tmp_path / "captions.txt").write_bytes(b"image,caption\na.jpg,caf\xe9 au lait\n")
    with pytest.raises(AnnotationError, match=r"captions\.txt: not UTF-8 text"):
        read_split(tmp_path, "train")


def test_csv_with_byte_order_mark_reads(tmp_path):
    (tmp_path / "captions.txt").write_text("\ufeffimage,caption\na.jpg,a dog\n", encoding="utf-8")
    captions = [
        c for split in ("train", "val", "test") for c in read_split(tmp_path, split).captions
    ]
    assert captions == ["a dog"]


def test_wellformed_csv_reads_with_line_numbers(tmp_path):
    names = [f"{k}.jpg" for k in range(40)]
    lines = ["image,caption"]
    for name in names:
        lines += [f'{name},"a dog,\nrunning"', "", f"{name},a cat"]
    (tmp_path / "captions.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    for split_name in ("train", "val", "test"):
        split = read_split(tmp_path, split_name)
        assert split.image_ids and set(split.captions) == {"a dog,\nrunning", "a cat"}
        for k, path in enumerate(split.image_paths):
            line = 2 + 4 * names.index(os.path.basename(path))  # its first caption's line
            assert split.image_rows[k] == line
            assert split.describe_image(k).endswith(f"row {line}")


# --- 6. layering: annotations never imports vocabulary ---------------------------------------


def imported_modules(path):
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def test_annotations_does_not_import_vocabulary():
    imported = imported_modules(ROOT / "captioning" / "data" / "annotations.py")  # deferred too
    assert not [name for name in imported if "vocabulary" in name.split(".")]
    assert vocabulary.tokenize is annotations.tokenize  # the old name still works
    assert vocabulary.tokenize("A man, riding.") == ["a", "man", ",", "riding", "."]
