"""Presets: the demo's unchanged, COCO's the published recipes, the command line starting from the
preset of its data, and the training-caption cut reported once per run."""

import dataclasses
import shutil

import pytest

from captioning import presets
from captioning.config import TrainConfig
from captioning.data.annotations import read_split
from captioning.demo.dataset import MARKER_NAME
from captioning.presets import ATTENTION_DEMO_CONFIG, DEMO_CONFIG, coco_config, demo_config
from captioning.training.train import parse_command_line, train
from tests.helpers import ROOT, tiny_config

# The demo presets as demo.py defined them before they moved to presets.py (its figures).
DEMO_VALUES = dict(
    data_dir=str(ROOT / "data" / "demo"), output_dir="outputs/demo/model", vocab_threshold=1,
    backbone="smallcnn", pretrained=False, trainable_blocks=-1, image_size=64, embed_size=256,
    hidden_size=256, dropout=0.0, forget_bias=5.0, batch_size=32, captions_per_image=1,
    epochs=30, lr=1e-3, val_images=300, patience=None, num_workers=0, cache_images=True,
)  # fmt: skip
# word_in_query and coverage: built into the attention decoder then, options now.
ATTENTION_VALUES = dict(
    output_dir="outputs/demo-attention/model", decoder="attention", embed_size=128,
    attention_size=128, attention_weight=0.1, lr=2e-3, epochs=16, word_in_query=True,
    coverage=True, select_by="loss", length_penalty=-0.5,
)  # fmt: skip
TRANSFORMER_VALUES = dict(
    output_dir="outputs/demo-transformer/model", decoder="transformer", embed_size=128,
    encoder_layers=1, decoder_layers=4, heads=4, feed_forward=512, dropout=0.0, lr=1e-3,
    warmup_steps=200, epochs=16, select_by="loss", length_penalty=-0.5,
)  # fmt: skip


def test_demo_presets_are_unchanged():
    plain = TrainConfig(**DEMO_VALUES)
    attention = TrainConfig(**{**DEMO_VALUES, **ATTENTION_VALUES})
    assert plain == DEMO_CONFIG and attention == ATTENTION_DEMO_CONFIG
    assert demo_config("showtell", scst=True) == dataclasses.replace(
        plain, output_dir="outputs/demo-scst/model", scst_epochs=3, scst_lr=5e-5
    )
    assert demo_config("attention", scst=True) == dataclasses.replace(
        attention, output_dir="outputs/demo-attention-scst/model", epochs=12, scst_epochs=3,
        scst_lr=2e-4, select_by="cider", length_penalty=0.0,
    )  # fmt: skip
    transformer = TrainConfig(**{**DEMO_VALUES, **TRANSFORMER_VALUES})
    assert demo_config("transformer") == transformer
    assert demo_config("transformer", scst=True) == dataclasses.replace(
        transformer, output_dir="outputs/demo-transformer-scst/model", epochs=12, scst_epochs=2,
        scst_lr=2e-4, length_penalty=0.0,
    )  # fmt: skip
    assert not DEMO_CONFIG.cut_captions  # demo captions run to 24 words: cut, they would change


# Each value's source is in docs/coco_recipes.md.
COCO_VALUES = dict(
    backbone="resnet101", pretrained=True, trainable_blocks=0, image_size=448, resize="full",
    vocab_threshold=6, embed_size=512, hidden_size=512, dropout=0.5, batch_size=10,
    captions_per_image=5, epochs=30, optimizer="adam", lr=5e-4, lr_schedule="cosine",
    max_caption_len=18, cut_captions=True, val_images=None, patience=None, scst_epochs=0,
    scst_lr=5e-5, scst_samples=5, scst_baseline="mean", strip_punctuation=True,
)  # fmt: skip


@pytest.mark.parametrize("decoder, grid_size", [("showtell", None), ("attention", 14)])
def test_coco_config_follows_the_recipes(decoder, grid_size):
    config = coco_config(decoder)
    assert {k: getattr(config, k) for k in COCO_VALUES} == COCO_VALUES
    assert (config.decoder, config.grid_size) == (decoder, grid_size)
    # 448 px gives a ResNet's 14 x 14 map: the grid is the CNN's own, not 7 x 7 cells repeated.
    assert config.image_size // 32 == 14
    changed = coco_config(decoder, grid_size=7, lr=1e-4)
    assert (changed.decoder, changed.grid_size, changed.lr) == (decoder, 7, 1e-4)


def test_recipe_table_names_every_field_the_coco_preset_changes():
    table = (ROOT / "docs" / "coco_recipes.md").read_text()
    defaults = TrainConfig()
    for decoder in ("showtell", "attention"):
        config = coco_config(decoder)
        for f in dataclasses.fields(TrainConfig):
            if getattr(config, f.name) != getattr(defaults, f.name):
                assert f"`{f.name}`" in table, f.name


def test_command_line_starts_from_the_coco_preset_for_a_coco_folder(tmp_path):
    coco = str(tmp_path / "coco")
    for decoder in ("showtell", "attention"):
        config = parse_command_line(["--data-dir", coco, "--decoder", decoder])
        assert config == coco_config(decoder, data_dir=coco)
    flags = ["--data-dir", coco, "--lr", "1e-3", "--no-cut-captions", "--val-images", "500"]
    config = parse_command_line([*flags, "--decoder", "attention", "--grid-size", "none"])
    assert config == coco_config(
        "attention", data_dir=coco, lr=1e-3, cut_captions=False, val_images=500, grid_size=None
    )
    assert parse_command_line(["--data-dir", coco, "--preset", "none"]) == TrainConfig(
        data_dir=coco
    )


def test_command_line_starts_from_the_demo_preset_for_demo_data(demo_root, tmp_path, monkeypatch):
    # As demo.py trains: a smallcnn from scratch at 64 px, not coco's ImageNet ResNet-101.
    assert parse_command_line(["--data-dir", str(demo_root)]) == dataclasses.replace(
        DEMO_CONFIG, data_dir=str(demo_root)
    )
    assert parse_command_line(
        ["--data-dir", str(demo_root), "--decoder", "attention"]
    ) == dataclasses.replace(ATTENTION_DEMO_CONFIG, data_dir=str(demo_root))
    # No --data-dir: the built-in dataset, left none so that training makes it on first use.
    assert parse_command_line([]) == dataclasses.replace(DEMO_CONFIG, data_dir=None)
    # data/demo before the demo has made it: no marker yet, still the demo's folder.
    monkeypatch.setattr(presets, "DEFAULT_DEMO_ROOT", tmp_path.resolve() / "data" / "demo")
    monkeypatch.chdir(tmp_path)
    demo_data = dataclasses.replace(DEMO_CONFIG, data_dir="data/demo")
    assert parse_command_line(["--data-dir", "data/demo"]) == demo_data
    # Elsewhere, the marker file alone makes a folder the demo's.
    (tmp_path / "copy").mkdir()
    assert parse_command_line(["--data-dir", "copy"]).backbone == "resnet101"
    shutil.copy(demo_root / MARKER_NAME, tmp_path / "copy")
    assert parse_command_line(["--data-dir", "copy"]) == dataclasses.replace(
        demo_data, data_dir="copy"
    )
    assert parse_command_line(["--data-dir", "copy", "--preset", "none"]) == TrainConfig(
        data_dir="copy"
    )
    chosen = parse_command_line(["--preset", "demo", "--decoder", "attention", "--epochs", "2"])
    assert chosen == dataclasses.replace(ATTENTION_DEMO_CONFIG, epochs=2)
    assert parse_command_line(["--data-dir", str(demo_root), "--preset", "coco"]) == coco_config(
        data_dir=str(demo_root)
    )


def test_help_shows_the_preset_values(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_command_line(["--data-dir", str(tmp_path), "--decoder", "attention", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--preset {auto,coco,demo,flickr8k,none}" in text and "docs/coco_recipes.md" in text
    assert "--grid-size GRID_SIZE attention: the CNN grid pooled" in text
    assert "none: as it is (default: 14)" in text and "(default: 448)" in text
    with pytest.raises(SystemExit):
        parse_command_line(["--help"])
    assert "none: as it is (default: None)" in " ".join(capsys.readouterr().out.split())


def test_the_cut_is_reported_once_per_run(demo_root, tmp_path, capsys):
    config = tiny_config(
        demo_root, tmp_path / "cut", epochs=2, cut_captions=True, max_caption_len=8
    )
    train(config)
    lengths = read_split(demo_root, "train").tokenized().lengths()
    lines = [
        line for line in capsys.readouterr().out.splitlines() if "training captions cut" in line
    ]
    assert lines == [f"training captions cut to 6 words: {(lengths > 6).sum()} of {len(lengths)}"]
    train(tiny_config(demo_root, tmp_path / "whole", epochs=1))
    assert "training captions cut" not in capsys.readouterr().out
