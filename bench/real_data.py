"""The real COCO material the tests and benchmarks read: where it is, and how to make it from any
COCO 2017 download.

The folder (`$CAPTIONING_TEST_DATA`, by default `../shared/data` beside the repository) holds
`coco-sample/`, a few hundred COCO images in the COCO 2017 layout, and
`coco-captions-val2017/captions_val2017.json`, the whole val2017 captions file. Make one with

    python -m bench.real_data /path/to/coco2017 /path/to/test-data
    export CAPTIONING_TEST_DATA=/path/to/test-data
"""

import argparse
import json
import os
import shutil
from pathlib import Path

VARIABLE = "CAPTIONING_TEST_DATA"
DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "data"
SAMPLE_IMAGES = {"train": 80, "val": 159}  # as many as the developers' sample holds


def real_data_dir():
    """The folder named by $CAPTIONING_TEST_DATA, else ../shared/data beside the repository."""
    return Path(os.environ.get(VARIABLE) or DEFAULT)


def coco_sample():
    """The COCO 2017 layout sample: annotations/captions_{train,val}2017.json, train2017/, val2017/."""
    return real_data_dir() / "coco-sample"


def val_captions():
    """The whole official captions_val2017.json (5,000 images, 25,014 captions)."""
    return real_data_dir() / "coco-captions-val2017" / "captions_val2017.json"


def missing(path):
    """Why a test or benchmark that needs `path` cannot run, and how to give it the data."""
    return (
        f"real COCO data not found at {path}: set {VARIABLE} to a folder made from any COCO 2017 "
        f"download with `python -m bench.real_data COCO_ROOT FOLDER` (default folder {DEFAULT})"
    )


def make_real_data(coco_root, folder, images=SAMPLE_IMAGES):
    """Write `folder` from a COCO 2017 download at `coco_root` (annotations/, train2017/,
    val2017/): the first `images[split]` images of each split by id, with their captions, and
    the whole val2017 captions file; returns `folder`."""
    coco_root, folder = Path(coco_root), Path(folder)
    annotations = coco_root / "annotations"
    for split, count in images.items():
        source = annotations / f"captions_{split}2017.json"
        if not source.is_file():
            raise FileNotFoundError(f"{source}: not found; give the root of a COCO 2017 download")
        data = json.loads(source.read_text(encoding="utf-8"))
        chosen = sorted(data["images"], key=lambda image: image["id"])[:count]
        ids = {image["id"] for image in chosen}
        sample = {**data, "images": chosen,
                  "annotations": [a for a in data["annotations"] if a["image_id"] in ids]}  # fmt: skip
        (folder / "coco-sample" / f"{split}2017").mkdir(parents=True, exist_ok=True)
        for image in chosen:
            shutil.copyfile(coco_root / f"{split}2017" / image["file_name"],
                            folder / "coco-sample" / f"{split}2017" / image["file_name"])  # fmt: skip
        written = folder / "coco-sample" / "annotations" / source.name
        written.parent.mkdir(parents=True, exist_ok=True)
        written.write_text(json.dumps(sample), encoding="utf-8")
    whole = folder / "coco-captions-val2017" / "captions_val2017.json"
    whole.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(annotations / "captions_val2017.json", whole)
    return folder


def main(argv=None):
    """python -m bench.real_data COCO_ROOT FOLDER"""
    parser = argparse.ArgumentParser(prog="python -m bench.real_data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument(
        "coco_root", help="a COCO 2017 download: annotations/, train2017/, val2017/"
    )
    parser.add_argument("folder", help="where the test data goes")
    args = parser.parse_args(argv)
    folder = make_real_data(args.coco_root, args.folder)
    print(f"test data written to {folder}; export {VARIABLE}={folder.resolve()}")


if __name__ == "__main__":
    main()
