"""What the four tutorial notebooks share: each dataset's settings (its folder, annotation layout,
evaluation split, download), getting its data, and the training preset their model settings
start from. A notebook's parameters cell names the dataset (`DATASET`) and holds its own
settings; docs/notebooks.md has the table of datasets and how to switch to MS-COCO."""

import dataclasses
from pathlib import Path

from captioning.data.download import download_coco
from captioning.demo.dataset import make_demo_dataset, read_marker
from captioning.presets import coco_config, demo_config

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
    COCO: downloaded with `download` (0_Dataset.ipynb; finished archives are skipped), else
    checked to be there.
    """
    root = Path(settings.data_dir)
    if settings.dataset == "demo":
        made_with = read_marker(root) or {}
        options = {k: made_with.get(k, v) for k, v in DEMO_OPTIONS.items()}
        return make_demo_dataset(root, **options, progress=progress)
    if download:
        return download_coco(
            root, settings.coco_year, settings.coco_splits, settings.karpathy, progress=progress
        )
    if not root.is_dir():
        raise FileNotFoundError(
            f"no dataset in {root}: run 0_Dataset.ipynb with DATASET = {settings.dataset!r} "
            "first (it downloads COCO), or set DATA_DIR to where COCO is"
        )
    return root


def training_preset(dataset="demo", decoder=None):
    """The `TrainConfig` a notebook's model settings start from: `presets.demo_config` for the
    demo, `presets.coco_config` (the published recipes, docs/coco_recipes.md) for COCO."""
    decoder = decoder or "showtell"
    return demo_config(decoder) if dataset == "demo" else coco_config(decoder)


def configure(preset, **changes):
    """`preset` with the `changes` that are not None: a parameter left at None keeps the
    preset's value."""
    return dataclasses.replace(preset, **{k: v for k, v in changes.items() if v is not None})
