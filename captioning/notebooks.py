"""What the four tutorial notebooks share: each dataset's settings (its folder, annotation layout,
evaluation split, download), getting its data, and the training preset their model settings
start from. A notebook's parameters cell names the dataset (`DATASET`) and holds its own
settings; docs/notebooks.md has the table of datasets and how to switch to MS-COCO."""

import dataclasses
import math
import shutil
from pathlib import Path

from captioning.data.download import (
    APPROXIMATE_SIZES,
    COCO_FILES,
    FLICKR8K_FILES,
    coco_archive_names,
    download_coco,
    download_flickr8k,
    expected_layout,
    flickr8k_archive_names,
    flickr8k_layout,
)
from captioning.demo.dataset import make_demo_dataset, read_marker
from captioning.presets import coco_config, demo_config, flickr8k_config
from captioning.training.loss_log import duration_text

# The standard demo dataset: what `make demo` trains on and the committed notebooks show.
DEMO_OPTIONS = dict(n_train=4000, n_val=500, n_test=500, image_size=64, seed=0, max_shapes=3)


@dataclasses.dataclass(frozen=True)
class DataSettings:
    """One dataset's settings in the notebooks (docs/notebooks.md, "Using MS-COCO")."""

    dataset: str  # the notebooks' DATASET
    data_dir: str  # its folder, relative to the notebooks
    layout: str  # annotation layout: "auto" (COCO or demo folders) or "karpathy"
    test_split: str  # the split 3_Inference scores ("val" where test captions are not public)
    coco_year: int | None = None  # COCO: the release 0_Dataset downloads
    coco_splits: tuple = ()  # COCO: its image archives ("test" adds unlabelled test images)
    karpathy: bool = False  # COCO: also download Karpathy's split file (dataset_coco.json)


DATASETS = {
    "demo": DataSettings("demo", "data/demo", "auto", "test"),
    "coco2014": DataSettings(
        "coco2014", "data/coco", "karpathy", "test", 2014, ("train", "val"), karpathy=True
    ),
    "coco2017": DataSettings("coco2017", "data/coco2017", "auto", "val", 2017, ("train", "val")),
    "flickr8k": DataSettings("flickr8k", "data/flickr8k", "karpathy", "test"),
}


def data_settings(dataset="demo", data_dir=None):
    """`dataset`'s settings (a key of DATASETS), in folder `data_dir` when it is given."""
    if dataset not in DATASETS:
        choices = ", ".join(map(repr, DATASETS))
        raise ValueError(f"DATASET must be one of {choices}, not {dataset!r}")
    settings = DATASETS[dataset]
    if data_dir is not None:
        settings = dataclasses.replace(settings, data_dir=str(data_dir))
    return settings


def get_data(settings, download=False, progress=True):
    """The dataset's folder, ready to read.

    Demo: generated unless an identical dataset is there (a few seconds); a demo dataset already
    in the folder is used with the options it was made with, other folders get DEMO_OPTIONS.
    COCO and Flickr8k: downloaded with `download` (0_Dataset.ipynb; finished archives are
    skipped), else checked to be there.
    """
    root = Path(settings.data_dir)
    if settings.dataset == "demo":
        made_with = read_marker(root) or {}
        options = {k: made_with.get(k, v) for k, v in DEMO_OPTIONS.items()}
        return make_demo_dataset(root, **options, progress=progress)
    if download and not holds_dataset(settings):
        if settings.dataset == "flickr8k":
            return download_flickr8k(root, progress=progress)
        return download_coco(
            root, settings.coco_year, settings.coco_splits, settings.karpathy, progress=progress
        )
    if not root.is_dir():
        raise FileNotFoundError(
            f"no dataset in {root}: run 0_Dataset.ipynb with DATASET = {settings.dataset!r} "
            "first (it downloads it), or set DATA_DIR to where it is"
        )
    return root


def training_preset(dataset="demo", decoder=None, scst=False):
    """The `TrainConfig` a notebook's model settings start from: `presets.demo_config` for the
    demo, `presets.coco_config` (the published recipes, docs/coco_recipes.md) for COCO,
    `presets.flickr8k_config` for Flickr8k; with `scst`, the preset with its self-critical
    stage."""
    decoder = decoder or "showtell"
    if dataset == "demo":
        return demo_config(decoder, scst)
    if dataset == "flickr8k":
        return flickr8k_config(decoder, scst)
    return coco_config(decoder, scst)


def configure(preset, **changes):
    """`preset` with the `changes` that are not None: a parameter left at None keeps the
    preset's value."""
    return dataclasses.replace(preset, **{k: v for k, v in changes.items() if v is not None})


def archive_names(settings):
    """The archives that make up the downloaded dataset `settings` name (COCO or Flickr8k)."""
    if settings.dataset == "flickr8k":
        return flickr8k_archive_names()
    return coco_archive_names(settings.coco_year, settings.coco_splits, settings.karpathy)


def downloaded_layout(settings):
    """The paths a finished download of the dataset `settings` name leaves in its folder."""
    root = Path(settings.data_dir)
    if settings.dataset == "flickr8k":
        return flickr8k_layout(root)
    return expected_layout(root, settings.coco_year, settings.coco_splits, settings.karpathy)


def holds_dataset(settings):
    """Whether the folder already holds the COCO release or Flickr8k `settings` name, unpacked (by
    this project's download or another), with no archive of ours left half downloaded."""
    root = Path(settings.data_dir)
    partial = list((root / "downloads").glob("*.part")) if (root / "downloads").is_dir() else []
    return all(path.exists() for path in downloaded_layout(settings)) and not partial


def size_text(size):
    """Bytes in words: '95.1 GB', '812 MB', '4.1 KB'."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if size >= scale:
            return f"{size / scale:.3g} {unit}"
    return f"{size} bytes"


def describe_download(settings):
    """What getting the dataset costs: for COCO and Flickr8k the archives, their sizes (published,
    or stated roughly where none is) and the disk space."""
    if settings.dataset == "demo":
        return "the demo dataset is drawn on this machine: nothing to download"
    names = archive_names(settings)
    remote_files = FLICKR8K_FILES if settings.dataset == "flickr8k" else COCO_FILES
    sizes = [remote_files[name].size or APPROXIMATE_SIZES.get(name) for name in names]
    rough = any(not remote_files[name].size and name in APPROXIMATE_SIZES for name in names)
    known = sum(size for size in sizes if size)
    unknown = [name for name, size in zip(names, sizes) if not size]
    text = (
        f"{settings.dataset}: {len(names)} archives ({', '.join(names)}), "
        f"{'about ' if rough else ''}{size_text(known)} to download"
        + (f" besides {', '.join(unknown)} (size not published)" if unknown else "")
        + f"; about as much again once unpacked into {settings.data_dir} (the archives can be "
        "deleted then)"
    )
    if holds_dataset(settings):
        text += f". {settings.data_dir} holds it already: nothing to download"
    return text


def describe_epoch(seconds, steps, steps_per_epoch):
    """How long an epoch takes on this machine, from the time of its first steps."""
    per_step = seconds / max(steps, 1)
    return (
        f"{steps} steps took {seconds:.1f} s ({per_step:.2f} s a step): an epoch of "
        f"{steps_per_epoch} steps takes about {duration_text(per_step * steps_per_epoch)} here"
    )


def describe_caches(config, images):
    """What the run caches on disk before its first epoch, for `images` training and validation
    images: the frozen CNN's features, the decoded images, or nothing; and the space left."""
    from captioning.checkpoint import build_model
    from captioning.data.annotations import default_cache_dir
    from captioning.data.feature_cache import feature_shape
    from captioning.data.loading import make_transform
    from captioning.data.vocabulary import Vocabulary

    folder = default_cache_dir()
    if config.features_dir is not None:
        return f"no cache: the precomputed features in {config.features_dir} are read as they are"
    if config.blind or not (config.trainable_blocks == 0 or config.cache_images):
        return "no cache: every epoch reads and decodes the image files"
    if config.trainable_blocks == 0:
        # The shapes only: random weights, nothing downloaded.
        shell = dataclasses.replace(config, pretrained=False, weights_path=None)
        model = build_model(shell, Vocabulary(1, None, captions=[["a"]]))
        shape = feature_shape(
            model.encoder, make_transform(config.image_size, resize=config.resize)
        )
        kind, item_bytes = f"frozen {config.backbone} features {shape}, float16", 2
    else:
        shape, kind, item_bytes = (3, config.image_size, config.image_size), "decoded images", 1
    size = images * math.prod(shape) * item_bytes
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    # The home folder as "~": a notebook's saved output names no user's path.
    shown = f"~/{folder.relative_to(Path.home())}" if folder.is_relative_to(Path.home()) else folder
    return (
        f"cache: {kind} of {images:,} images, {size_text(size)} in {shown} "
        f"({size_text(free)} free there; $CAPTIONING_CACHE moves it), built before the first "
        "epoch and reused by every later run with the same CNN and images"
    )


def compare_results(results, annotations_file=None):
    """One table of several `evaluate` results ({name: result}): their CIDEr, BLEU-4, METEOR
    (with Java) and ROUGE-L, the demo's objects right (given its annotations file), and their
    caption health (bad endings, repeats, novel and distinct captions)."""
    from captioning.demo.scoring import object_accuracy

    columns = {"CIDEr": "CIDEr", "Bleu_4": "BLEU-4", "METEOR": "METEOR", "ROUGE_L": "ROUGE-L"}
    columns = {k: v for k, v in columns.items() if all(k in r["metrics"] for r in results.values())}
    health = {"bad_endings": "bad end", "repeats": "repeats", "novel_captions": "novel",
              "distinct_captions": "distinct"}  # fmt: skip
    head = [*columns.values(), *(["objects"] if annotations_file else []), *health.values()]
    width = max(map(len, results))
    lines = [" " * width + "".join(f"{h:>10}" for h in head)]
    for name, result in results.items():
        cells = [f"{result['metrics'][k]:10.3f}" for k in columns]
        if annotations_file:
            right = object_accuracy(result["predictions"], annotations_file)["accuracy"]
            cells.append(f"{right:10.1%}")
        cells += [f"{result['health'][k]:10.1%}" if k in result["health"] else f"{'-':>10}"
                  for k in health]  # fmt: skip
        lines.append(f"{name:<{width}}" + "".join(cells))
    return "\n".join(lines)


def reading_features(config, features_dir):
    """`config` reading precomputed features from `features_dir` instead of images and a CNN
    (docs/data.md, "Precomputed features"); unchanged when `features_dir` is None."""
    if features_dir is None:
        return config
    return dataclasses.replace(
        config, features_dir=str(features_dir), trainable_blocks=0, cache_images=False
    )
