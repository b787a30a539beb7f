"""Peak resident memory of loader start-up and of training, each measured in a fresh process."""

import json
import subprocess
import sys

from bench.common import ROOT, coco_scale_dir, row

TRAIN_STEPS = 3


def peak_mib():
    """This process's peak resident memory (VmHWM; ru_maxrss would include the parent's at fork)."""
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return kib / 1024


def probe(name, workdir, quick):
    """Run one workload in this (fresh) process; (MiB after imports, peak MiB)."""
    import pycocotools.coco  # noqa: F401

    import captioning.training.train  # noqa: F401  the same imports before either way
    from bench import loader, training

    baseline = peak_mib()
    if name.startswith("loader-"):
        start = loader.project_start if name == "loader-project" else loader.naive_start
        start(coco_scale_dir(workdir, loader.copies(quick)))
    else:
        config, vocab, split, net = training.setup()
        cache = training.features(net, split) if name == "train-cache" else None
        training.train_steps(
            net, vocab, config, training.make_loader(split, vocab, cache), TRAIN_STEPS
        )
    return baseline, peak_mib()


def measure(name, workdir, quick):
    """`probe` in a subprocess, so that no two peaks mix."""
    cmd = [sys.executable, "-m", "bench.memory", name, str(workdir)] + ["--quick"] * quick
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"memory probe {name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(workdir, quick):
    """Yield the memory rows (peak MiB; the ratio is naive peak / project peak)."""
    from bench import loader, training

    loader.project_start(coco_scale_dir(workdir, loader.copies(quick)))  # a warm token cache
    _, _, split, net = training.setup()
    training.features(net, split)  # the feature cache exists before probing
    for label, project, naive, what in (
        ("loader start-up", "loader-project", "loader-naive", "warm token cache vs CVND start"),
        (
            "training",
            "train-cache",
            "train-cnn",
            f"{TRAIN_STEPS} steps from the cache vs through ResNet-50",
        ),
    ):
        (base, p), (_, n) = measure(project, workdir, quick), measure(naive, workdir, quick)
        yield row(
            f"peak memory, {label}",
            p,
            n,
            "MiB",
            note=f"{what}; above the {base:,.0f} MiB after imports: project "
            f"+{p - base:,.0f}, naive +{n - base:,.0f}",
        )


if __name__ == "__main__":
    print(json.dumps(probe(sys.argv[1], sys.argv[2], "--quick" in sys.argv[3:])))
