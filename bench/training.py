"""Training speed: the decoder from the feature cache vs the frozen CNN every step (real COCO
images), and the demo's CNN trained from the image cache vs from the image files."""

import gc
import itertools

import torch

from bench.common import COCO_SAMPLE, DECODER_VOCAB, coco_vocab, row, timed

BATCH_SIZE = 32


def steps(quick):
    """(warm-up steps, timed steps from the cache, timed steps through the CNN)."""
    return (1, 5, 1) if quick else (2, 60, 6)


def setup():
    """Config, vocabulary, the 80 train images of coco-sample and a seeded Show-and-Tell model."""
    from captioning.config import TrainConfig
    from captioning.data.annotations import read_split
    from model import CaptionModel, DecoderRNN, EncoderCNN

    config = TrainConfig(
        batch_size=BATCH_SIZE,
        pretrained=False,
        lr_schedule="constant",
        num_workers=0,
        progress=False,
        device="cpu",
    )
    vocab = coco_vocab()
    torch.manual_seed(0)  # the same CNN weights in every process, so the feature cache is reused
    encoder = EncoderCNN(config.embed_size, "resnet50", pretrained=False, trainable_blocks=0)
    decoder = DecoderRNN(config.embed_size, config.hidden_size, DECODER_VOCAB, end_id=vocab.end_id)
    return config, vocab, read_split(COCO_SAMPLE, "train"), CaptionModel(encoder, decoder)


def features(model, split):
    """The project's feature cache of the split (computed once, then a memmap)."""
    from captioning.data.feature_cache import cached_features
    from captioning.data.loading import make_transform

    return cached_features(model.encoder, split, make_transform(224), progress=False)


def make_loader(split, vocab, cache=None):
    """Equal-length caption batches: cached features when `cache` is given, else images."""
    from captioning.data.loading import CaptionDataset, make_caption_loader, make_transform

    dataset = CaptionDataset(split, vocab, make_transform(224), features=cache)
    return make_caption_loader(dataset, BATCH_SIZE, seed=0, drop_last=True)


def batches(loader, n, counted):
    """The first `n` batches of `loader` across epochs; their caption counts go to `counted`."""
    epoch = 0
    while True:
        loader.batch_sampler.set_epoch(epoch)
        for inputs, captions in loader:
            if n == 0:
                return
            counted.append(len(captions))
            yield inputs, captions
            n -= 1
        epoch += 1


def train_steps(model, vocab, config, loader, n):
    """Captions per second of `n` training steps, each exactly as `train.run_epoch` takes them."""
    from captioning.training.train import make_optimizer, make_scheduler, run_epoch

    optimizer = make_optimizer(config, model)
    scheduler = make_scheduler(config, optimizer, n)
    counted = []
    _, seconds = timed(
        run_epoch,
        model,
        batches(loader, n, counted),
        vocab,
        config,
        torch.device("cpu"),
        optimizer,
        scheduler,
    )
    return sum(counted) / seconds


def run(workdir, quick):
    """Yield the training rows: captions/s from the feature cache vs through ResNet-50, then the
    demo CNN's images/s from the image cache vs the files."""
    warmup, cached_steps, cnn_steps = steps(quick)
    config, vocab, split, model = setup()
    cache, cache_seconds = timed(features, model, split)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rates = {}
    for way, cache_or_none, n in (("cache", cache, cached_steps), ("cnn", None, cnn_steps)):
        model.load_state_dict(state)  # both ways start from the same weights
        loader = make_loader(split, vocab, cache_or_none)
        train_steps(model, vocab, config, loader, warmup)
        rates[way] = train_steps(model, vocab, config, loader, n)
        gc.collect()
    yield row(
        "decoder training (ResNet-50 frozen)",
        rates["cache"],
        rates["cnn"],
        "captions/s",
        target=20,
        higher_is_better=True,
        note=f"batch {BATCH_SIZE}, vocab {DECODER_VOCAB:,}, {cached_steps} vs {cnn_steps} steps "
        f"after {warmup} warm-up; one-time cache of {len(split.image_ids)} images "
        f"took {cache_seconds:.1f} s",
    )
    yield from run_demo_cnn(workdir, quick)


def demo_epoch_rate(config, vocab, split, state, cache_images, num_workers):
    """Images/s of one epoch of the demo preset's training steps, after two warm-up steps."""
    from captioning.checkpoint import build_model
    from captioning.data.feature_cache import cached_images
    from captioning.data.loading import (
        CaptionDataset,
        ImageCaptionsDataset,
        make_image_captions_loader,
        make_transform,
    )
    from captioning.training.train import make_optimizer, make_scheduler, run_epoch

    pixels = cached_images(split, config.image_size, progress=False) if cache_images else None
    captions = CaptionDataset(split, vocab, make_transform(config.image_size), pixels=pixels)
    loader = make_image_captions_loader(
        ImageCaptionsDataset(captions, config.captions_per_image),
        config.batch_size,
        num_workers=num_workers,
    )
    model = build_model(config, vocab)
    model.load_state_dict(state)
    optimizer = make_optimizer(config, model)
    scheduler = make_scheduler(config, optimizer, 10 * len(loader))
    device = torch.device("cpu")
    run_epoch(model, itertools.islice(loader, 2), vocab, config, device, optimizer, scheduler)
    _, seconds = timed(run_epoch, model, loader, vocab, config, device, optimizer, scheduler)
    return len(split.image_ids) / seconds


def run_demo_cnn(workdir, quick):
    """Yield the demo row: SmallCNN training from the image cache vs decoding the PNG files."""
    import dataclasses

    from captioning.checkpoint import build_model
    from captioning.data.annotations import read_split
    from captioning.data.loading import load_or_build_vocab
    from captioning.demo.dataset import make_demo_dataset
    from captioning.presets import DEMO_CONFIG

    n_images = 320 if quick else 1600
    root = make_demo_dataset(
        workdir / "demo", n_train=n_images, n_val=10, n_test=10, progress=False
    )
    split = read_split(root, "train")
    config = dataclasses.replace(DEMO_CONFIG, data_dir=str(root), progress=False)
    vocab = load_or_build_vocab(
        vocab_file=None, vocab_threshold=1, vocab_from_file=False, train_split=split
    )
    torch.manual_seed(0)
    state = build_model(config, vocab).state_dict()
    cached = demo_epoch_rate(config, vocab, split, state, cache_images=True, num_workers=0)
    # The files' best case on 2 cores: one loader process decodes while the model trains.
    files = demo_epoch_rate(config, vocab, split, state, cache_images=False, num_workers=1)
    yield row(
        "demo CNN training, image cache vs PNG files",
        cached,
        files,
        "images/s",
        higher_is_better=True,
        note=f"demo preset (SmallCNN, 64 px, batch {config.batch_size}, one caption per image), "
        f"one epoch of {n_images} images; the files read by one loader process",
    )
