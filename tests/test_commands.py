"""The five commands speak to people: bad input ends in one line on stderr and a non-zero exit
(the traceback with --debug or CAPTIONING_DEBUG=1), bugs keep their traceback, and progress bars
show only on a terminal unless CAPTIONING_PROGRESS says otherwise."""

import ast
import io
import json
import os
import subprocess
import sys
import urllib.error
from pathlib import Path

import pytest
import torchvision

from captioning import caption, command
from captioning.checkpoint import CheckpointError
from captioning.config import ConfigError
from captioning.data import download
from captioning.data.annotations import AnnotationError
from captioning.data.download import DownloadError, RemoteFile
from captioning.data.feature_cache import CacheSpaceError
from captioning.data.loading import ImageLoadError
from captioning.demo import run as demo
from captioning.distributed import DistributedError
from captioning.evaluation import evaluate
from captioning.training import train
from tests.helpers import ROOT


@pytest.fixture(autouse=True)
def no_debug_or_progress_setting(monkeypatch):
    """Each test starts from the person's default: neither variable set."""
    monkeypatch.delenv("CAPTIONING_DEBUG", raising=False)
    monkeypatch.delenv("CAPTIONING_PROGRESS", raising=False)


def offline(name, weights=None):
    """torchvision's get_model on a machine without a network."""
    raise urllib.error.URLError("[Errno -2] Name or service not known")


def broken_checkpoint(folder):
    path = folder / "broken.pt"
    path.write_bytes(b"not a checkpoint")
    return str(path)


def train_args(data_dir, tmp_path):
    # --preset none: the demo preset, which demo data gets, downloads no weights.
    return ["--data-dir", str(data_dir), "--output-dir", str(tmp_path / "run"), "--preset", "none",
            "--backbone", "resnet18", "--vocab-threshold", "1", "--val-images", "4",
            "--num-workers", "0", "--no-progress"]  # fmt: skip


def train_without_internet(root, tmp, monkeypatch):
    monkeypatch.setattr(torchvision.models, "get_model", offline)
    return train_args(root, tmp)


def download_from_an_unreachable_server(root, tmp, monkeypatch):
    table = {"val2014.zip": RemoteFile("http://127.0.0.1:9/val2014.zip", None, None)}  # discard
    monkeypatch.setattr(download, "COCO_FILES", table)
    return ["--root", str(tmp), "--splits", "val", "--no-karpathy", "--no-progress"]


# name: (a command's main, its arguments made from (demo_root, tmp_path, monkeypatch), the error
# it raises, what the message says)
CASES = {
    "train without internet": (
        train.main, train_without_internet, RuntimeError,
        "Could not download the ImageNet weights for resnet18",
    ),
    "train on a missing folder": (
        train.main, lambda root, tmp, mp: train_args(tmp / "nowhere", tmp), FileNotFoundError,
        "nowhere: data folder not found",
    ),
    "evaluate a broken checkpoint": (
        evaluate.main, lambda root, tmp, mp: [broken_checkpoint(tmp), "--data-dir", str(root)],
        CheckpointError, "broken.pt: not a usable checkpoint",
    ),
    "caption a missing image": (
        caption.main, lambda root, tmp, mp: [broken_checkpoint(tmp), str(tmp / "nope.jpg")],
        FileNotFoundError, "nope.jpg: no such image file or folder",
    ),
    "caption with a broken checkpoint": (
        caption.main,
        lambda root, tmp, mp: [broken_checkpoint(tmp), str(next((root / "test2017").iterdir()))],
        CheckpointError, "broken.pt: not a usable checkpoint",
    ),
    "demo with a refused value": (
        demo.main, lambda root, tmp, mp: ["--epochs", "-1", "--output-dir", str(tmp)],
        ConfigError, "epochs: -1 is not allowed; it must be at least 1",
    ),
    "download from an unreachable server": (
        download.main, download_from_an_unreachable_server, DownloadError,
        "http://127.0.0.1:9/val2014.zip: cannot connect",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_on_stderr_and_a_failed_exit(
    case, demo_root, tmp_path, monkeypatch, capsys
):
    main, make_args, _, message = CASES[case]
    args = make_args(demo_root, tmp_path, monkeypatch)
    monkeypatch.setattr(sys, "argv", ["the-command.py"])  # how argparse and the error name it
    with pytest.raises(SystemExit) as stop:
        main(args)
    assert stop.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("the-command.py: error: ") and message in lines[-1], err
    assert [line for line in lines if "error" in line] == lines[-1:], err


@pytest.mark.parametrize("case", CASES)
def test_debug_flag_shows_the_original_error(case, demo_root, tmp_path, monkeypatch):
    main, make_args, error, message = CASES[case]
    with pytest.raises(error, match=message):
        main([*make_args(demo_root, tmp_path, monkeypatch), "--debug"])


def test_debug_variable_shows_the_original_error(tmp_path, monkeypatch):
    monkeypatch.setenv("CAPTIONING_DEBUG", "1")
    with pytest.raises(CheckpointError, match="broken.pt: not a usable checkpoint"):
        evaluate.main([broken_checkpoint(tmp_path)])


def test_argparse_errors_still_print_usage_and_exit_2(capsys):
    with pytest.raises(SystemExit) as stop:
        caption.main([])
    assert stop.value.code == 2 and "usage:" in capsys.readouterr().err


def test_a_bug_keeps_its_traceback(tmp_path, monkeypatch):
    def find_images(inputs):
        raise TypeError("a bug")

    monkeypatch.setattr(caption, "find_images", find_images)
    with pytest.raises(TypeError, match="a bug"):
        caption.main([broken_checkpoint(tmp_path), "image.jpg"])

    def run_demo(*args, **kwargs):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")  # torch's, a bug

    monkeypatch.setattr(demo, "run_demo", run_demo)
    with pytest.raises(RuntimeError, match="mat1 and mat2"):
        demo.main([])


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, capsys):
    def run_demo(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "run_demo", run_demo)
    monkeypatch.setattr(sys, "argv", ["demo.py"])
    with pytest.raises(SystemExit) as stop:
        try:
            demo.main([])
        except KeyboardInterrupt:  # escaping, it would stop the whole test session
            pytest.fail("Ctrl-C came through as KeyboardInterrupt")
    assert stop.value.code == 130
    assert capsys.readouterr().err == "demo.py: interrupted\n"
    with pytest.raises(KeyboardInterrupt):
        demo.main(["--debug"])


def test_success_returns_what_main_returns(monkeypatch):
    monkeypatch.setattr(demo, "run_demo", lambda *args, **kwargs: {"total_seconds": 1})
    assert demo.main([]) == {"total_seconds": 1}


def test_the_console_entry_exits_0_and_keeps_every_failure_status(monkeypatch, capsys):
    """`main.console_script`, what [project.scripts] runs: 0 on success (not main's results,
    which sys.exit would print and exit 1 with), argparse's 2, a user error's 1, Ctrl-C's 130."""
    monkeypatch.setattr(demo, "run_demo", lambda *args, **kwargs: {"total_seconds": 1})
    monkeypatch.setattr(sys, "argv", ["captioning-demo"])
    assert demo.main.console_script() == 0
    statuses = {}
    for case, argv in (("usage", ["--no-such-flag"]), ("user error", ["--epochs", "-1"])):
        monkeypatch.setattr(sys, "argv", ["captioning-demo", *argv])
        with pytest.raises(SystemExit) as stop:
            demo.main.console_script()
        statuses[case] = stop.value.code

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "run_demo", interrupted)
    monkeypatch.setattr(sys, "argv", ["captioning-demo"])
    with pytest.raises(SystemExit) as stop:
        demo.main.console_script()
    statuses["Ctrl-C"] = stop.value.code
    assert statuses == {"usage": 2, "user error": 1, "Ctrl-C": 130}
    assert capsys.readouterr().err.splitlines()[-1] == "captioning-demo: interrupted"


# A results file scored against its annotations: the fastest real run of an installed command.
ANNOTATIONS = {
    "images": [{"id": 1, "file_name": "1.jpg"}, {"id": 2, "file_name": "2.jpg"}],
    "annotations": [
        {"id": 1, "image_id": 1, "caption": "a red circle above a blue square"},
        {"id": 2, "image_id": 1, "caption": "a red disc over a blue box"},
        {"id": 3, "image_id": 2, "caption": "a green star"},
    ],
}
RESULTS = [{"image_id": 1, "caption": "a red circle above a blue square"},
           {"image_id": 2, "caption": "a green star"}]  # fmt: skip


def installed_script(name):
    """The console script pip wrote beside this Python (skips when the project is not installed)."""
    script = Path(sys.executable).parent / name
    if not script.exists():
        pytest.skip(f"{script} not found: install the project (pip install -e .) to get it")
    return script


def test_installed_commands_exit_0_on_success_and_1_on_bad_input(tmp_path):
    script = installed_script("captioning-evaluate")
    (tmp_path / "A.json").write_text(json.dumps(ANNOTATIONS))
    (tmp_path / "R.json").write_text(json.dumps(RESULTS))
    # Without java on PATH, METEOR (seconds of start-up) is skipped; the others score in Python.
    env = {**os.environ, "PATH": str(tmp_path / "no-java")}
    env.pop("CAPTIONING_DEBUG", None)
    runs = {
        name: subprocess.Popen(
            [str(script), "--results", "R.json", "--annotations", annotations],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for name, annotations in (("scored", "A.json"), ("missing", "missing.json"))
    }
    (out, err), status = runs["scored"].communicate(timeout=120), runs["scored"].returncode
    assert status == 0, err
    assert "CIDEr" in out and "{" not in err  # no results dict dumped by sys.exit
    (out, err), status = runs["missing"].communicate(timeout=120), runs["missing"].returncode
    assert status == 1
    assert err.splitlines() == [
        "captioning-evaluate: error: COCO annotations file not found: missing.json"
    ]


def raised(error):
    """`error` as raised and caught, context and all."""
    try:
        raise error
    except Exception as caught:
        return caught


@pytest.mark.parametrize(
    "error",
    [
        ConfigError("x"),
        AnnotationError("x"),
        CheckpointError("x"),
        DownloadError("x"),
        DistributedError("x"),
        ImageLoadError("x"),
        CacheSpaceError("x"),
        FileNotFoundError("x"),
        PermissionError("x"),
    ],  # fmt: skip
)
def test_errors_that_mean_bad_input(error):
    assert command.is_user_error(raised(error))


def test_weights_errors_mean_bad_input_though_they_are_runtime_errors():
    from model import WeightsError

    assert command.is_user_error(raised(WeightsError("x")))
    assert issubclass(WeightsError, RuntimeError)  # as model.py raised them before


@pytest.mark.parametrize(
    "error",
    [TypeError("x"), AssertionError("x"), KeyError("x"), AttributeError("x"), IndexError("x"),
     NameError("x"), ZeroDivisionError("x"), RuntimeError("x"), NotImplementedError("x")],
)  # fmt: skip
def test_errors_that_mean_a_bug(error):
    assert not command.is_user_error(raised(error))


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bars_show_only_on_a_terminal_unless_the_variable_says(monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a log file, CI
    assert command.progress_disabled(True) is True
    monkeypatch.setenv("CAPTIONING_PROGRESS", "1")
    assert command.progress_disabled(True) is False
    assert command.progress_disabled(False) is True  # progress=False: always off

    monkeypatch.setattr(sys, "stderr", Terminal())
    monkeypatch.delenv("CAPTIONING_PROGRESS")
    assert command.progress_disabled(True) is False
    assert command.progress_disabled(False) is True
    monkeypatch.setenv("CAPTIONING_PROGRESS", "0")
    assert command.progress_disabled(True) is True


def test_progress_bars_show_in_a_notebook(monkeypatch):
    import types

    class ZMQInteractiveShell:  # what get_ipython() returns in a Jupyter kernel
        pass

    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a kernel's stderr is no terminal
    assert command.progress_disabled(True) is True
    ipython = types.SimpleNamespace(get_ipython=ZMQInteractiveShell)
    monkeypatch.setitem(sys.modules, "IPython", ipython)
    assert command.progress_disabled(True) is False
    assert command.progress_disabled(False) is True


def test_a_bar_asked_for_stays_out_of_a_log(tmp_path, capsys, monkeypatch):
    from captioning.demo.dataset import make_demo_dataset

    tiny = dict(n_train=2, n_val=1, n_test=1, image_size=16, progress=True)
    make_demo_dataset(tmp_path / "quiet", **tiny)
    assert capsys.readouterr().err == ""  # stderr captured: not a terminal
    monkeypatch.setenv("CAPTIONING_PROGRESS", "1")
    make_demo_dataset(tmp_path / "asked", **tiny)
    assert "demo dataset" in capsys.readouterr().err


def test_every_progress_bar_follows_the_rule():
    """Each tqdm bar in the package takes its `disable=` from `progress_disabled`."""
    unruled = []
    for path in sorted((ROOT / "captioning").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "tqdm":
                disable = next((k.value for k in node.keywords if k.arg == "disable"), None)
                if getattr(getattr(disable, "func", None), "id", None) != "progress_disabled":
                    unruled.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert unruled == []
