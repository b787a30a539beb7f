"""Configuration: every choice and range checked when a config is made, --help, resume conflicts."""

import argparse
import dataclasses
import re
import runpy
import shutil
import sys

import numpy as np
import pytest

from captioning.checkpoint import CheckpointError
from captioning.config import (
    RESUMABLE_CHANGES,
    ConfigError,
    TrainConfig,
    parse_config,
    resume_conflicts,
)
from captioning.training.train import train
from tests.helpers import ROOT, tiny_config


@pytest.mark.parametrize(
    "field, value, allowed",
    [
        ("amp", "bf61", "'auto', 'bf16', 'fp16', 'off'"),
        ("lr_schedule", "cosin", "'cosine', 'constant'"),
        ("batch_by", "images", "'image', 'length'"),
        ("optimizer", "sgd", "'adam', 'adamw'"),
        ("layout", "cocoo", "'auto', 'coco', 'karpathy', 'csv'"),
        ("backbone", "resnet51", "'resnet18', 'resnet34', 'resnet50'"),
        ("feature_norm", "batchnorm", "'batch', 'layer', 'none'"),
    ],
)
def test_unknown_choice_names_field_value_and_choices(field, value, allowed):
    with pytest.raises(ConfigError) as error:
        TrainConfig(**{field: value})
    message = str(error.value)
    assert f"TrainConfig.{field}: {value!r} is not allowed" in message
    assert allowed in message


@pytest.mark.parametrize(
    "field, value, allowed",
    [
        ("batch_size", 0, "at least 1"),
        ("dropout", 1.0, "in [0, 1)"),
        ("dropout", -0.1, "in [0, 1)"),
        ("lr", 0.0, "above 0"),
        ("grad_clip", float("nan"), "above 0"),
        ("trainable_blocks", 5, "in [-1, 4]"),
        ("trainable_blocks", -2, "in [-1, 4]"),
        ("captions_per_image", 0, "at least 1"),
        ("epochs", 0, "at least 1"),
        ("image_size", 8, "at least 16"),
        ("max_caption_len", 1, "at least 2"),
        ("val_images", 0, "at least 1"),
        ("patience", 0, "at least 1"),
        ("seed", -1, "at least 0"),
        ("num_workers", -1, "at least 0"),
        ("weight_decay", -1e-4, "at least 0"),
    ],
)
def test_out_of_range_names_field_value_and_range(field, value, allowed):
    with pytest.raises(ConfigError) as error:
        TrainConfig(**{field: value})
    assert (
        str(error.value) == f"TrainConfig.{field}: {value!r} is not allowed; it must be {allowed}"
    )


@pytest.mark.parametrize(
    "field, value, kind",
    [
        ("epochs", 2.5, "int"),
        ("batch_size", True, "int"),
        ("pretrained", "yes", "bool"),
        ("lr", "0.1", "float"),
        ("captions_per_image", "2", "int or None"),
        ("backbone", None, "str"),
    ],
)
def test_wrong_type_names_the_type_wanted(field, value, kind):
    with pytest.raises(
        ConfigError,
        match=re.escape(f"TrainConfig.{field}: {value!r} is not allowed; it must be a {kind}"),
    ):
        TrainConfig(**{field: value})


def test_allowed_values_pass_and_replace_is_checked_too():
    config = TrainConfig(
        lr=1, captions_per_image=None, val_images=None, patience=None, device="cuda:1"
    )
    assert config.lr == 1 and config.device == "cuda:1"
    from_numpy = TrainConfig(batch_size=np.int64(32), dropout=np.float32(0.5), lr=2)
    assert dataclasses.astuple(from_numpy)[:3] == dataclasses.astuple(TrainConfig())[:3]
    assert type(from_numpy.batch_size) is int and type(from_numpy.dropout) is float
    assert type(from_numpy.lr) is float and from_numpy.lr == 2.0
    for f in dataclasses.fields(TrainConfig):  # every default is allowed and explained
        assert f.metadata["help"], f.name
    with pytest.raises(ConfigError, match="TrainConfig.amp: 'bf61'"):
        dataclasses.replace(config, amp="bf61")
    with pytest.raises(ConfigError, match="TrainConfig.device: 'gpu' is not allowed"):
        TrainConfig(device="gpu")


def test_cache_images_with_augment_refused_when_made():
    with pytest.raises(ConfigError, match="cache_images: True needs augment=False"):
        TrainConfig(trainable_blocks=-1, cache_images=True, augment=True)


def test_command_line_parses_flags_and_refuses_nonsense(capsys):
    config = parse_config(
        TrainConfig,
        ["--lr", "0.01", "--captions-per-image", "none", "--no-pretrained", "--amp", "bf16"],
    )
    assert (config.lr, config.captions_per_image, config.pretrained, config.amp) == (
        0.01,
        None,
        False,
        "bf16",
    )
    with pytest.raises(SystemExit) as stop:
        parse_config(TrainConfig, ["--amp", "bf61"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert (
        "TrainConfig.amp: 'bf61' is not allowed; choose one of 'auto', 'bf16', 'fp16', 'off'" in err
    )
    with pytest.raises(SystemExit):
        parse_config(TrainConfig, ["--batch-size", "0"])
    assert (
        "TrainConfig.batch_size: 0 is not allowed; it must be at least 1" in capsys.readouterr().err
    )


def test_train_help_explains_every_field(monkeypatch, capsys):
    # train.py run as the command it is (its `__main__` block), in this process: a fresh
    # interpreter would spend seconds importing torch again.
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", ["train.py", "--help"])
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(ROOT / "train.py"), run_name="__main__")
    assert stop.value.code == 0, capsys.readouterr().err
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        assert flag in text, flag
        assert " ".join(f.metadata["help"].split()) in text, f.name
    assert "{auto,bf16,fp16,off}" in text


def test_resume_conflicts_lists_only_fields_a_resume_may_not_change():
    saved = dataclasses.asdict(TrainConfig())
    changed = TrainConfig(epochs=30, num_workers=0, device="cpu", lr=2e-3, trainable_blocks=2)
    assert resume_conflicts(saved, changed) == [
        "trainable_blocks: checkpoint 0 vs config 2",
        "lr: checkpoint 0.001 vs config 0.002",
    ]
    assert {"epochs", "device", "num_workers", "resume"} <= set(RESUMABLE_CHANGES)
    assert resume_conflicts(saved, TrainConfig(epochs=30, resume=True, progress=False)) == []


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(lr=2e-3), "lr: checkpoint 0.001 vs config 0.002"),
        (dict(trainable_blocks=2), "trainable_blocks: checkpoint -1 vs config 2"),
        (dict(hidden_size=64), "hidden_size: checkpoint 48 vs config 64"),
    ],
)
def test_resume_with_a_changed_field_names_it_and_both_values(
    one_epoch_run, demo_root, tmp_path, change, message
):
    run = shutil.copytree(one_epoch_run, tmp_path / "run")
    with pytest.raises(CheckpointError, match=re.escape(message)):
        train(tiny_config(demo_root, run, epochs=2, resume=True, **change))


@pytest.fixture(scope="module")
def one_epoch_run(demo_root, tmp_path_factory):
    """A finished one-epoch run (copied before a test resumes it)."""
    out = tmp_path_factory.mktemp("run")
    train(tiny_config(demo_root, out, epochs=1))
    return out


def test_flags_default_to_a_base_config_and_parent_flags_are_dropped():
    base = TrainConfig(lr=2e-3, cut_captions=True, grid_size=14)
    preset = argparse.ArgumentParser(add_help=False)
    preset.add_argument("--preset", default="auto")
    argv = ["--epochs", "4", "--preset", "coco", "--grid-size", "none"]
    config = parse_config(TrainConfig, argv, base=base, parents=[preset])
    assert config == dataclasses.replace(base, epochs=4, grid_size=None)


def test_checkpoints_from_before_the_caption_cut_resume_uncut():
    saved = {k: v for k, v in dataclasses.asdict(TrainConfig()).items() if k != "cut_captions"}
    assert resume_conflicts(saved, TrainConfig()) == []
    assert resume_conflicts(saved, TrainConfig(cut_captions=True)) == [
        "cut_captions: checkpoint False vs config True"
    ]
