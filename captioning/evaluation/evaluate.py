"""Evaluate a checkpoint on a split: captions in COCO results format, official COCO metrics,
and the captions' health (`caption_health`)."""

import argparse
import json
import warnings
from pathlib import Path

import torch
from tqdm.auto import tqdm

from captioning.atomic_file import write_json
from captioning.command import add_debug_flag, command, progress_disabled
from captioning.data.training_data import to_device
from captioning.decoding import LENGTH_PENALTY, DecodingOptions, decode_captions, per_image
from captioning.distributed import resolve_device
from captioning.evaluation.caption_health import (
    describe_same_caption,
    format_health,
    measure_health,
)


@torch.no_grad()
def predict_captions(
    model,
    vocab,
    loader,
    device="cpu",
    beam_size=1,
    max_len=20,
    length_penalty=LENGTH_PENALTY,
    progress=False,
    options=None,
    cached=False,
):
    """{image id: caption} for a loader of (images, or cached features with `cached`, image
    ids), or {image id: [captions]} when `options` (`DecodingOptions`, None: the defaults) are
    `listed` (sampling, diverse beam search)."""
    model.eval()
    predictions = {}
    for inputs, image_ids in tqdm(
        loader, desc="captioning", unit="batch", disable=progress_disabled(progress)
    ):
        # Cached features come in their stored dtype (float16): widened on the device.
        features = model.encode(*to_device([inputs], device), cached)  # (batch, embed) or grid
        _, captions = decode_captions(
            model.decoder, features, vocab, beam_size, max_len, length_penalty, options
        )
        predictions.update(zip((int(i) for i in image_ids), per_image(captions, options)))
    return predictions


def training_captions(config):
    """The texts of the captions a checkpoint was trained on (its `config`'s data_dir, layout
    and train split), tokenised as its vocabulary was; None, with a warning, when they cannot
    be read (a checkpoint moved to another machine)."""
    from captioning.data.annotations import read_split
    from captioning.demo.dataset import resolve_data_dir

    try:
        split = read_split(resolve_data_dir(config.data_dir), "train", config.layout)
        return [" ".join(tokens) for tokens in split.tokenized()]
    except (OSError, ValueError) as error:
        warnings.warn(f"novel captions not measured: no training captions ({error})", stacklevel=3)
        return None


def evaluate(
    checkpoint,
    split="test",
    data_dir=None,
    layout=None,
    beam_size=1,
    max_len=None,
    length_penalty=None,
    batch_size=64,
    num_workers=2,
    limit=None,
    output_dir=None,
    use_java=None,
    spice=False,
    device=None,
    progress=True,
    options=None,
    features_dir=None,
):
    """Caption `split` with a checkpoint and score it; returns metrics, caption health (its
    figures: `caption_health.measure_health`, novel captions against the checkpoint's training
    captions), per-image scores, captions.

    With `output_dir`, writes results_<tag>.json (COCO results format), metrics, health and
    per-image scores there (tag: the split, then beam size, groups and samples when used).
    `data_dir`/`layout`, `max_len`, `length_penalty` and, for a model of precomputed features,
    `features_dir` default to the checkpoint's config's (those the model was trained with).
    `options`: the `decoding.DecodingOptions` (None: the defaults). When they give a list of
    captions per image (samples, groups), the first of each image's is scored and measured,
    and all are in result["all_captions"] and, with `output_dir`, captions_<tag>.json. Warns
    when most images get the same caption (`caption_health.SAME_CAPTION_SHARE`).
    """
    from captioning.checkpoint import GRID_DECODERS, load_trained
    from captioning.data.annotations import read_split
    from captioning.data.feature_files import FeatureFiles, check_feature_files
    from captioning.data.loading import ImageDataset, inputs_collate, preprocessing_transform
    from captioning.demo.dataset import resolve_data_dir
    from captioning.evaluation.coco_metrics import score_captions, write_results

    device = resolve_device(device or "auto")
    model, vocab, config = load_trained(checkpoint, device)
    data = read_split(resolve_data_dir(data_dir or config.data_dir), split, layout or config.layout)
    features_dir = features_dir or config.features_dir
    if features_dir is not None and config.features_dir is not None:  # no image, no CNN
        check_feature_files(features_dir, data, config.feature_size)
        regions = config.decoder in GRID_DECODERS
        dataset = ImageDataset(data, features=FeatureFiles(features_dir, data.image_ids, regions))
    else:
        dataset = ImageDataset(data, preprocessing_transform(model.preprocessing))
    if limit:
        dataset = torch.utils.data.Subset(dataset, range(min(limit, len(dataset))))
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=inputs_collate
    )
    predictions = predict_captions(
        model,
        vocab,
        loader,
        device,
        beam_size,
        config.max_caption_len if max_len is None else max_len,
        config.choose_length_penalty(length_penalty),
        progress,
        options,
        cached=config.features_dir is not None,
    )
    options = options or DecodingOptions()
    all_captions = None
    if options.listed:
        all_captions = predictions
        predictions = {i: captions[0] for i, captions in all_captions.items()}
    health = measure_health(predictions, training_captions(config))
    same_caption = describe_same_caption(health, config)
    if same_caption:
        warnings.warn(same_caption, stacklevel=2)
    references = data.references()
    metrics, per_image = score_captions(predictions, references, use_java=use_java, spice=spice)
    result = {
        "metrics": metrics,
        "health": health,
        "per_image": per_image,
        "predictions": predictions,
        "references": {i: references[i] for i in predictions},
    }
    if all_captions is not None:
        result["all_captions"] = all_captions
    if output_dir:
        tag = split + (f"_beam{beam_size}" if beam_size > 1 else "")
        tag += f"_groups{options.groups}" if options.groups > 1 else ""
        tag += f"_sample{options.samples}" if options.samples else ""
        output_dir = Path(output_dir)
        write_results(predictions, output_dir / f"results_{tag}.json")
        write_json(metrics, output_dir / f"metrics_{tag}.json")
        write_json(health, output_dir / f"health_{tag}.json")
        write_json({str(k): v for k, v in per_image.items()}, output_dir / f"per_image_{tag}.json")
        if all_captions is not None:
            write_json(
                {str(k): v for k, v in all_captions.items()}, output_dir / f"captions_{tag}.json"
            )
    return result


@command
def main(argv=None):
    """Command line: python evaluate.py CHECKPOINT [--split test] [--beam 3] ..., or
    python evaluate.py --results RESULTS.json --annotations captions_val2014.json."""
    from captioning.evaluation.coco_metrics import format_metrics, score_results_file

    parser = argparse.ArgumentParser(description=evaluate.__doc__)
    parser.add_argument("checkpoint", nargs="?", help="the model to caption the split with")
    parser.add_argument("--split", default="test")
    parser.add_argument("--data-dir")
    parser.add_argument("--layout", choices=("auto", "coco", "karpathy", "csv"))
    parser.add_argument("--beam", type=int, default=1, help="beam size (1: greedy)")
    parser.add_argument(
        "--length-penalty", type=float,
        help="beam: rank by log-prob / length ** this (default: the checkpoint's "
        "TrainConfig.length_penalty; 0: the raw sum)",
    )  # fmt: skip
    parser.add_argument(
        "--max-len", type=int,
        help="most tokens per caption, <start> and <end> included (default: the checkpoint's)",
    )  # fmt: skip
    DecodingOptions.add_flags(parser)
    parser.add_argument("--limit", type=int, help="score only the first N images")
    parser.add_argument(
        "--features-dir", help="a model of precomputed features: read them from this folder "
        "(default: the one it was trained on)",
    )  # fmt: skip
    parser.add_argument("--output-dir", help="where results and metrics JSON go")
    parser.add_argument("--spice", action="store_true", help="also SPICE (needs its CoreNLP jars)")
    parser.add_argument("--results", help="instead of a checkpoint: score this COCO results file")
    parser.add_argument("--annotations", help="with --results: the COCO captions file to score on")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    if args.results:
        if not args.annotations or args.checkpoint:
            parser.error("--results needs --annotations and no checkpoint")
        metrics, per_image = score_results_file(args.results, args.annotations, spice=args.spice)
        results = json.loads(Path(args.results).read_text(encoding="utf-8"))  # checked just now
        captions = {r["image_id"]: r["caption"] for r in results}
        result = {"metrics": metrics, "health": measure_health(captions), "per_image": per_image}
    elif args.checkpoint:
        result = evaluate(
            args.checkpoint, args.split, args.data_dir, args.layout, args.beam, args.max_len,
            length_penalty=args.length_penalty, limit=args.limit,
            output_dir=args.output_dir, spice=args.spice, options=DecodingOptions.from_flags(args),
            features_dir=args.features_dir,
        )  # fmt: skip
    else:
        parser.error("give a checkpoint, or --results with --annotations")
    print(format_metrics(result["metrics"]))
    if "health" in result:
        print(format_health(result["health"]))
    return result
