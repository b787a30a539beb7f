"""Loader start-up and batch-index drawing at COCO scale: `get_loader` vs the CVND loader."""

import contextlib
import gc
import io
import time
from collections import Counter
from pathlib import Path

import numpy as np

from bench.common import coco_scale_dir, fresh_cache, number, row, timed

BATCH_SIZE = 64  # TrainConfig's default
VOCAB_THRESHOLD = 5


def copies(quick):
    """Replications of val2017's 25,014 captions: 17 (425,238 captions, COCO train's scale)."""
    return 1 if quick else 17


def project_start(data_dir):
    """The project's start-up: `get_loader` in train mode, vocabulary built from the captions."""
    from data_loader import get_loader, make_transform

    return get_loader(
        make_transform(224, train=True),
        mode="train",
        batch_size=BATCH_SIZE,
        vocab_threshold=VOCAB_THRESHOLD,
        vocab_file=str(Path(data_dir) / "vocab.json"),
        vocab_from_file=False,
        data_dir=data_dir,
    )


def naive_start(data_dir):
    """The CVND loader's start-up: pycocotools index, NLTK tokens of every caption, word counts."""
    from nltk.tokenize import word_tokenize
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(Path(data_dir) / "annotations" / "captions_train2017.json"))
    ids = list(coco.anns.keys())
    # CVND tokenises twice (vocabulary, then lengths); once here flatters the naive way.
    tokens = [word_tokenize(str(coco.anns[i]["caption"]).lower(), preserve_line=True) for i in ids]
    caption_lengths = [len(t) for t in tokens]
    counter = Counter()
    for t in tokens:
        counter.update(t)
    words = ["<start>", "<end>", "<unk>"] + [w for w, n in counter.items() if n >= VOCAB_THRESHOLD]
    return caption_lengths, {w: i for i, w in enumerate(words)}


def cvnd_train_indices(caption_lengths, batch_size):
    """CVND's `get_train_indices`, as written there: one length drawn, then a scan of all captions."""
    sel_length = np.random.choice(caption_lengths)
    all_indices = np.where(
        [caption_lengths[i] == sel_length for i in np.arange(len(caption_lengths))]
    )[0]
    return list(np.random.choice(all_indices, size=batch_size))


def per_call(fn, calls):
    """Seconds per call of `fn()`, over `calls` calls."""
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def epoch_seconds_per_batch(sampler):
    """Seconds per batch of one epoch's iteration over a batch sampler."""
    start = time.perf_counter()
    n = sum(1 for _ in sampler)
    return (time.perf_counter() - start) / n


def run(workdir, quick):
    """Yield the loader rows: cold and warm start-up, epoch iteration and `sample_batch`."""
    data_dir = coco_scale_dir(workdir, copies(quick))
    with fresh_cache(workdir):  # whatever ran before, the first start finds no token cache
        cold_loader, cold = timed(project_start, data_dir)
        n = len(cold_loader.dataset)
        del cold_loader
        gc.collect()
        loader, warm = timed(project_start, data_dir)
        gc.collect()
    (naive_lengths, _), naive = timed(naive_start, data_dir)
    size = f"{n:,} captions, {len(loader.dataset.vocab):,} words"
    yield row(
        "loader start-up (cold cache)", cold, naive, "s", note=f"{size}; first start tokenises"
    )
    yield row("loader start-up (warm cache)", warm, naive, "s", target=10, note=size)

    lengths = loader.dataset.caption_lengths  # one list of ints for both ways, as CVND keeps it
    if lengths != naive_lengths:
        diff = sum(a != b for a, b in zip(lengths, naive_lengths))
        print(f"  (NLTK word_tokenize and the project's tokeniser disagree on {diff:,} lengths)")
    naive_batch = per_call(lambda: cvnd_train_indices(lengths, BATCH_SIZE), 5 if quick else 20)
    sampler = loader.batch_sampler
    yield row(
        "batch indices, one epoch (LengthBucketSampler)",
        epoch_seconds_per_batch(sampler) * 1e6,
        naive_batch * 1e6,
        "us/batch",
        target=1000,
        note=f"batch {BATCH_SIZE}, {len(sampler):,} batches",
    )
    calls = 200 if quick else 2000
    rng = np.random.default_rng(0)
    reused = per_call(lambda: sampler.sample_batch(rng), calls) * 1e6
    yield row(
        "batch indices, sample_batch()",
        per_call(sampler.sample_batch, calls) * 1e6,
        naive_batch * 1e6,
        "us/batch",
        target=1000,
        note=f"batch {BATCH_SIZE}; {number(reused)} us/batch when given a Generator to reuse",
    )
