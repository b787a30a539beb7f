"""Shared helpers: result rows, timing, machine info, and the data every benchmark runs on."""

import contextlib
import json
import math
import os
import platform
import tempfile
import time
from pathlib import Path

from bench import real_data

ROOT = Path(__file__).resolve().parent.parent
# The real COCO material ($CAPTIONING_TEST_DATA, else ../shared/data): bench/real_data.py.
VAL_CAPTIONS = real_data.val_captions()
COCO_SAMPLE = real_data.coco_sample()
DECODER_VOCAB = 10_000  # output size of the benchmark decoders (COCO train's vocabulary is ~10k)


def row(name, project, naive, unit, target=None, higher_is_better=False, note=""):
    """One result: both figures, their ratio (how many times better the project is) and target."""
    ratio = project / naive if higher_is_better else naive / project
    return {
        "name": name,
        "project": project,
        "naive": naive,
        "unit": unit,
        "ratio": ratio,
        "target": target,
        "met": None if target is None else ratio >= target,
        "note": note,
    }


def number(value):
    """A figure with about three significant digits, never in exponent form."""
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    digits = max(0, 2 - math.floor(math.log10(abs(value))))
    return f"{value:,.{digits}f}"


def describe(r):
    """`name: project 1.9 s, naive 41.2 s, ratio 21.7x (target >= 10x)`."""
    target = f"target >= {r['target']:g}x" if r["target"] is not None else "no target"
    note = f"; {r['note']}" if r["note"] else ""
    return (
        f"{r['name']}: project {number(r['project'])} {r['unit']}, naive "
        f"{number(r['naive'])} {r['unit']}, ratio {number(r['ratio'])}x ({target}){note}"
    )


def timed(fn, *args, **kwargs):
    """(fn's result, seconds it took)."""
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


@contextlib.contextmanager
def fresh_cache(workdir):
    """CAPTIONING_CACHE pointed at a new, empty folder under `workdir` for the duration."""
    old = os.environ.get("CAPTIONING_CACHE")
    os.environ["CAPTIONING_CACHE"] = tempfile.mkdtemp(prefix="cache-", dir=workdir)
    try:
        yield
    finally:
        if old is None:
            del os.environ["CAPTIONING_CACHE"]
        else:
            os.environ["CAPTIONING_CACHE"] = old


def machine_info():
    """CPU model, cores, load and library versions, for the results file."""
    import torch

    cpu = platform.processor()
    with open("/proc/cpuinfo") as f:
        cpu = next(
            (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu
        )
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def coco_scale_dir(workdir, copies):
    """COCO 2017 layout whose train captions are val2017's, replicated `copies` times (no images)."""
    root = Path(workdir) / f"coco-x{copies}"
    path = root / "annotations" / "captions_train2017.json"
    if path.exists():
        return root
    src = json.loads(VAL_CAPTIONS.read_text(encoding="utf-8"))
    images, annotations = [], []
    for c in range(copies):  # COCO ids are below 1e6, so offsets of 1e6 never collide
        for im in src["images"]:
            new_id = im["id"] + c * 1_000_000
            images.append({**im, "id": new_id, "file_name": f"{new_id:012d}.jpg"})
        for a in src["annotations"]:
            annotations.append(
                {**a, "id": a["id"] + c * 1_000_000, "image_id": a["image_id"] + c * 1_000_000}
            )
    (root / "train2017").mkdir(parents=True, exist_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(
        json.dumps({**src, "images": images, "annotations": annotations}), encoding="utf-8"
    )
    os.replace(tmp, path)
    return root


def coco_vocab():
    """Vocabulary of the 25,014 real val2017 captions, every word kept (7,380 entries)."""
    from captioning.data.annotations import read_coco_file
    from captioning.data.loading import load_or_build_vocab

    split = read_coco_file(VAL_CAPTIONS, VAL_CAPTIONS.parent, "val")
    return load_or_build_vocab(
        vocab_file=None, vocab_threshold=1, vocab_from_file=False, train_split=split
    )
