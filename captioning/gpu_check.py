"""`python -m captioning.gpu_check` (`make gpu-check`): the documented GPU commands as written,
shrunk, on CUDA."""

import argparse
import functools
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]  # the repository: commands run from there
# The developers' real COCO sample, where the tests find it (bench/real_data.py).
COCO_SAMPLE = (
    Path(os.environ.get("CAPTIONING_TEST_DATA") or ROOT.parent / "shared" / "data") / "coco-sample"
)
# demo_dataset.DEFAULT_DEMO_ROOT, where train.py writes the demo data when data_dir is none; not
# imported, so that the check still starts and reports when a project module is broken.
DEMO_ROOT = ROOT / "data" / "demo"
OUTPUT_DIR = Path("outputs") / "gpu-check"
DECODERS = ("showtell", "attention", "transformer")
# The COCO sample has 80 training images: batches of 16 give every rank of an 8-GPU torchrun at
# least one step, and the demo data's 4,000 images 250 steps an epoch, seconds on a GPU.
BATCH_SIZE = 16
VAL_IMAGES = 32
EVAL_IMAGES = 64
PHOTOS = 6
GRAYSCALE = "000000431848.jpg"  # the COCO sample's one grayscale image: real COCO has such files
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
STEP_TIMEOUT = 900  # seconds; a hung collective would otherwise stop the check for good
# Flushed, so that `make gpu-check | tee` shows each step as it starts.
say = functools.partial(print, flush=True)


@dataclass
class Step:
    """One command of the check."""

    name: str
    command: list
    env: dict = field(default_factory=dict)
    needs: tuple = ()  # steps that must pass first (a checkpoint to read)
    skip: str = ""  # why it does not run on this machine
    prepare: object = None  # called just before the command runs


@dataclass
class Result:
    """What one step did: `passed`, `FAILED ...` or `skipped: reason`; seconds None if skipped."""

    step: str
    status: str
    seconds: float | None = None


def project_path(path):
    """`path` relative to the project root where it lies under its parent, else absolute."""
    path = Path(path).absolute()
    return os.path.relpath(path, ROOT) if path.is_relative_to(ROOT.parent) else str(path)


def launchers():
    """(python, torchrun): the commands the documentation types, from this interpreter's environment."""
    python = project_path(sys.executable)  # .venv/bin/python under `make`
    torchrun = Path(sys.executable).parent / "torchrun"
    if torchrun.exists():
        return python, [project_path(torchrun)]
    return python, [python, "-m", "torch.distributed.run"]


def dataset():
    """(train.py's data flags, a folder of val images): the COCO sample if present, else demo data."""
    if (COCO_SAMPLE / "annotations" / "captions_train2017.json").exists():
        flags = ["--data-dir", project_path(COCO_SAMPLE), "--layout", "coco"]
        return flags, COCO_SAMPLE / "val2017"
    return [], DEMO_ROOT / "val2017"


def train_args(decoder, output_dir, device, data):
    """train.py's flags: frozen random ResNet-50 with the feature cache, one epoch of each stage."""
    return [
        *data, "--output-dir", str(output_dir), "--backbone", "resnet50", "--no-pretrained",
        "--trainable-blocks", "0", "--decoder", decoder, "--epochs", "1", "--scst-epochs", "1",
        "--batch-size", str(BATCH_SIZE), "--val-images", str(VAL_IMAGES), "--amp", "auto",
        "--device", device, "--no-progress",
    ]  # fmt: skip


def copy_photos(source, photos, count=PHOTOS):
    """Fill `photos` with the first `count` images of `source` (and the grayscale one there)."""
    if photos.is_dir() and any(photos.iterdir()):
        return photos
    images = sorted(p for p in Path(source).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    chosen = images[:count] + [p for p in images[count:] if p.name == GRAYSCALE]
    if not chosen:
        raise FileNotFoundError(f"no images to caption in {source}")
    photos.mkdir(parents=True, exist_ok=True)
    for image in chosen:
        shutil.copyfile(image, photos / image.name)
    return photos


def evaluation_steps(python, run, train, cache, skip=""):
    """evaluate.py on `run`'s best.pt, greedy and beam 3, once the step `train` has passed."""
    steps = []
    for beam, name in ((1, "greedy"), (3, "beam 3")):
        command = [python, "evaluate.py", str(run / "best.pt"), "--split", "val", "--limit",
                   str(EVAL_IMAGES), "--beam", str(beam), "--output-dir", str(run / "eval")]  # fmt: skip
        steps.append(Step(f"evaluate {run.name} {name}", command, cache, (train,), skip))
    return steps


def caption_steps(python, run, train, cache, photos, prepare):
    """caption.py on `run`'s last.pt (the self-critical weights) over a folder of photos."""
    greedy = [python, "caption.py", str(run / "last.pt"), str(photos),
              "--json", str(run / "captions_greedy.json")]  # fmt: skip
    beam = [python, "caption.py", str(run / "last.pt"), str(photos), "--beam", "3",
            "--json", str(run / "captions_beam3.json"), "--draw", str(run / "captioned")]  # fmt: skip
    if run.name in ("attention", "transformer"):
        beam.append("--attention")  # each word's attention map as well
    return [
        Step(f"caption {run.name} greedy", greedy, cache, (train,), prepare=prepare),
        Step(f"caption {run.name} beam 3", beam, cache, (train,), prepare=prepare),
    ]


def plan_steps(device="cuda", gpus=0, out=OUTPUT_DIR):
    """Every step of the check, in order, for `gpus` visible GPUs on `device`."""
    python, torchrun = launchers()
    data, val_images = dataset()
    out = Path(out)
    photos = out / "photos"
    # A fresh cache folder per launch: each run builds the feature caches (one process, then
    # every torchrun rank its share) instead of reading the user's or the other run's.
    cache = {"CAPTIONING_CACHE": str(out / "cache")}
    steps = []
    for decoder in DECODERS:
        command = [python, "train.py", *train_args(decoder, out / decoder, device, data)]
        steps.append(Step(f"train {decoder}", command, cache))
    for decoder in DECODERS:
        steps += evaluation_steps(python, out / decoder, f"train {decoder}", cache)
        steps += caption_steps(python, out / decoder, f"train {decoder}", cache, photos,
                               functools.partial(copy_photos, val_images, ROOT / photos))  # fmt: skip
    skip = "" if gpus >= 2 else f"{gpus} GPU{'' if gpus == 1 else 's'} visible, needs 2 or more"
    ranks = ["--standalone", "--nproc_per_node", str(gpus)]
    cache = {"CAPTIONING_CACHE": str(out / "cache-torchrun")}
    for decoder in DECODERS:
        run = out / f"torchrun-{decoder}"
        train = f"torchrun x{gpus} train {decoder}" if gpus >= 2 else f"torchrun train {decoder}"
        command = [*torchrun, *ranks, "train.py", *train_args(decoder, run, device, data)]
        steps.append(Step(train, command, cache, (), skip))
        steps += evaluation_steps(python, run, train, cache, skip)[:1]
    no_cuda = "" if device == "cuda" else "needs CUDA"
    steps += [
        Step("limit benchmark", [python, "-m", "bench", "--only", "limit", "--device", "cuda",
                                 "--json", "bench/results_gpu.json"], skip=no_cuda),
        Step("tests/test_cuda.py", [python, "-m", "pytest", "-q", "tests/test_cuda.py"],
             skip=no_cuda),
    ]  # fmt: skip
    return steps


def describe(step):
    """The step as a shell line, its environment first."""
    env = [f"{name}={shlex.quote(value)}" for name, value in step.env.items()]
    return " ".join([*env, shlex.join(step.command)])


def run_command(command, log, env, timeout):
    """Run `command` in the project root, its output appended to `log`; its exit status."""
    with open(log, "a") as output:
        process = subprocess.Popen(command, cwd=ROOT, env={**os.environ, **env}, stdout=output,
                                   stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        try:
            return process.wait(timeout=timeout)
        except BaseException:
            # A timeout or Ctrl-C: the whole session goes, so torchrun's workers do not outlive it.
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            raise


def run_steps(steps, out=OUTPUT_DIR, runner=run_command, timeout=STEP_TIMEOUT, echo=say):
    """Run `steps` in order, each one's output in out/logs; their results."""
    logs = ROOT / out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    results, passed = [], set()
    for number, step in enumerate(steps, 1):
        missing = [name for name in step.needs if name not in passed]
        if step.skip or missing:
            results.append(
                Result(step.name, f"skipped: {step.skip or missing[0] + ' did not pass'}")
            )
            echo(f"[{number}/{len(steps)}] {step.name}: {results[-1].status}")
            continue
        log = logs / f"{number:02d}-{step.name.replace(' ', '-').replace('/', '-')}.log"
        log.write_text(describe(step) + "\n\n")
        echo(f"[{number}/{len(steps)}] {step.name}: {describe(step)}")
        start = time.monotonic()
        try:
            if step.prepare:
                step.prepare()
            code = runner(step.command, log, step.env, timeout)
            status = "passed" if code == 0 else f"FAILED exit {code}"
        except subprocess.TimeoutExpired:
            status = f"FAILED timeout after {timeout} s"
        except Exception as error:  # a folder to caption missing, a program not found
            with open(log, "a") as output:
                output.write(f"\n{type(error).__name__}: {error}\n")
            status = f"FAILED {type(error).__name__}: {error}"
        results.append(Result(step.name, status, time.monotonic() - start))
        if status == "passed":
            passed.add(step.name)
        else:
            tail = "".join(log.read_text(errors="replace").splitlines(True)[-20:])
            echo(f"{status}; the end of {project_path(log)}:\n{tail}")
    return results


def format_table(results):
    """The results as one Markdown table: step, status, seconds."""
    rows = ["| step | status | seconds |", "|---|---|---|"]
    for r in results:
        seconds = "-" if r.seconds is None else f"{r.seconds:.1f}"
        rows.append(f"| {r.step} | {r.status.replace('|', '/')} | {seconds} |")
    return "\n".join(rows)


def exit_status(results):
    """1 if any step failed, else 0 (skipped steps do not fail the check)."""
    return int(any(r.status.startswith("FAILED") for r in results))


def machine(device):
    """One line on what the check runs on: torch, the GPUs, the data."""
    data = project_path(COCO_SAMPLE) if dataset()[0] else "the built-in demo data"
    if device != "cuda":
        return f"torch {torch.__version__} on the CPU (a plumbing run), data: {data}"
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    bf16 = "native bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "no bf16"
    return (f"torch {torch.__version__}, CUDA {torch.version.cuda}, {len(names)} x "
            f"{', '.join(sorted(set(names)))} ({bf16}), data: {data}")  # fmt: skip


def gpu_check(device="cuda", out=OUTPUT_DIR, runner=run_command, timeout=STEP_TIMEOUT, echo=say):
    """Run every step from a clean out/ on `device`; the results, also written as out/summary.md."""
    gpus = torch.cuda.device_count() if device == "cuda" else 0
    steps = plan_steps(device, gpus, out)
    folder = ROOT / out
    for name in ("showtell", "attention", "torchrun-showtell", "torchrun-attention", "cache",
                 "cache-torchrun", "photos", "logs"):  # fmt: skip
        shutil.rmtree(folder / name, ignore_errors=True)  # a run starts fresh, never resumes
    header = machine(device)
    echo(header)
    results = run_steps(steps, out, runner, timeout, echo)
    (folder / "summary.md").write_text(f"{header}\n\n{format_table(results)}\n")
    return results


def main(argv=None):
    """Command line: the check's exit status (0 passed, 1 a step failed, 2 no CUDA)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--device", choices=("cuda", "cpu"), default="cuda",
        help="cpu: only to test the plumbing (slow; no benchmark, no CUDA tests)",
    )  # fmt: skip
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("--output-dir", type=Path, default=OUTPUT_DIR, help="logs, runs, summary")
    parser.add_argument("--timeout", type=float, default=STEP_TIMEOUT, help="seconds per step")
    args = parser.parse_args(argv)
    if args.dry_run:
        gpus = torch.cuda.device_count() if args.device == "cuda" else 0
        for step in plan_steps(args.device, gpus, Path(project_path(args.output_dir))):
            print(f"# {step.name}: skipped, {step.skip}" if step.skip else describe(step))
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: this check needs a GPU (torch.cuda.is_available() is False)")
        return 2
    out = Path(project_path(args.output_dir))  # commands run in the project root
    results = gpu_check(args.device, out, timeout=args.timeout)
    print(f"\n{format_table(results)}\n\nlogs: {out / 'logs'}/, table: {out / 'summary.md'}")
    return exit_status(results)


if __name__ == "__main__":
    sys.exit(main())
