"""The main job on the built-in demo dataset: data, vocabulary, training, evaluation, captions.

`make demo` runs it: trains a small CNN+LSTM from scratch on two CPU cores, trains the same
decoder blind (image features zeroed) for comparison, evaluates both on the held-out test
split, and writes metrics.json, learning curves and a captioned image grid.
"""

import argparse
import dataclasses
import json
import time
from pathlib import Path

from captioning.atomic_file import write_json
from captioning.command import add_debug_flag, command
from captioning.demo.dataset import make_demo_dataset
from captioning.demo.scoring import (
    attention_on_objects,
    cider_over_redrawn_references,
    object_accuracy,
)
from captioning.presets import DEMO_CONFIG, demo_config


def evaluate_demo(checkpoint, data_dir, beam_size=1):
    """Test-split COCO metrics plus the demo's object accuracy for one checkpoint; "row": the
    metrics, object accuracy and caption health together, as metrics.json holds them."""
    from captioning.evaluation.evaluate import evaluate

    result = evaluate(
        checkpoint,
        "test",
        data_dir=data_dir,
        beam_size=beam_size,
        output_dir=Path(checkpoint).parent,
        progress=False,
    )
    result["objects"] = object_accuracy(
        result["predictions"], Path(data_dir) / "annotations" / "captions_test2017.json"
    )
    result["row"] = {**result["metrics"], **result["objects"], **result["health"]}
    return result


def run_demo(output_dir="outputs/demo", config=DEMO_CONFIG, grid_size=12, dataset_options=None,
             blind=None, reference_draws=60):  # fmt: skip
    """Run the whole demo and return the summary written to metrics.json.

    metrics.json holds "greedy" and "beam3" (each the COCO metrics, the object accuracy:
    "accuracy", "by_count", "n", and the caption health: `caption_health.measure_health`),
    "train_seconds", "epochs", "config", "total_seconds" and "beam_vs_greedy"
    (`beam_against_greedy` over `reference_draws` redrawn reference sets).
    With `blind` (default: for Show and Tell) the blind baseline is trained and scored too:
    "blind_greedy", "cider_ratio_to_blind", "blind_train_seconds". A run with a self-critical
    stage adds "cross_entropy_greedy" and "cross_entropy_beam3" (its best cross-entropy
    checkpoint, best_cross_entropy.pt; "greedy" and "beam3" are best.pt's) and
    "best_epoch_stage". An attention or transformer model adds
    "attention" (`scoring.attention_on_objects` on the test split) and draws the first
    test images' attention maps in <output_dir>/attention/; a transformer adds
    "attention_by_layer", the same measure for each decoder layer's cross-attention.
    `dataset_options` go to `make_demo_dataset` (its defaults: the standard demo dataset).
    """
    from captioning.checkpoint import GRID_DECODERS
    from captioning.data.loading import load_image
    from captioning.plots import plot_captioned_images
    from captioning.training.train import train

    started = time.time()
    output_dir = Path(output_dir)
    data_dir = make_demo_dataset(Path(config.data_dir), **(dataset_options or {}))
    print(f"demo dataset: {data_dir}")
    model_cfg = dataclasses.replace(config, output_dir=str(output_dir / "model"))
    t0 = time.time()
    history = train(model_cfg)
    train_seconds = time.time() - t0
    checkpoint = output_dir / "model" / "best.pt"
    greedy = evaluate_demo(checkpoint, data_dir)
    beam = evaluate_demo(checkpoint, data_dir, beam_size=3)
    test_annotations = data_dir / "annotations" / "captions_test2017.json"
    summary = {
        "greedy": greedy["row"],
        "beam3": beam["row"],
        "beam_vs_greedy": beam_against_greedy(
            greedy["predictions"], beam["predictions"], test_annotations, reference_draws
        ),
        "train_seconds": train_seconds,
        "epochs": len(history["epoch"]),
        "config": dataclasses.asdict(model_cfg),
    }
    if config.scst_epochs:
        before = output_dir / "model" / "best_cross_entropy.pt"
        for name, beam_size in (("cross_entropy_greedy", 1), ("cross_entropy_beam3", 3)):
            result = evaluate_demo(before, data_dir, beam_size=beam_size)
            summary[name] = result["row"]
        best = history["val_cider"].index(max(history["val_cider"]))
        summary["best_epoch_stage"] = history["stage"][best]
    showtell = config.decoder == "showtell" and not config.scst_epochs
    if showtell if blind is None else blind:
        summary.update(blind_baseline(config, output_dir / "blind", data_dir, greedy))
    if config.decoder in GRID_DECODERS:  # attention and transformer: where the words looked
        summary["attention"] = attention_summary(checkpoint, data_dir, output_dir / "attention")
    if config.decoder == "transformer":  # which decoder layer's cross-attention finds the object
        summary["attention_by_layer"] = [
            attention_summary(checkpoint, data_dir, None, n_figures=0, layer=k)
            for k in range(config.decoder_layers - 1)
        ] + [summary["attention"]]  # the last layer's is the default map's
    with open(test_annotations) as f:
        files = {im["id"]: data_dir / "test2017" / im["file_name"] for im in json.load(f)["images"]}
    shown = list(greedy["predictions"].items())[:grid_size]
    grid = plot_captioned_images(
        [load_image(files[i]) for i, _ in shown],
        [f"greedy: {c}" for _, c in shown],
        output_dir / "test_captions.png",
        titles=[f"beam 3: {beam['predictions'][i]}" for i, _ in shown],
    )
    summary["total_seconds"] = time.time() - started
    write_json(summary, output_dir / "metrics.json")
    report(summary, output_dir, grid)
    return summary


def beam_against_greedy(greedy, beam, annotations_file, draws=60):
    """Beam minus greedy CIDEr over `draws` redrawn reference sets: "mean", "sd", "level_or_better"
    (the draws where beam scored at least greedy's) and "draws". One draw of references is a
    lottery of phrasings that can decide a difference this small (docs/demo.md)."""
    scores = cider_over_redrawn_references(
        {"greedy": greedy, "beam": beam}, annotations_file, draws=draws, progress=False
    )
    gains = [b - g for b, g in zip(scores["beam"], scores["greedy"])]
    mean = sum(gains) / draws
    sd = (sum((x - mean) ** 2 for x in gains) / max(1, draws - 1)) ** 0.5
    level = sum(x >= 0 for x in gains)
    return {"mean": mean, "sd": sd, "level_or_better": level, "draws": draws}


def blind_baseline(config, output_dir, data_dir, greedy):
    """Train and score the same model blind; its figures for the summary."""
    from captioning.training.train import train

    t0 = time.time()
    train(dataclasses.replace(config, output_dir=str(output_dir), blind=True))
    seconds = time.time() - t0
    blind = evaluate_demo(output_dir / "best.pt", data_dir)
    return {
        "blind_greedy": blind["row"],
        "cider_ratio_to_blind": greedy["metrics"]["CIDEr"] / max(blind["metrics"]["CIDEr"], 1e-9),
        "blind_train_seconds": seconds,
    }


def attention_summary(checkpoint, data_dir, folder, n_figures=4, layer=None, head=None):
    """Attention on the named objects over the test split; the first images' maps drawn in
    `folder`. `layer`, `head`: a transformer's decoder layer (None: the last) and head (None:
    their average), as `attention_maps`."""
    from captioning.caption import attention_maps, draw_attention
    from captioning.data.annotations import read_split

    split = read_split(data_dir, "test")
    maps = attention_maps(checkpoint, split.image_paths, layer=layer, head=head)
    if n_figures:
        draw_attention({p: maps[p] for p in split.image_paths[:n_figures]}, folder)
    by_id = {i: maps[p] for i, p in zip(split.image_ids, split.image_paths)}
    return attention_on_objects(by_id, Path(data_dir) / "annotations" / "captions_test2017.json")


def report(summary, output_dir, grid):
    """Print the headline numbers (caption health: bad endings, repeats and distinct captions,
    as shares of the test images) and where the files are."""
    rows = [("greedy", summary["greedy"]), ("beam 3", summary["beam3"])]
    rows += [("blind", summary["blind_greedy"])] if "blind_greedy" in summary else []
    if "cross_entropy_greedy" in summary:
        rows = [("XE greedy", summary["cross_entropy_greedy"]),
                ("XE beam 3", summary["cross_entropy_beam3"]),
                ("SCST greedy", summary["greedy"]), ("SCST beam 3", summary["beam3"])]  # fmt: skip
    print(f"\n{'':11} {'CIDEr':>7} {'BLEU-4':>7} {'objects':>8} {'1 shape':>8} {'2':>6} {'3':>6}"
          f" {'bad end':>8} {'repeats':>8} {'distinct':>9}")  # fmt: skip
    for name, m in rows:
        by = m["by_count"]
        print(
            f"{name:11} {m['CIDEr']:7.3f} {m['Bleu_4']:7.3f} {m['accuracy']:8.1%} "
            f"{by.get(1, 0):8.1%} {by.get(2, 0):6.1%} {by.get(3, 0):6.1%} "
            f"{m['bad_endings']:8.1%} {m['repeats']:8.1%} {m['distinct_captions']:9.1%}"
        )
    if "cross_entropy_greedy" in summary:
        before, after = summary["cross_entropy_greedy"]["CIDEr"], summary["greedy"]["CIDEr"]
        print(f"self-critical stage: greedy CIDEr {after / before - 1:+.1%} over cross-entropy "
              f"(best.pt is from the {summary['best_epoch_stage']} stage)")  # fmt: skip
    if "beam_vs_greedy" in summary:  # summaries from before it have none
        b = summary["beam_vs_greedy"]
        print(f"beam 3 minus greedy CIDEr over {b['draws']} redrawn reference sets: "
              f"{b['mean']:+.3f} (sd {b['sd']:.3f}; beam at least level in "
              f"{b['level_or_better']})")  # fmt: skip
    if "blind_greedy" in summary:
        print(
            f"CIDEr vs blind: {summary['cider_ratio_to_blind']:.1f}x; training "
            f"{summary['train_seconds']:.0f} s (blind {summary['blind_train_seconds']:.0f} s); "
            f"total {summary['total_seconds']:.0f} s"
        )
    else:
        print(f"training {summary['train_seconds']:.0f} s; total {summary['total_seconds']:.0f} s")
    if "attention" in summary:
        a = summary["attention"]
        print(f"attention on the named object: {on_object(a)} of {a['words']} object words "
              f"(chance {a['chance'] or 0:.1%}); maps in {output_dir / 'attention'}/")  # fmt: skip
    for k, a in enumerate(summary.get("attention_by_layer", [])):
        print(f"  decoder layer {k + 1}'s cross-attention (heads averaged) on the object: "
              f"{on_object(a)}")  # fmt: skip
    print(f"\nmetrics:          {output_dir / 'metrics.json'}")
    print(f"learning curves:  {output_dir / 'model' / 'learning_curves.png'}")
    print(f"captioned images: {grid}")
    print(f"checkpoint:       {output_dir / 'model' / 'best.pt'}")


def on_object(attention):
    """`attention_on_objects`' shares of peaks on the named object and on another one ("-" with
    no object words)."""
    if attention["on_object"] is None:
        return "-"
    return f"{attention['on_object']:.1%} (on another object: {attention['on_another_object']:.1%})"


@command
def main(argv=None):
    """python demo.py [--decoder attention|transformer] [--scst] [--output-dir DIR] [--epochs N]
    [--dataset-seed S]"""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output-dir", help="default outputs/demo (outputs/demo-attention)")
    parser.add_argument(
        "--decoder", choices=("showtell", "attention", "transformer"), default="showtell"
    )
    parser.add_argument(
        "--scst", action="store_true",
        help="add the self-critical stage (outputs/demo-scst, outputs/demo-attention-scst)",
    )  # fmt: skip
    parser.add_argument("--epochs", type=int, help="cross-entropy epochs; default: the preset's")
    parser.add_argument(
        "--dataset-seed", type=int, default=0,
        help="draw another demo dataset (written beside the standard one, data/demo-seed<S>)",
    )  # fmt: skip
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    config = demo_config(args.decoder, args.scst)
    config = dataclasses.replace(config, epochs=args.epochs or config.epochs)
    if args.dataset_seed:
        config = dataclasses.replace(config, data_dir=f"{config.data_dir}-seed{args.dataset_seed}")
    output_dir = args.output_dir or str(Path(config.output_dir).parent)  # the preset's
    return run_demo(output_dir, config, dataset_options={"seed": args.dataset_seed})
