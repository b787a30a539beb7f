"""Against the machine's own limit: its matrix-multiply peak, then decoder training from the
feature cache and batched greedy decoding as achieved FLOP/s (counted from the model's shapes)
and as a share of that peak; a COCO-scale epoch from the cache (timed in part, then
extrapolated); and ResNet-50 feature extraction, the cache's one pass over the images."""

import json
import time

import numpy as np
import torch

from bench.common import DECODER_VOCAB, VAL_CAPTIONS, row

EMBED, HIDDEN, FEATURES = 256, 512, 2048  # the COCO preset: ResNet-50 features
KARPATHY_TRAIN_IMAGES = 113_287  # 5 captions each: about 567k captions
IMAGES_PER_BATCH = 64  # each with its 5 captions


def sync(device):
    """Wait for the device, so that a timer reads work done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gemm_peak(device, quick):
    """FLOP/s of the best of several large fp32 matrix multiplies, over a few sizes (the best
    size depends on the caches)."""
    sizes = (4096, 8192) if device.type == "cuda" else (1024, 2048)
    best_rate = 0.0
    for n in sizes[:1] if quick else sizes:
        a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
        a @ b  # warm-up
        for _ in range(3 if quick else 6):
            sync(device)
            start = time.perf_counter()
            a @ b
            sync(device)
            best_rate = max(best_rate, 2 * n**3 / (time.perf_counter() - start))
    return best_rate


def caption_lengths(count, seed=0):
    """Words per caption drawn from the real val2017 captions' lengths, `count` of them."""
    from captioning.data.annotations import tokenize

    captions = [a["caption"] for a in json.loads(VAL_CAPTIONS.read_text())["annotations"]]
    lengths = np.array([len(tokenize(c)) for c in captions])
    return np.random.default_rng(seed).choice(np.minimum(lengths, 18), count)


def make_batches(lengths, features, device, vocab_size, seed=0):
    """Training batches like `batch_by=image` makes them: (features, captions, owners)."""
    rng = np.random.default_rng(seed)
    for k in range(len(lengths) // (5 * IMAGES_PER_BATCH)):
        words = lengths[k * 5 * IMAGES_PER_BATCH : (k + 1) * 5 * IMAGES_PER_BATCH]
        captions = np.full((len(words), words.max() + 2), 3)  # `<pad>` is 3
        captions[:, 0] = 0
        for row_, n in enumerate(words):
            captions[row_, 1 : n + 1] = rng.integers(4, vocab_size, n)
            captions[row_, n + 1] = 1
        rows = rng.integers(0, len(features), IMAGES_PER_BATCH)
        yield (torch.from_numpy(np.asarray(features[rows], np.float32)).to(device),
               torch.from_numpy(captions).to(device),
               torch.arange(IMAGES_PER_BATCH, device=device).repeat_interleave(5))  # fmt: skip


def training_flops(batch):
    """FLOPs of one training step (forward and backward, 3x the forward) from the shapes."""
    features, captions, _ = batch
    tokens = int((captions != 3).sum())  # LSTM steps run: the image step and every word
    scored = tokens - captions.shape[0]  # outputs scored: all but `<start>`'s
    forward = (2 * features.shape[0] * FEATURES * EMBED
               + 2 * tokens * 4 * HIDDEN * (EMBED + HIDDEN)
               + 2 * scored * HIDDEN * DECODER_VOCAB)  # fmt: skip
    return 3 * forward


def model_and_config(device):
    """The COCO preset's Show-and-Tell model (random ResNet-50 never run: features are cached)."""
    from captioning.config import TrainConfig
    from model import CaptionModel, DecoderRNN, EncoderCNN

    config = TrainConfig(pretrained=False, progress=False, device=str(device), log_every=50)
    torch.manual_seed(0)
    encoder = EncoderCNN(EMBED, "resnet50", pretrained=False, trainable_blocks=0)
    decoder = DecoderRNN(EMBED, HIDDEN, DECODER_VOCAB)
    return CaptionModel(encoder, decoder).to(device), config


class Vocab:
    """The ids `train.run_epoch` needs."""

    pad_id = 3


def run(workdir, quick, device="cpu"):
    """Yield the peak, the two achieved-FLOP/s rows and the COCO-scale epoch row."""
    from captioning.decoding import greedy_decode
    from captioning.training.train import make_optimizer, make_scheduler, run_epoch

    device = torch.device(device)
    peak = gemm_peak(device, quick)
    yield row("fp32 matrix multiply (peak)", peak / 1e9, peak / 1e9, "GFLOP/s",
              higher_is_better=True, note="the machine's own limit; both columns the same")  # fmt: skip

    model, config = model_and_config(device)
    # Random cached features of COCO's size (float16 on disk in the real cache; here in memory).
    rng = np.random.default_rng(0)
    images = 2_000 if quick else 20_000
    features = rng.standard_normal((images, FEATURES), dtype=np.float32).astype(np.float16)
    steps = 3 if quick else (200 if device.type == "cuda" else 12)
    lengths = caption_lengths((steps + 2) * 5 * IMAGES_PER_BATCH)
    batches = list(make_batches(lengths, features, device, DECODER_VOCAB))
    optimizer = make_optimizer(config, model)
    scheduler = make_scheduler(config, optimizer, len(batches))
    run_epoch(model, batches[:2], Vocab, config, device, optimizer, scheduler)  # warm-up
    sync(device)
    start = time.perf_counter()
    run_epoch(model, batches[2:], Vocab, config, device, optimizer, scheduler)
    sync(device)
    seconds = time.perf_counter() - start
    flops = sum(training_flops(b) for b in batches[2:]) / seconds
    yield row(f"decoder training from the cache (batch {IMAGES_PER_BATCH} images x 5 captions, "
              f"vocab {DECODER_VOCAB:,}), share of the peak", flops / 1e9, peak / 1e9, "GFLOP/s",
              target=0.5, higher_is_better=True,
              note=f"{flops / peak:.0%} of the peak; {steps} steps")  # fmt: skip

    captions = len(lengths[: (len(batches) - 2) * 5 * IMAGES_PER_BATCH])
    per_epoch = KARPATHY_TRAIN_IMAGES * 5 / captions * seconds
    yield row(f"COCO-scale epoch from the cache ({KARPATHY_TRAIN_IMAGES * 5:,} captions), "
              "extrapolated", per_epoch, per_epoch, "s", higher_is_better=False,
              note=f"timed {steps} of {KARPATHY_TRAIN_IMAGES // IMAGES_PER_BATCH:,} steps "
              "(caption lengths of the real val2017 captions, random features); one column")  # fmt: skip

    model.eval()
    feats = model.encode(torch.from_numpy(np.asarray(features[:64], np.float32)).to(device), True)
    with torch.no_grad():
        model.decoder.fc.bias[model.decoder.end_id] = -1e4  # every caption runs all 20 steps
        greedy_decode(model.decoder, feats, max_len=20)
        sync(device)
        start = time.perf_counter()
        repeats = 2 if quick else 10
        for _ in range(repeats):
            greedy_decode(model.decoder, feats, max_len=20)
        sync(device)
        seconds = time.perf_counter() - start
    per_word = 2 * 4 * HIDDEN * (EMBED + HIDDEN) + 2 * HIDDEN * DECODER_VOCAB  # LSTM, scores
    flops = repeats * 64 * 19 * per_word / seconds  # 19 words after `<start>`
    yield row("greedy decoding (batch 64, 19 words), share of the peak", flops / 1e9, peak / 1e9,
              "GFLOP/s", higher_is_better=True, note=f"{flops / peak:.0%} of the peak")  # fmt: skip

    batch = 8 if quick else (128 if device.type == "cuda" else 16)
    images = torch.randn(batch, 3, 224, 224, device=device)
    with torch.no_grad():
        model.encoder.backbone_features(images)  # warm-up
        sync(device)
        start = time.perf_counter()
        rounds = 1 if quick else (20 if device.type == "cuda" else 3)
        for _ in range(rounds):
            model.encoder.backbone_features(images)
        sync(device)
        rate = rounds * batch / (time.perf_counter() - start)
    yield row(f"ResNet-50 feature extraction, 224 px, batch {batch} (fp32)", rate, rate,
              "images/s", higher_is_better=True,
              note=f"the feature cache's pass: {KARPATHY_TRAIN_IMAGES:,} images in "
              f"{KARPATHY_TRAIN_IMAGES / rate / 60:.0f} min; one column")  # fmt: skip
