"""Two processes (torchrun, gloo on the CPU) train as one process with the whole batch would, run the
self-critical stage, build the caches together, and stop together with one message on a failure.

One torchrun launch runs every scenario in turn (tests/two_process_worker.py): starting the two
processes costs more than most scenarios. Each test reads one scenario's files.
"""

import json
import os
import re
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from captioning.checkpoint import load_checkpoint
from captioning.data.annotations import read_split
from captioning.data.feature_cache import cached_features, cached_images
from captioning.data.loading import make_transform
from captioning.demo.small_cnn import SmallCNN
from captioning.training.train import train
from model import EncoderCNN
from tests.helpers import run_two_processes, tiny_config

TRAINING_TIMEOUT = 120.0  # seconds a rank may wait for the other: rank 0 alone scores and saves
DELAY, CACHE_TIMEOUT = 1.0, 6.0  # seconds a cache batch takes, and the process group's timeout
# No batch statistics (layer norm, frozen CNN) and no dropout: then two processes with 8 images
# each must take the very steps of one process with 16, as DDP promises.
DDP_AS_ONE = dict(trainable_blocks=0, feature_norm="layer", dropout=0.0, epochs=2, lr=3e-3)
SIZES = {"transformer": dict(encoder_layers=1, decoder_layers=1, heads=2, feed_forward=32)}


def plan(demo_root, out):
    """The scenarios of the launch: those that must finish first, then those that stop on an
    error every rank raises, the short-timeout cache scenarios last."""

    def training(name, switches=None, **changes):
        config = tiny_config(demo_root, out / name / "ddp", collective_timeout=TRAINING_TIMEOUT / 60,
                             **changes)  # fmt: skip
        return dict(name=name, kind="train", timeout=TRAINING_TIMEOUT, config=asdict(config),
                    switches=switches or {})  # fmt: skip

    caches = dict(timeout=CACHE_TIMEOUT, demo_root=str(demo_root), delay=DELAY)
    return [
        training("ddp_showtell", batch_size=8, decoder="showtell", **DDP_AS_ONE),
        training("ddp_attention", batch_size=8, decoder="attention", **DDP_AS_ONE),
        training(
            "ddp_transformer",
            batch_size=8,
            decoder="transformer",
            **DDP_AS_ONE,
            **SIZES["transformer"],
        ),  # fmt: skip
        # Batch norm in the image projection (feature_norm="batch"): DDP copies rank 0's running
        # statistics to every rank each step, so the ranks end with equal buffers too. Rank 1
        # reads other weights from best.pt (a stale copy); rank 0's validation CIDEr is 0.25.
        training(
            "self_critical",
            {"skew_best_on_rank": 1, "fixed_cider": 0.25},
            batch_size=8,
            epochs=1,
            scst_epochs=1,
            trainable_blocks=0,
            feature_norm="batch",
            log_every=2,
            skip_bad_images=True,
        ),
        training(
            "output_dir_per_rank",
            {"output_dir_per_rank": True},
            batch_size=8,
            epochs=1,
            trainable_blocks=0,
            feature_norm="layer",
        ),
        training(
            "nan_on_rank_1",
            {"nan_on_rank": 1},
            batch_size=8,
            epochs=1,
            log_every=3,
            trainable_blocks=0,
            feature_norm="layer",
        ),
        dict(name="build_caches", kind="build_caches", **caches),
        dict(name="reopen_cut_short", kind="reopen_cut_short", **caches),
        dict(name="cache_failures", kind="cache_failures", **caches),
    ]


@pytest.fixture(scope="module")
def launch(demo_root, tmp_path_factory):
    """(folder of the scenarios, {scenario name: the finished torchrun process that ran it}).

    One launch runs the whole plan unless a scenario ends it (an error not raised by every rank
    together, or ranks left out of step); the scenarios after that one then run in a new
    launch, so that each test still judges its own scenario."""
    out, runs = tmp_path_factory.mktemp("two_processes"), {}
    scenarios = plan(demo_root, out)
    while scenarios:
        done = run_two_processes(scenarios, out)
        ran = [s["name"] for s in scenarios if (out / s["name"]).is_dir()]
        runs.update(dict.fromkeys(ran or [s["name"] for s in scenarios], done))
        scenarios = scenarios[len(ran) :] if ran else []
    return out, runs


def scenario(launch, name):
    """(folder of scenario `name`, stderr of its launch's end); fails unless a launch ran it."""
    out, runs = launch
    stderr = runs[name].stderr[-3000:]
    if not (out / name).is_dir():
        pytest.fail(f"scenario {name} never ran: its launch failed before it\n{stderr}")
    return out / name, stderr


def read_errors(folder):
    return [(folder / f"rank{r}_error.txt").read_text() for r in (0, 1)
            if (folder / f"rank{r}_error.txt").exists()]  # fmt: skip


def finished(launch, name):
    """The folder of scenario `name`; fails unless both ranks finished it without an error."""
    folder, stderr = scenario(launch, name)
    errors = read_errors(folder)
    done = all((folder / f"rank{r}_done").exists() for r in (0, 1))
    assert done and not errors, (errors, stderr)
    return folder


@pytest.mark.parametrize("decoder", ["showtell", "attention", "transformer"])
def test_two_process_ddp_equals_one_process_with_the_whole_batch(demo_root, tmp_path, launch,
                                                                 decoder):  # fmt: skip
    out = finished(launch, f"ddp_{decoder}")
    images = len(read_split(demo_root, "train").image_ids)
    assert images % 16 == 12  # the last batch is short: its tokens differ between the ranks
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])  # bit for bit
    for epoch in (0, 1):  # shards are disjoint and cover the epoch
        read = [
            [image for e, image in json.loads((out / f"rank{r}_reads.json").read_text()) if e == epoch]
            for r in (0, 1)
        ]  # fmt: skip
        assert len(read[0]) == len(read[1]) == images // 2
        assert not set(read[0]) & set(read[1]) and set(read[0]) | set(read[1]) == set(range(images))

    config = tiny_config(demo_root, tmp_path / "single", batch_size=16, decoder=decoder,
                         **DDP_AS_ONE, **SIZES.get(decoder, {}))  # fmt: skip
    single = train(config)
    history = json.loads((out / "ddp" / "history.json").read_text())
    assert len(history["step_loss"]) == len(single["step_loss"])  # the same number of steps
    weights = load_checkpoint(tmp_path / "single" / "last.pt")["model"]
    assert load_checkpoint(out / "ddp" / "last.pt")["epoch"] == 1
    # Scoring the 2x2 grid of a random frozen CNN, whose positions look alike, gets gradients
    # near rounding level, which Adam scales up to full steps: those two parameters only
    # agree to 1e-3 (all others to about 1e-6); so do the transformer's attention input
    # projections (up to 5e-4 apart: queries and keys over look-alike positions and words).
    noisy = {"decoder.hidden_attention.weight", "decoder.grid_attention.bias"}
    for name, value in weights.items():
        atol = 1e-3 if name in noisy or ".in_proj_" in name else 1e-5
        assert torch.allclose(ranks[0][name], value, rtol=1e-4, atol=atol), name
    assert history["train_loss"] == pytest.approx(single["train_loss"], rel=1e-5)
    assert history["val_loss"] == pytest.approx(single["val_loss"], rel=1e-5)
    assert not list((out / "ddp").glob(".*tmp*"))


def test_two_process_ddp_self_critical_stage(demo_root, launch):
    out = finished(launch, "self_critical")
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    # Each training step starts from rank 0's batch-norm statistics on both ranks (DDP's
    # broadcast_buffers); each rank then updates them with its own batch.
    statistics = [json.loads((out / f"rank{r}_statistics.json").read_text()) for r in (0, 1)]
    assert len(statistics[0]) > 2 and statistics[0] == statistics[1]
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])  # gradients shared
    xe = load_checkpoint(out / "ddp" / "best_cross_entropy.pt")["model"]
    assert any(not torch.equal(xe[k], ranks[0][k]) for k in xe)  # the stage changed the weights
    # The stage starts from rank 0's weights on both ranks, whatever rank 1 read.
    starts = [torch.load(out / f"rank{r}_scst_start.pt", weights_only=True) for r in (0, 1)]
    assert all(torch.equal(starts[0][k], starts[1][k]) for k in starts[0])
    # Each rank samples from random streams of its own; rank 0 from the run's seed.
    seeds = [json.loads((out / f"rank{r}_seed.json").read_text()) for r in (0, 1)]
    assert seeds[0] == 3 and seeds[1] != seeds[0]
    assert all(torch.equal(starts[0][k], xe[k]) for k in xe)
    # Each rank captions its half of the validation images, rank 0 alone scores all of them,
    # and every rank holds its CIDEr (best.pt, patience).
    histories = [json.loads((out / f"rank{r}_history.json").read_text()) for r in (0, 1)]
    assert histories[0]["val_cider"] == histories[1]["val_cider"] == [0.25, 0.25]
    validation = [json.loads((out / f"rank{r}_validation.json").read_text()) for r in (0, 1)]
    scored = sorted(read_split(demo_root, "val").image_ids[:10])  # tiny_config's val_images
    assert validation[0]["scored"] == [scored, scored] and validation[1]["scored"] == []
    for epoch in (0, 1):
        shares = [validation[r]["captioned"][epoch] for r in (0, 1)]
        assert len(shares[0]) == len(shares[1]) == 5 and sorted(shares[0] + shares[1]) == scored
    history = json.loads((out / "ddp" / "history.json").read_text())
    assert history["stage"] == ["xe", "scst"] and history["reward"][1] > 0
    images = len(read_split(demo_root, "train").image_ids)
    reads = [json.loads((out / f"rank{r}_scst_reads.json").read_text()) for r in (0, 1)]
    assert len(reads[0]) == len(reads[1]) == images // 2  # each rank its own half
    assert not set(reads[0]) & set(reads[1]) and set(reads[0]) | set(reads[1]) == set(range(images))
    # Every tensor handed to a collective lies on the rank's training device (gloo: the CPU), in
    # float64 (sums, flags), int64 (token counts), int32 (image masks), float32 (weights) or
    # uint8 (text).
    dtypes = {"torch.float64", "torch.int64", "torch.int32", "torch.uint8", "torch.float32"}
    for r in (0, 1):
        calls = json.loads((out / f"rank{r}_collectives.json").read_text())
        assert len(calls) > 20 and {device for _, device, _ in calls} == {"cpu"}, calls
        assert {dtype for _, _, dtype in calls} <= dtypes, calls


def test_a_nan_on_one_rank_stops_both_with_the_same_message(launch):
    # Read at step 3: rank 1's third loss (step 2) is NaN, rank 0's first three are finite (the
    # NaN reaches rank 0's weights through the gradient average only after step 2).
    out, stderr = scenario(launch, "nan_on_rank_1")
    errors = read_errors(out)
    # Rank 0's own losses are finite; it stops because rank 1's were not, and says so.
    assert len(errors) == 2 and errors[0] == errors[1], (errors, stderr)
    assert re.search(r"rank 1: FloatingPointError: .*loss became nan at step 2", errors[0])


def test_ranks_that_see_other_output_dirs_stop_at_start_up(launch):
    out, _ = scenario(launch, "output_dir_per_rank")
    errors = read_errors(out)
    assert len(errors) == 2 and all("must be a folder they share" in e for e in errors), errors
    assert str(out / "ddp" / "rank0") in errors[0]
    assert not (out / "ddp" / "rank0" / "last.pt").exists()  # stopped before training


def test_two_processes_build_the_caches_together_byte_for_byte(demo_root, tmp_path, launch):
    out = finished(launch, "build_caches")
    split = read_split(demo_root, "train")
    batches = -(-len(split.image_ids) // 8)
    # One process alone would keep the other waiting longer than the timeout.
    assert batches * DELAY > CACHE_TIMEOUT > (batches // 2 + 1) * DELAY
    torch.manual_seed(0)
    encoder = EncoderCNN(32, SmallCNN(), trainable_blocks=0)
    options = dict(cache_dir=tmp_path / "one", batch_size=8, progress=False)
    one = [cached_features(encoder, split, make_transform(32), **options).filename,
           cached_images(split, 32, **options).filename]  # fmt: skip
    for path in one:
        kind = "features" if "features" in str(path) else "images"
        other = out / "caches" / kind / os.path.basename(path)
        assert Path(path).read_bytes() == other.read_bytes(), kind  # byte for byte
    shares = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    batch_sizes = [share["batches"] for share in shares]
    assert sum(map(sum, batch_sizes)) == len(split.image_ids)  # every image once, by one rank
    assert [len(s) for s in batch_sizes] == [batches // 2, batches - batches // 2]
    assert not list((out / "caches").rglob(".*tmp*"))
    assert min(share["seconds"] for share in shares) > batches // 2 * DELAY  # the delay held


def test_a_cache_one_rank_finds_cut_short_is_built_again_by_both(demo_root, launch):
    # Rank 0 finds the finished feature cache, rank 1 finds it a byte short: opening it, the
    # ranks agree it is missing and each computes its share again (a rank left alone building
    # would wait for the other in a collective).
    out = finished(launch, "reopen_cut_short")
    shares = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [share["rebuilt"] for share in shares] == [share["built"] for share in shares]
    images = len(read_split(demo_root, "train").image_ids)
    assert sum(sum(share["rebuilt"]) for share in shares) == images  # each rank its share


def test_a_failure_on_one_rank_stops_both_with_one_message(launch):
    # Rank 1's disk is full while rank 0 still has seconds of batches to compute; then the ranks
    # do not share the cache folder; then rank 1's disk is too small. Each time both ranks raise
    # the same error, before the process group's timeout (no rank left waiting).
    out = finished(launch, "cache_failures")
    results = [json.loads((out / f"rank{r}_failures.json").read_text()) for r in (0, 1)]
    for failure in ("write", "unshared", "space"):
        (message, seconds), (other, other_seconds) = results[0][failure], results[1][failure]
        assert message is not None and message == other, failure
        assert max(seconds, other_seconds) < CACHE_TIMEOUT - 1, failure
    assert "rank 1" in results[0]["write"][0] and "No space left" in results[0]["write"][0]
    assert ".tmp-" in results[0]["write"][0]  # the message names the file
    unshared = results[0]["unshared"][0]
    caches = out / "caches"
    assert str(caches / "unshared" / "rank1") in unshared and "share the cache folder" in unshared
    space = results[0]["space"][0]
    assert str(caches / "space" / "images") in space and "1000 bytes" in space
    # Nothing is left behind: no cache, no temporary file.
    assert [p for p in caches.rglob("*") if p.is_file()] == []
