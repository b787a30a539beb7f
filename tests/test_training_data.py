"""The data of a run on its way to the device: caches reach loader workers as paths, features
travel as float16 and are cast on the device, and only rank 0 builds the validation images."""

import pickle

import numpy as np
import pytest
import torch

from captioning.checkpoint import build_model
from captioning.data.annotations import TokenizedCaptions, read_split
from captioning.data.loading import (
    CaptionDataset,
    ImageCaptionsDataset,
    ImageDataset,
    MappedRows,
    load_or_build_vocab,
    make_transform,
)
from captioning.data.training_data import TrainingData, cut_captions, image_inputs, to_device
from tests.helpers import tiny_config

FEATURES = 8192  # wide enough that a pickled copy of the rows could not pass for a path


@pytest.fixture(scope="module")
def split(demo_root):
    return read_split(demo_root, "val")


@pytest.fixture(scope="module")
def vocab(split):
    return load_or_build_vocab(
        vocab_file=None, vocab_threshold=1, vocab_from_file=False, train_split=split
    )


@pytest.fixture
def cache(split, tmp_path):
    """A feature cache of `split` (float16, memory-mapped, as `cached_features` returns it)."""
    rows = np.random.default_rng(0).standard_normal((len(split.image_ids), FEATURES))
    np.save(tmp_path / "features.npy", rows.astype(np.float16))
    return np.load(tmp_path / "features.npy", mmap_mode="r")


@pytest.fixture
def pixels(split, tmp_path):
    """An image cache of `split` (uint8, memory-mapped, as `cached_images` returns it)."""
    rows = np.random.default_rng(1).integers(0, 256, (len(split.image_ids), 3, 64, 64), np.uint8)
    np.save(tmp_path / "pixels.npy", rows)
    return np.load(tmp_path / "pixels.npy", mmap_mode="r")


def test_to_device_copies_without_waiting_and_casts_floats_there(monkeypatch):
    calls, real_to = [], torch.Tensor.to

    def spy(tensor, *args, **kwargs):
        calls.append((tensor.dtype, kwargs.get("non_blocking")))
        return real_to(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", spy)
    half = torch.randn(3, 5).half()
    ids = torch.tensor([[0, 4, 1]])
    images, captions, owners = to_device([half, ids, torch.arange(3)], torch.device("cpu"))
    assert (images.dtype, captions.dtype, owners.dtype) == (torch.float32, torch.int64, torch.int64)
    assert torch.equal(images, half.float()) and torch.equal(captions, ids)
    # The first three moves are asynchronous, and in the stored dtype (the cast comes after).
    assert calls[:3] == [(torch.float16, True), (torch.int64, True), (torch.int64, True)]


def test_datasets_pickle_the_cache_path_not_its_rows(split, vocab, cache, pixels):
    # Spawn and forkserver workers receive the pickled dataset: a path, and they map it.
    assert cache.nbytes > 300_000 and pixels.nbytes > 200_000
    datasets = {
        "captions": CaptionDataset(split, vocab, features=cache),
        "grouped": ImageCaptionsDataset(CaptionDataset(split, vocab, features=cache)),
        "images": ImageDataset(split, features=cache),
        "pixels": ImageDataset(split, pixels=pixels),
        "caption pixels": CaptionDataset(split, vocab, pixels=pixels),
    }
    for name, dataset in datasets.items():
        dataset[3]  # opens the map in this process
        data = pickle.dumps(dataset)
        assert len(data) < 50_000, name  # kilobytes (the captions), not the rows
        copy = pickle.loads(data)
        rows = (copy.captions if name == "grouped" else copy).__dict__
        mapped = rows.get("features") or rows.get("pixels")
        assert isinstance(mapped, MappedRows) and mapped._rows is None, name  # opened lazily
        assert np.array_equal(np.asarray(copy[3][0], np.float32), np.asarray(dataset[3][0])), name


def test_features_travel_in_their_stored_dtype(split, vocab, cache):
    captions = CaptionDataset(split, vocab, features=cache)
    image, _ = captions[0]
    assert image.dtype == torch.float16
    assert np.array_equal(image.numpy(), cache[int(split.caption_image[0])])
    grouped, _ = ImageCaptionsDataset(captions)[2]
    assert grouped.dtype == torch.float16
    features, image_id = ImageDataset(split, features=cache)[5]
    assert features.dtype == torch.float16 and image_id == split.image_ids[5]


def test_validation_features_stay_memory_mapped_and_float16(demo_root, split, cache, tmp_path):
    config = tiny_config(demo_root, tmp_path, batch_size=8)
    loader = TrainingData.val_image_loader(
        config, split, make_transform(32), {"features": cache}, range(12)
    )
    assert isinstance(loader.dataset.dataset.features, MappedRows)
    assert len(pickle.dumps(loader.dataset)) < 20_000  # no copy of the rows in the loader
    batches = list(loader)
    features = torch.cat([f for f, _ in batches])
    ids = torch.cat([i for _, i in batches])
    assert features.dtype == torch.float16
    assert torch.equal(features, torch.from_numpy(np.array(cache[:12])))
    assert ids.tolist() == split.image_ids[:12]
    config = tiny_config(demo_root, tmp_path, num_workers=1)
    kept = TrainingData.val_image_loader(
        config, split, make_transform(32), {"features": cache}, range(4)
    )
    assert kept.persistent_workers and kept.pin_memory == torch.cuda.is_available()


def test_blind_features_are_zeros_made_when_read(demo_root, tmp_path):
    config = tiny_config(demo_root, tmp_path, blind=True, trainable_blocks=0)
    splits = [read_split(demo_root, s) for s in ("train", "val")]
    vocab = load_or_build_vocab(
        vocab_file=None, vocab_threshold=1, vocab_from_file=False, train_split=splits[0]
    )
    model = build_model(config, vocab)
    train, val = image_inputs(config, model.encoder, splits, 0, 1, "cpu")
    assert not np.asarray(val["features"]).any() and len(val["features"]) == 20
    dataset = CaptionDataset(splits[0], vocab, **train)
    assert len(pickle.dumps(dataset.features)) < 1000  # not a copy of every row's zeros
    image, _ = dataset[0]
    assert image.dtype == torch.float16 and not image.any()
    assert image.shape == (model.encoder.feature_size,)


def test_each_rank_captions_its_own_share_of_the_validation_images(demo_root, tmp_path):
    config = tiny_config(demo_root, tmp_path, val_images=11)
    splits = [read_split(demo_root, s) for s in ("train", "val")]
    vocab = load_or_build_vocab(
        vocab_file=None, vocab_threshold=1, vocab_from_file=False, train_split=splits[0]
    )
    model = build_model(config, vocab)
    shares = []
    for rank in range(3):
        data = TrainingData(config, model, vocab, *splits, rank, 3, "cpu")
        shares.append([int(i) for _, ids in data.val_images for i in ids])
        assert data.val_references.keys() == set(splits[1].image_ids[:11])  # all are scored
    assert [len(s) for s in shares] == [3, 4, 4]  # disjoint, together the 11 scored images
    assert sum(shares, []) == list(splits[1].image_ids[:11])


def test_validation_captions_from_float16_features_match_float32_ones(demo_root, tmp_path):
    # predict_captions widens what the validation loader gives (float16 cached features).
    from captioning.evaluation.evaluate import predict_captions

    config = tiny_config(demo_root, tmp_path, trainable_blocks=0, batch_size=8)
    split = read_split(demo_root, "val")
    vocab = load_or_build_vocab(
        vocab_file=None, vocab_threshold=1, vocab_from_file=False, train_split=split
    )
    torch.manual_seed(0)
    model = build_model(config, vocab)
    rows = np.random.default_rng(2).standard_normal((20, model.encoder.feature_size))
    np.save(tmp_path / "f.npy", rows.astype(np.float16))
    half = {"features": np.load(tmp_path / "f.npy", mmap_mode="r")}
    full = {"features": rows.astype(np.float16).astype(np.float32)}
    captions = [
        predict_captions(model, vocab, TrainingData.val_image_loader(
            config, split, make_transform(32), inputs, range(10)), max_len=8, cached=True)
        for inputs in (half, full)
    ]  # fmt: skip
    assert captions[0] == captions[1] and len(captions[0]) == 10


def test_cut_captions_keeps_the_first_words_of_long_captions_only():
    lists = [[f"w{k}" for k in range(20)], ["a", "dog"], [f"v{k}" for k in range(16)], []]
    cut, longer = cut_captions(TokenizedCaptions.from_lists(lists), 16)
    assert list(cut) == [lists[0][:16], lists[1], lists[2], []]
    assert longer == 1 and cut.lengths().tolist() == [16, 2, 16, 0]


def test_training_captions_are_cut_to_what_decoding_can_give(demo_root, tmp_path):
    config = tiny_config(demo_root, tmp_path, cut_captions=True, max_caption_len=8)
    splits = [read_split(demo_root, s) for s in ("train", "val")]
    vocab = load_or_build_vocab(
        vocab_file=None, vocab_threshold=1, vocab_from_file=False, train_split=splits[0]
    )
    data = TrainingData(config, build_model(config, vocab), vocab, *splits, 0, 1, "cpu")
    whole = CaptionDataset(splits[0], vocab)
    lengths = splits[0].tokenized().lengths()
    assert data.captions_cut == (int((lengths > 6).sum()), len(lengths))
    assert 0 < data.captions_cut[0] < len(lengths)  # the test data has both kinds
    for i, n in enumerate(lengths):
        ids, full = data.train_captions.caption_ids(i), whole.caption_ids(i)
        if n > 6:  # <start>, 6 words, <end>: max_caption_len tokens, as decoding ends
            assert len(ids) == 8 and torch.equal(ids[:7], full[:7]) and ids[-1] == vocab.end_id
        else:
            assert torch.equal(ids, full)
    val = data.val.dataset.captions
    val_ids = [val.caption_ids(i) for i in range(len(val))]
    assert max(len(ids) for ids in val_ids) == 8  # the validation loss scores the same task
    uncut = TrainingData(
        tiny_config(demo_root, tmp_path), build_model(config, vocab), vocab, *splits, 0, 1, "cpu"
    )
    assert uncut.captions_cut is None
    assert max(len(uncut.train_captions.caption_ids(i)) for i in range(len(lengths))) > 8
