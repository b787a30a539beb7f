"""`gpu_check.py` without a GPU: the commands it builds, the table, the exit statuses."""

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from captioning import gpu_check
from captioning.demo.dataset import DEFAULT_DEMO_ROOT


def dry_run(capsys, *args):
    """The commands `gpu_check.py --dry-run` prints, each split into words."""
    assert gpu_check.main(["--dry-run", *args]) == 0
    return [shlex.split(line) for line in capsys.readouterr().out.splitlines()]


def flag(command, name):
    """The value after `name` in `command`."""
    return command[command.index(name) + 1]


@pytest.fixture
def gpus(monkeypatch):
    """Set how many GPUs torch sees."""
    return lambda n: monkeypatch.setattr(torch.cuda, "device_count", lambda: n)


@pytest.fixture
def sample(tmp_path, monkeypatch):
    """A stand-in COCO sample (annotations and a few image files) where the check looks for it."""
    root = tmp_path / "coco-sample"
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "captions_train2017.json").write_text("{}")
    (root / "val2017").mkdir()
    for name in ["000000000139.jpg", "000000000285.jpg", gpu_check.GRAYSCALE, "readme.txt"]:
        (root / "val2017" / name).write_bytes(b"not decoded by the check")
    monkeypatch.setattr(gpu_check, "COCO_SAMPLE", root)
    return root


def test_trains_every_decoder_for_one_epoch_of_each_stage_then_evaluates_and_captions(capsys, gpus):
    gpus(1)
    commands = dry_run(capsys)
    trains = [c for c in commands if "train.py" in c]
    assert sorted(flag(c, "--decoder") for c in trains) == ["attention", "showtell", "transformer"]
    for command in trains:
        assert command[1:3] == [gpu_check.project_path(sys.executable), "train.py"]
        assert flag(command, "--epochs") == "1" and flag(command, "--scst-epochs") == "1"
        assert flag(command, "--amp") == "auto" and flag(command, "--device") == "cuda"
        assert flag(command, "--backbone") == "resnet50" and "--no-pretrained" in command
        assert flag(command, "--trainable-blocks") == "0"  # frozen: the feature cache is built
        assert command[0].startswith("CAPTIONING_CACHE=")  # never the user's cache
    evaluations = [c for c in commands if "evaluate.py" in c]
    assert sorted(flag(c, "--beam") for c in evaluations) == ["1", "1", "1", "3", "3", "3"]
    captions = [c for c in commands if "caption.py" in c]
    assert len(captions) == 6 and sum("--attention" in c for c in captions) == 2  # grid decoders
    assert commands[-2][1:7] == ["-m", "bench", "--only", "limit", "--device", "cuda"]
    assert commands[-1][-1] == "tests/test_cuda.py"


@pytest.mark.parametrize("count", [0, 1, 2, 4])
def test_torchrun_runs_the_same_training_when_two_or_more_gpus_are_visible(capsys, gpus, count):
    gpus(count)
    commands = dry_run(capsys)
    torchrun = [c for c in commands if "--nproc_per_node" in c]
    if count < 2:
        skipped = [" ".join(c) for c in commands if c[0] == "#"][:6]
        assert not torchrun and all("needs 2 or more" in line for line in skipped)
        assert skipped[0].startswith("# torchrun train showtell: skipped")
        return
    single = [c for c in commands if "train.py" in c and c not in torchrun]
    assert len(torchrun) == 3
    for command, alone in zip(torchrun, single):
        assert "--standalone" in command and flag(command, "--nproc_per_node") == str(count)
        after = command[command.index("train.py") + 1 :]
        assert after == [flag(command, "--output-dir") if w == flag(alone, "--output-dir") else w
                         for w in alone[alone.index("train.py") + 1 :]]  # fmt: skip
        assert flag(command, "--output-dir") != flag(alone, "--output-dir")
        # Its own cache folder: the ranks build the feature cache together.
        assert command[0] != alone[0]


def test_uses_the_coco_sample_when_present_else_the_demo_data(capsys, gpus, sample):
    gpus(0)
    for command in (c for c in dry_run(capsys) if "train.py" in c):
        assert flag(command, "--data-dir") == gpu_check.project_path(sample)
        assert flag(command, "--layout") == "coco"
    (sample / "annotations" / "captions_train2017.json").unlink()
    for command in (c for c in dry_run(capsys) if "train.py" in c):
        assert "--data-dir" not in command  # none: the built-in demo data
    assert gpu_check.DEMO_ROOT == DEFAULT_DEMO_ROOT


def test_the_real_sample_is_named_as_the_readme_writes_it():
    if not (gpu_check.COCO_SAMPLE / "annotations" / "captions_train2017.json").exists():
        pytest.skip(f"real COCO sample not found at {gpu_check.COCO_SAMPLE}")
    assert gpu_check.dataset()[0] == [
        "--data-dir",
        "../shared/data/coco-sample",
        "--layout",
        "coco",
    ]


def test_cpu_runs_the_commands_on_the_cpu_and_skips_what_needs_cuda(capsys, gpus):
    gpus(4)  # the CPU run never starts torchrun, whatever GPUs there are
    commands = dry_run(capsys, "--device", "cpu")
    assert all(flag(c, "--device") == "cpu" for c in commands if "train.py" in c)
    skipped = [" ".join(c) for c in commands if c[0] == "#"]
    assert len(skipped) == 8 and all("skipped" in line for line in skipped)
    assert skipped[-2:] == ["# limit benchmark: skipped, needs CUDA",
                            "# tests/test_cuda.py: skipped, needs CUDA"]  # fmt: skip


def test_without_cuda_the_check_exits_2(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == 2
    assert "needs a GPU" in capsys.readouterr().out


def test_a_failed_step_skips_what_needs_it_and_the_table_says_so(tmp_path, sample, gpus):
    gpus(0)
    calls = []

    def runner(command, log, env, timeout):
        calls.append(command)
        if "attention" in command and "train.py" in command:
            with open(log, "a") as output:
                output.write("CUDA error: out of memory\n")
            return 3
        if "--beam" in command and "evaluate.py" in command:
            raise subprocess.TimeoutExpired(command, timeout)
        return 0

    lines = []
    results = gpu_check.gpu_check("cpu", tmp_path / "out", runner, 5, lines.append)
    status = {r.step: r.status for r in results}
    assert status["train showtell"] == "passed" and status["caption showtell beam 3"] == "passed"
    assert status["train attention"] == "FAILED exit 3"
    assert status["evaluate showtell beam 3"] == "FAILED timeout after 5 s"
    for step in [
        "evaluate attention greedy",
        "caption attention greedy",
        "caption attention beam 3",
    ]:
        assert status[step] == "skipped: train attention did not pass"
    assert status["limit benchmark"] == "skipped: needs CUDA"
    assert len(calls) == sum(r.seconds is not None for r in results) == 11
    assert gpu_check.exit_status(results) == 1
    # The failure is shown with the end of its log as it happens.
    assert any("FAILED exit 3" in line and "out of memory" in line for line in lines)
    table = (tmp_path / "out" / "summary.md").read_text().split("\n\n")[1].splitlines()
    assert table[:2] == ["| step | status | seconds |", "|---|---|---|"]
    assert len(table) == 2 + len(results)
    assert table[3].startswith("| train attention | FAILED exit 3 | ") and table[3].endswith(" |")
    assert "| torchrun train showtell | skipped: 0 GPUs visible, needs 2 or more | - |" in table
    # Each run step's log starts with its command line; the photos were copied to caption.
    logs = sorted((tmp_path / "out" / "logs").iterdir())
    assert len(logs) == 11 and logs[0].read_text().startswith("CAPTIONING_CACHE=")
    photos = sorted(p.name for p in (tmp_path / "out" / "photos").iterdir())
    assert photos == ["000000000139.jpg", "000000000285.jpg", gpu_check.GRAYSCALE]


def test_all_passed_or_skipped_is_exit_0_and_a_new_run_starts_clean(tmp_path, sample, gpus):
    gpus(0)
    stale = tmp_path / "showtell" / "last.pt"
    stale.parent.mkdir()
    stale.write_text("an earlier run's checkpoint")
    results = gpu_check.gpu_check("cpu", tmp_path, lambda *a: 0, 5, lambda line: None)
    assert gpu_check.exit_status(results) == 0 and not stale.exists()
    assert {r.status for r in results} == {"passed", "skipped: needs CUDA",
                                           "skipped: 0 GPUs visible, needs 2 or more"}  # fmt: skip


def test_copy_photos_takes_the_first_images_and_the_grayscale_one(tmp_path, sample):
    photos = gpu_check.copy_photos(sample / "val2017", tmp_path / "photos", count=1)
    assert sorted(p.name for p in photos.iterdir()) == ["000000000139.jpg", gpu_check.GRAYSCALE]
    with pytest.raises(FileNotFoundError, match="no images"):
        gpu_check.copy_photos(sample / "annotations", tmp_path / "none")


def test_run_command_logs_the_output_and_returns_the_exit_status(tmp_path):
    log = tmp_path / "step.log"
    command = [sys.executable, "-c", "import os; print(os.environ['CHECK']); raise SystemExit(4)"]
    assert gpu_check.run_command(command, log, {"CHECK": "seen"}, 60) == 4
    assert log.read_text() == "seen\n"


def test_a_timeout_kills_the_step_and_what_it_started(tmp_path):
    # As torchrun starts workers: a child that starts a grandchild, both still running.
    pid_file = tmp_path / "pid"
    child = ("import subprocess, sys; p = subprocess.Popen(['sleep', '60']); "
             "open(sys.argv[1], 'w').write(str(p.pid)); p.wait()")  # fmt: skip
    start = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        gpu_check.run_command([sys.executable, "-c", child, str(pid_file)], tmp_path / "log", {}, 3)
    assert time.monotonic() - start < 10
    grandchild = int(pid_file.read_text())
    for _ in range(50):  # killed; reaped by init or left a zombie, but not running
        try:
            state = Path(f"/proc/{grandchild}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            break
        if state in ("Z", "X"):
            break
        time.sleep(0.1)
    else:
        os.kill(grandchild, 9)
        pytest.fail(f"the step's grandchild {grandchild} outlived the timeout")
