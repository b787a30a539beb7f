"""`python -m bench`: each benchmark times the project's way and the naive way; a table and JSON."""

import argparse
import json
import os
import tempfile
import time
import traceback
from pathlib import Path

import torch

from bench import common, decoding, limit, loader, memory, real_data, reward, training

BENCHMARKS = {
    "loader": loader, "training": training, "decoding": decoding, "memory": memory,
    "reward": reward, "limit": limit,
}  # fmt: skip


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "--only",
        action="append",
        metavar="NAME",
        help=f"run only these (repeat or comma-separate): {', '.join(BENCHMARKS)}",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument(
        "--json",
        default=str(Path(__file__).parent / "results.json"),
        help="where to write the results (default: bench/results.json)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="torch threads (default: torch's own choice); "
        "1 gives steadier figures on a busy machine",
    )
    parser.add_argument(
        "--device",
        default="cpu",
        help="where the limit benchmark runs (cpu, cuda); the others run on the CPU",
    )
    parser.add_argument(
        "--workdir",
        help="folder for data and caches, kept afterwards (default: a temporary folder, deleted)",
    )
    args = parser.parse_args(argv)
    names = [n for item in args.only or BENCHMARKS for n in item.split(",") if n]
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}")
    args.only = [n for n in BENCHMARKS if n in names]  # always in this order
    return args


def table(rows):
    """The results as an aligned text table."""
    head = ("benchmark", "project", "naive", "unit", "ratio", "target")
    lines = [
        (
            r["name"],
            common.number(r["project"]),
            common.number(r["naive"]),
            r["unit"],
            f"{common.number(r['ratio'])}x",
            "-"
            if r["target"] is None
            else f">= {r['target']:g}x " + ("met" if r["met"] else "MISSED"),
        )
        for r in rows
    ]
    widths = [max(len(x[i]) for x in [head] + lines) for i in range(len(head))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(x, widths)).rstrip() for x in [head] + lines
    )


def main(argv=None):
    args = parse_args(argv)
    for needed in (common.VAL_CAPTIONS, common.COCO_SAMPLE):
        if not needed.exists():
            raise SystemExit(f"python -m bench: {real_data.missing(needed)}")
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # for the memory probes' processes
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    info = common.machine_info()
    print(
        f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']} "
        f"({info['torch_threads']} threads), "
        f"load average {info['load_average_at_start']}" + (" (quick sizes)" if args.quick else "")
    )
    rows, errors = [], {}
    with tempfile.TemporaryDirectory(prefix="captioning-bench-") as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        os.environ["CAPTIONING_CACHE"] = str(workdir / "cache")  # never the user's cache
        for name in args.only:
            print(f"[{name}]", flush=True)
            bench_start = time.perf_counter()
            try:
                extra = {"device": args.device} if name == "limit" else {}
                for r in BENCHMARKS[name].run(workdir, args.quick, **extra):
                    print("  " + common.describe(r), flush=True)
                    rows.append({"benchmark": name, **r})
            except Exception as e:  # report and go on: benchmarks never stop the others
                traceback.print_exc()
                errors[name] = f"{type(e).__name__}: {e}"
            print(f"  ({name}: {time.perf_counter() - bench_start:.0f} s)", flush=True)
    wall = time.perf_counter() - started
    print("\n" + table(rows))
    for name, error in errors.items():
        print(f"{name} FAILED: {error}")
    print(f"total wall time {wall:.0f} s")
    result = {
        "machine": info,
        "quick": args.quick,
        "wall_seconds": round(wall, 1),
        "results": rows,
        "errors": errors,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print(f"results written to {args.json}")


if __name__ == "__main__":
    main()
