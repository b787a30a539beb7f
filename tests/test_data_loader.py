"""Loader: equal-length batches, one epoch = every caption once, val/test modes, layouts, errors."""

import json
import os
from collections import Counter

import numpy as np
import pytest
import torch

from captioning.data import annotations
from captioning.data.annotations import AnnotationError, read_split
from captioning.data.length_bucket_sampler import LengthBucketSampler
from captioning.data.loading import ImageLoadError, load_image, make_transform
from data_loader import get_loader


def loader(root, tmp_path, mode="train", **kw):
    kw.setdefault("batch_size", 8)
    return get_loader(
        make_transform(64 if "demo" in str(root) else 96),
        mode=mode,
        vocab_threshold=kw.pop("vocab_threshold", 2),
        vocab_file=str(tmp_path / "vocab.json"),
        vocab_from_file=False,
        data_dir=root,
        **kw,
    )


def check_train_epoch(dl):
    dataset = dl.dataset
    seen = []
    for images, captions in dl:
        assert images.shape[0] == captions.shape[0] <= dl.batch_sampler.batch_size
        assert (captions[:, 0] == 0).all() and (captions[:, -1] == 1).all()
        assert (captions != dataset.vocab.pad_id).all()  # one length per batch: no padding
    for batch in dl.batch_sampler:
        assert len({dataset.caption_lengths[i] for i in batch}) == 1
        seen.extend(batch)
    assert sorted(seen) == list(range(len(dataset)))  # every caption exactly once


def test_demo_train_batches_have_one_length_and_cover_epoch(demo_root, tmp_path):
    dl = loader(demo_root, tmp_path)
    assert len(dl.dataset) == 60 * 5
    check_train_epoch(dl)


def test_real_coco_train_batches(coco_sample, tmp_path):
    dl = loader(coco_sample, tmp_path, batch_size=32)
    assert len(dl.dataset) == 400
    check_train_epoch(dl)
    images, captions = next(iter(dl))
    assert images.shape[1:] == (3, 96, 96)


def test_cvnd_get_train_indices(demo_root, tmp_path):
    dl = loader(demo_root, tmp_path, batch_size=10)
    indices = dl.dataset.get_train_indices()
    assert len(indices) == 10
    assert len({dl.dataset.caption_lengths[i] for i in indices}) == 1


def test_val_mode_yields_images_with_ids(coco_sample, tmp_path):
    loader(coco_sample, tmp_path)  # builds the vocabulary the val loader reads
    dl = get_loader(
        make_transform(96),
        mode="val",
        batch_size=16,
        data_dir=coco_sample,
        vocab_file=str(tmp_path / "vocab.json"),
    )
    ids = []
    for images, image_ids in dl:
        assert images.shape[1:] == (3, 96, 96)
        ids.extend(image_ids.tolist())
    with open(coco_sample / "annotations" / "captions_val2017.json") as f:
        assert sorted(ids) == sorted(im["id"] for im in json.load(f)["images"])


def test_test_mode_yields_original_and_transformed(demo_root, tmp_path):
    loader(demo_root, tmp_path)
    dl = get_loader(
        make_transform(64), mode="test", data_dir=demo_root, vocab_file=str(tmp_path / "vocab.json")
    )
    original, image = next(iter(dl))
    assert original.shape[0] == 1 and original.shape[-1] == 3 and original.dtype == torch.uint8
    assert image.shape == (1, 3, 64, 64)
    assert len(dl.dataset) == 20


def test_grayscale_coco_image_becomes_rgb(coco_sample):
    path = coco_sample / "val2017" / "000000431848.jpg"
    from PIL import Image

    assert Image.open(path).mode == "L"
    image = load_image(path)
    assert image.mode == "RGB"
    assert make_transform(224)(image).shape == (3, 224, 224)


def test_rgba_png_composited_on_white(tmp_path):
    from PIL import Image

    path = tmp_path / "a.png"
    Image.new("RGBA", (8, 8), (255, 0, 0, 0)).save(path)
    assert load_image(path).getpixel((0, 0)) == (255, 255, 255)


def test_missing_image_error_names_file(demo_root, tmp_path):
    dl = loader(demo_root, tmp_path)
    dl.dataset.split.image_paths[0] = str(demo_root / "train2017" / "gone.png")
    first_caption = int(np.flatnonzero(dl.dataset.split.caption_image == 0)[0])
    with pytest.raises(
        ImageLoadError, match=r"gone\.png: image file not found .*captions_train2017"
    ):
        dl.dataset[first_caption]


def test_unreadable_image_error_names_file(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg at all")
    with pytest.raises(ImageLoadError, match="bad.jpg: cannot read image"):
        load_image(bad)


def write_coco(root, text):
    (root / "annotations").mkdir(parents=True)
    (root / "train2017").mkdir()
    (root / "annotations" / "captions_train2017.json").write_text(text)


def test_malformed_annotations_file_named(tmp_path):
    write_coco(tmp_path, '{"images": [}')
    with pytest.raises(AnnotationError, match=r"captions_train2017.json: malformed JSON"):
        read_split(tmp_path, "train")


def test_annotation_row_missing_key_named(tmp_path):
    write_coco(
        tmp_path,
        json.dumps(
            {
                "images": [{"id": 1, "file_name": "a.jpg"}],
                "annotations": [{"image_id": 1, "caption": "ok"}, {"image_id": 1}],
            }
        ),
    )
    with pytest.raises(
        AnnotationError, match=r"captions_train2017.json, annotations row 1: missing key"
    ):
        read_split(tmp_path, "train")


def test_no_dataset_found_says_what_is_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="no captions found"):
        read_split(tmp_path, "train")


def test_tokenisation_is_cached_per_file(coco_sample, monkeypatch):
    first = read_split(coco_sample, "val").tokenized()
    monkeypatch.setattr(annotations, "tokenize", lambda c: pytest.fail("tokenised again"))
    assert read_split(coco_sample, "val").tokenized() == first


def test_karpathy_split_file(coco_sample, tmp_path):
    os.symlink(coco_sample / "val2017", tmp_path / "val2017")
    with open(coco_sample / "annotations" / "captions_val2017.json") as f:
        coco = json.load(f)
    caps = Counter()
    images = []
    for k, im in enumerate(coco["images"][:30]):
        sentences = [
            {"raw": a["caption"]} for a in coco["annotations"] if a["image_id"] == im["id"]
        ]
        caps[["train", "restval", "val", "test"][k % 4]] += len(sentences)
        images.append(
            {
                "filepath": "val2017",
                "filename": im["file_name"],
                "cocoid": im["id"],
                "split": ["train", "restval", "val", "test"][k % 4],
                "sentences": sentences,
            }
        )
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))
    train = read_split(tmp_path, "train")
    assert train.layout == "karpathy"
    assert len(train.captions) == caps["train"] + caps["restval"]
    test = read_split(tmp_path, "test")
    assert len(test.captions) == caps["test"] and all(os.path.exists(p) for p in test.image_paths)
    dl = loader(tmp_path, tmp_path, mode="train", vocab_threshold=1)
    check_train_epoch(dl)


def test_csv_layout(coco_sample, tmp_path):
    os.symlink(coco_sample / "val2017", tmp_path / "Images")
    names = sorted(p.name for p in (coco_sample / "val2017").glob("*.jpg"))
    rows = ["image,caption"] + [
        f'{n},"a photo, number {k}"' for k, n in enumerate(names) for _ in range(2)
    ]
    (tmp_path / "captions.txt").write_text("\n".join(rows) + "\n")
    splits = {s: read_split(tmp_path, s) for s in ("train", "val", "test")}
    assert sum(len(s.image_ids) for s in splits.values()) == len(names)
    assert all(len(s.image_ids) > 0 for s in splits.values())
    assert splits["train"].captions[0].startswith("a photo, number")
    assert load_image(splits["test"].image_paths[0]).mode == "RGB"


def test_sampler_shards_across_ranks():
    lengths = np.random.default_rng(0).integers(5, 15, size=203)
    shards = [list(LengthBucketSampler(lengths, 8, seed=3, num_replicas=2, rank=r)) for r in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == len(LengthBucketSampler(lengths, 8, num_replicas=2))
    flat = [i for shard in shards for b in shard for i in b]
    assert set(flat) == set(range(203))
    assert len(flat) - 203 <= 8  # at most one batch repeated to even out the shards


def test_sampler_reshuffles_per_epoch():
    s = LengthBucketSampler(np.arange(100) % 7, 5, seed=0)
    first = list(s)
    s.set_epoch(1)
    assert list(s) != first
    s.set_epoch(0)
    assert list(s) == first


def test_image_grouped_batches_cover_every_caption_with_its_own_image(demo_root, tmp_path):
    from captioning.data.loading import (
        CaptionDataset,
        ImageCaptionsDataset,
        make_image_captions_loader,
    )
    from captioning.data.vocabulary import Vocabulary

    split = read_split(demo_root, "train")
    vocab = Vocabulary(1, None, captions=split.tokenized())
    captions = CaptionDataset(split, vocab, make_transform(32))
    grouped = ImageCaptionsDataset(captions)
    assert len(grouped) == len(split.image_ids)
    dl = make_image_captions_loader(grouped, batch_size=7, seed=1)
    seen, lengths_in_a_batch = Counter(), set()
    for images, ids, owners in dl:
        assert images.shape == (int(owners.max()) + 1, 3, 32, 32)
        assert ids.shape[0] == owners.shape[0] and (ids[:, 0] == vocab.start_id).all()
        lengths_in_a_batch.add(len(set((ids != vocab.pad_id).sum(1).tolist())))
        for k in range(len(ids)):
            # Each caption row sits beside the very image it describes.
            text = vocab.decode(ids[k].tolist())
            matches = [
                i
                for i in range(len(captions))
                if vocab.decode(captions.caption_ids(i)) == text
                and torch.equal(captions[i][0], images[owners[k]])
            ]
            assert matches, text
            seen[matches[0]] += 1
    assert sum(seen.values()) == len(captions) and max(seen.values()) == 1  # each caption once
    assert max(lengths_in_a_batch) > 1  # batches mix caption lengths (batch norm sees all kinds)


def test_image_grouped_loader_shards_images_across_ranks(demo_root):
    from captioning.data.loading import (
        CaptionDataset,
        ImageCaptionsDataset,
        make_image_captions_loader,
    )
    from captioning.data.vocabulary import Vocabulary

    split = read_split(demo_root, "val")
    grouped = ImageCaptionsDataset(
        CaptionDataset(
            split,
            Vocabulary(1, None, captions=split.tokenized()),
            features=np.arange(len(split.image_ids))[:, None],
        )
    )
    shards = []
    for rank in (0, 1):
        dl = make_image_captions_loader(grouped, batch_size=3, seed=2, num_replicas=2, rank=rank)
        dl.sampler.set_epoch(4)
        shards.append([int(i) for features, _, _ in dl for i in features[:, 0]])
    assert len(shards[0]) == len(shards[1]) == len(grouped) // 2
    assert sorted(shards[0] + shards[1]) == list(range(len(grouped)))


def test_captions_per_image_draws_a_seeded_subset_per_epoch(demo_root):
    from captioning.data.loading import CaptionDataset, ImageCaptionsDataset
    from captioning.data.vocabulary import Vocabulary

    split = read_split(demo_root, "val")
    captions = CaptionDataset(
        split,
        Vocabulary(1, None, captions=split.tokenized()),
        features=np.zeros((len(split.image_ids), 1)),
    )
    everything = ImageCaptionsDataset(captions)
    subset = ImageCaptionsDataset(captions, captions_per_image=2, seed=3)

    def drawn(epoch, index):
        subset.set_epoch(epoch)
        return [tuple(c.tolist()) for c in subset[index][1]]

    draws = {}
    for index in range(20):
        own = {tuple(c.tolist()) for c in everything[index][1]}
        assert len(own) == 5
        for epoch in range(4):
            picked = drawn(epoch, index)
            assert len(picked) == 2 and set(picked) <= own
            draws.setdefault(index, set()).add(frozenset(picked))
        assert drawn(1, index) == drawn(1, index)  # reproducible (workers, resume)
    assert sum(len(d) > 1 for d in draws.values()) >= 15  # epochs see other captions


def test_cached_pixels_give_exactly_the_transformed_image(coco_sample, tmp_path):
    # Real COCO images of every size (the grayscale one included) are resized and cropped once;
    # each epoch's input made from the cached bytes must equal the file read through the transform.
    from captioning.data.feature_cache import cached_images
    from captioning.data.loading import pixels_to_input

    split = read_split(coco_sample, "val")
    pixels = cached_images(split, 96, cache_dir=tmp_path, progress=False)
    assert pixels.shape == (len(split.image_ids), 3, 96, 96) and pixels.dtype == np.uint8
    transform = make_transform(96)
    for index, path in enumerate(split.image_paths):
        assert torch.equal(pixels_to_input(pixels[index]), transform(load_image(path))), path


# --- loader workers: how many, kept from epoch to epoch, seeded per epoch, given paths --------


def test_default_num_workers_shares_the_cpus_this_process_may_use(monkeypatch):
    from captioning.data.loading import default_num_workers, resolve_num_workers

    monkeypatch.setattr(os, "cpu_count", lambda: 64)  # the machine's, not this process's
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 5, 6, 7}, raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert default_num_workers() == 6
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # four training processes on this machine
    assert default_num_workers() == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert default_num_workers() == 0
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(40)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert default_num_workers() == 8  # capped
    monkeypatch.delattr(os, "sched_getaffinity")  # macOS, Windows
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert default_num_workers() == 3
    assert [resolve_num_workers(n) for n in (None, 0, 5)] == [3, 0, 5]


def val_captions(demo_root, **inputs):
    from captioning.data.loading import CaptionDataset
    from captioning.data.vocabulary import Vocabulary

    split = read_split(demo_root, "val")
    return CaptionDataset(split, Vocabulary(1, None, captions=split.tokenized()), **inputs)


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # none is started
def test_training_loaders_keep_their_workers_and_pin_for_cuda(demo_root, monkeypatch):
    from captioning.data import loading as data_loader
    from captioning.data.loading import (
        ImageCaptionsDataset,
        make_caption_loader,
        make_image_captions_loader,
    )

    captions = val_captions(demo_root, features=np.zeros((20, 4), np.float16))
    for workers in (0, 1):
        loaders = [make_caption_loader(captions, 4, num_workers=workers),
                   make_image_captions_loader(ImageCaptionsDataset(captions), 4,
                                              num_workers=workers)]  # fmt: skip
        for dl in loaders:
            assert dl.num_workers == workers and dl.persistent_workers == (workers > 0)
            assert dl.pin_memory == torch.cuda.is_available()
    monkeypatch.setattr(data_loader, "default_num_workers", lambda: 3)
    assert make_caption_loader(captions, 4, num_workers=None).num_workers == 3  # "auto"


@pytest.mark.parametrize("batch_by", ["image", "length"])
def test_persistent_workers_give_each_epoch_what_a_resumed_run_reads(demo_root, tmp_path, batch_by):
    # Persistent workers keep the dataset they started with: the epoch (captions drawn per image)
    # and the augmentation's seed must still follow the epoch, as in a run resumed at that epoch.
    from captioning.checkpoint import build_model
    from captioning.data.training_data import TrainingData
    from tests.helpers import tiny_config

    config = tiny_config(demo_root, tmp_path, num_workers=1, augment=True, batch_by=batch_by,
                         captions_per_image=2 if batch_by == "image" else None)  # fmt: skip
    splits = [read_split(demo_root, s) for s in ("train", "val")]
    vocab = data_loader_vocab(splits[0])

    def epochs(numbers):
        data = TrainingData(config, build_model(config, vocab), vocab, *splits, 0, 1, "cpu")
        assert data.train.persistent_workers
        read = []
        for epoch in numbers:
            data.start_epoch(epoch)
            read.append([[t.clone() for t in batch] for batch in data.train])
        return read

    unbroken, resumed = epochs([0, 1, 2]), epochs([2])
    assert all(map(torch.equal, sum(unbroken[2], []), sum(resumed[0], []))) and len(resumed[0])
    first, last = sum(unbroken[0], []), sum(unbroken[2], [])
    assert not all(torch.equal(a, b) for a, b in zip(first, last) if a.shape == b.shape)


def data_loader_vocab(split):
    from captioning.data.loading import load_or_build_vocab

    return load_or_build_vocab(
        vocab_file=None, vocab_threshold=1, vocab_from_file=False, train_split=split
    )


def test_spawned_workers_map_the_cache_and_see_each_epoch(demo_root, tmp_path):
    # Python 3.14 starts workers with forkserver: they get the pickled dataset, map the file
    # themselves, and still see set_epoch when they persist.
    import functools

    from captioning.data.loading import ImageCaptionsDataset, image_captions_collate

    rows = np.random.default_rng(0).standard_normal((20, 16)).astype(np.float16)
    np.save(tmp_path / "features.npy", rows)
    cache = np.load(tmp_path / "features.npy", mmap_mode="r")
    grouped = ImageCaptionsDataset(val_captions(demo_root, features=cache), 2, seed=1)
    dl = torch.utils.data.DataLoader(
        grouped, batch_size=20, num_workers=1, multiprocessing_context="spawn",
        persistent_workers=True, collate_fn=functools.partial(image_captions_collate, pad_id=3),
    )  # fmt: skip
    for epoch in (0, 1):
        grouped.set_epoch(epoch)
        ((features, captions, owners),) = list(dl)
        expected = image_captions_collate([grouped[i] for i in range(20)], pad_id=3)
        assert features.dtype == torch.float16 and torch.equal(features, torch.from_numpy(rows))
        assert torch.equal(captions, expected[1]) and torch.equal(owners, expected[2])
