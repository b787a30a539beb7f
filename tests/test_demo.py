"""The main demo command, `captioning.demo.run.run_demo`, on a shrunk preset."""

import dataclasses
import json

import numpy as np
import pytest

from captioning.demo import run as demo
from captioning.demo.run import run_demo
from captioning.demo.scoring import cider_over_redrawn_references
from captioning.evaluation import coco_metrics
from captioning.presets import (
    ATTENTION_DEMO_CONFIG,
    ATTENTION_SCST_DEMO_CONFIG,
    DEMO_CONFIG,
    SCST_DEMO_CONFIG,
    TRANSFORMER_DEMO_CONFIG,
)
from tests.helpers import right_and_wrong_captions

METRICS = {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"}
OBJECTS = {"accuracy", "by_count", "n"}


def without_java(monkeypatch):
    """Score as a user without Java does: the JVM's start-ups cost more than the tiny runs
    (tests/test_coco_metrics.py checks evaluate with Java)."""
    monkeypatch.setattr(coco_metrics, "java_available", lambda: False)


def test_run_demo_writes_its_documented_outputs(demo_root, tmp_path, capsys, monkeypatch):
    without_java(monkeypatch)
    config = dataclasses.replace(
        DEMO_CONFIG, data_dir=str(demo_root), image_size=32, embed_size=32, hidden_size=48,
        epochs=2, val_images=10, progress=False,
    )  # fmt: skip
    options = dict(n_train=60, n_val=20, n_test=20, seed=1)  # demo_root's own: not regenerated
    summary = run_demo(
        tmp_path / "demo", config, grid_size=4, dataset_options=options, reference_draws=3
    )
    written = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    assert set(written) == {
        "greedy", "beam3", "blind_greedy", "cider_ratio_to_blind", "train_seconds",
        "blind_train_seconds", "epochs", "config", "total_seconds", "beam_vs_greedy",
    }  # fmt: skip
    for decoding in ("greedy", "beam3", "blind_greedy"):
        assert METRICS - {"METEOR"} <= set(written[decoding]) and set(written[decoding]) >= OBJECTS
        assert written[decoding]["n"] == 20  # every test image scored
        assert written[decoding] == json.loads(json.dumps(summary[decoding]))
    assert written["epochs"] == 2 and written["config"]["output_dir"].endswith("model")
    assert (
        written["cider_ratio_to_blind"]
        == summary["greedy"]["CIDEr"] / summary["blind_greedy"]["CIDEr"]
    )
    for name in ("test_captions.png", "model/best.pt", "model/learning_curves.png", "blind/best.pt",
                 "model/results_test.json", "model/results_test_beam3.json"):  # fmt: skip
        assert (tmp_path / "demo" / name).exists(), name
    printed = capsys.readouterr().out
    assert "greedy" in printed and "blind" in printed and "CIDEr vs blind" in printed
    assert "redrawn reference sets" in printed
    assert written["beam_vs_greedy"]["draws"] == 3
    assert not list((tmp_path / "demo").rglob(".*.tmp-*"))


def test_beam_against_greedy_is_the_mean_gain_over_redrawn_references(demo_root):
    path = demo_root / "annotations" / "captions_test2017.json"
    right, wrong = right_and_wrong_captions(path)
    half = {i: wrong[i] if k % 2 else right[i] for k, i in enumerate(right)}
    scores = cider_over_redrawn_references(
        {"right": right, "half": half}, path, draws=4, progress=False
    )
    gains = np.subtract(scores["right"], scores["half"])  # (4,)
    better = demo.beam_against_greedy(greedy=half, beam=right, annotations_file=path, draws=4)
    assert better["mean"] == pytest.approx(gains.mean()) and better["mean"] > 0.5
    assert better["sd"] == pytest.approx(gains.std(ddof=1)) and better["sd"] > 0
    assert better["level_or_better"] == 4 and better["draws"] == 4
    worse = demo.beam_against_greedy(greedy=right, beam=half, annotations_file=path, draws=4)
    assert worse["mean"] == pytest.approx(-gains.mean()) and worse["level_or_better"] == 0
    level = demo.beam_against_greedy(greedy=right, beam=right, annotations_file=path, draws=4)
    assert level["mean"] == 0 and level["level_or_better"] == 4


def test_run_demo_with_a_transformer_measures_each_layers_attention(
    demo_root, tmp_path, monkeypatch, capsys
):
    without_java(monkeypatch)
    config = dataclasses.replace(
        TRANSFORMER_DEMO_CONFIG, data_dir=str(demo_root), image_size=32, embed_size=32,
        feed_forward=64, decoder_layers=2, epochs=1, val_images=10, progress=False,
    )  # fmt: skip
    layers = []
    measure = demo.attention_summary
    monkeypatch.setattr(
        demo, "attention_summary", lambda *a, **k: layers.append(k.get("layer")) or measure(*a, **k)
    )
    options = dict(n_train=60, n_val=20, n_test=20, seed=1)
    summary = run_demo(
        tmp_path / "demo", config, grid_size=4, dataset_options=options, reference_draws=2
    )
    # A grid decoder's run (attention's takes the same path): no blind run, where words looked.
    assert "blind_greedy" not in summary and summary["config"]["decoder"] == "transformer"
    assert set(summary["attention"]) == {"on_object", "on_another_object", "chance", "words"}
    assert len(list((tmp_path / "demo" / "attention").glob("*_attention.png"))) == 4
    # The default map (the last layer's), then each layer before it: the last is not redone.
    assert layers == [None, 0]
    assert len(summary["attention_by_layer"]) == 2
    assert summary["attention_by_layer"][-1] == summary["attention"]
    printed = capsys.readouterr().out
    for k, layer in enumerate(summary["attention_by_layer"]):
        line = f"decoder layer {k + 1}'s cross-attention (heads averaged) on the object: "
        assert line + demo.on_object(layer) in printed


def test_run_demo_with_self_critical_stage_scores_both_checkpoints(
    demo_root, tmp_path, capsys, monkeypatch
):
    without_java(monkeypatch)
    config = dataclasses.replace(
        SCST_DEMO_CONFIG, data_dir=str(demo_root), image_size=32, embed_size=32, hidden_size=48,
        epochs=1, scst_epochs=1, val_images=10, progress=False,
    )  # fmt: skip
    options = dict(n_train=60, n_val=20, n_test=20, seed=1)
    summary = run_demo(tmp_path / "demo", config, grid_size=4, dataset_options=options)
    assert "blind_greedy" not in summary and summary["epochs"] == 2
    for name in ("cross_entropy_greedy", "cross_entropy_beam3", "greedy", "beam3"):
        assert summary[name]["n"] == 20 and "CIDEr" in summary[name]
    assert summary["best_epoch_stage"] in ("xe", "scst")
    assert (tmp_path / "demo" / "model" / "best_cross_entropy.pt").exists()
    printed = capsys.readouterr().out
    assert "XE greedy" in printed and "SCST greedy" in printed and "self-critical stage" in printed


def test_demo_command_picks_each_decoders_preset_and_dataset(monkeypatch):
    calls = []
    monkeypatch.setattr(demo, "run_demo", lambda *args, **kwargs: calls.append((args, kwargs)))
    demo.main([])
    demo.main(["--decoder", "attention", "--epochs", "3", "--dataset-seed", "2"])
    demo.main(["--scst"])
    demo.main(["--scst", "--decoder", "attention"])
    (plain, plain_options), (attention, attention_options), (scst, _), (attention_scst, _) = calls
    assert scst == ("outputs/demo-scst", SCST_DEMO_CONFIG) and SCST_DEMO_CONFIG.scst_epochs
    assert attention_scst == ("outputs/demo-attention-scst", ATTENTION_SCST_DEMO_CONFIG)
    assert ATTENTION_SCST_DEMO_CONFIG.decoder == "attention"
    assert plain == ("outputs/demo", DEMO_CONFIG) and plain_options["dataset_options"]["seed"] == 0
    output_dir, config = attention
    assert (
        output_dir == "outputs/demo-attention" and attention_options["dataset_options"]["seed"] == 2
    )
    assert config == dataclasses.replace(
        ATTENTION_DEMO_CONFIG, epochs=3, data_dir=f"{DEMO_CONFIG.data_dir}-seed2"
    )
