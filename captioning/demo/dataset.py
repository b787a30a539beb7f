"""Synthetic coloured-shapes captioning dataset in the COCO 2017 layout, plus a caption checker."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from captioning.command import progress_disabled

DEFAULT_DEMO_ROOT = Path(__file__).resolve().parents[2] / "data" / "demo"  # the repository's data/
SHAPES = ("circle", "square", "triangle", "star")
COLOURS = ("red", "green", "blue", "yellow", "purple")
SPLITS = ("train2017", "val2017", "test2017")
MARKER_NAME = "demo_params.json"
FORMAT_VERSION = 1  # bump whenever drawing or captions change, so stale datasets get regenerated
IDS_PER_SPLIT = 1_000_000  # image ids are unique across splits, as in real COCO

COLOUR_RGB = {
    "red": (210, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 215),
    "yellow": (235, 200, 20),
    "purple": (140, 50, 175),
}
SIZE_FRACTIONS = {"small": 0.11, "large": 0.19}  # half-extent of a shape relative to image side
SHAPE_WORDS = {
    "circle": ("circle", "disc"),
    "square": ("square", "box"),
    "triangle": ("triangle",),
    "star": ("star",),
}
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
RELATION_WORDS = {
    "left": ("to the left of", "left of"),
    "right": ("to the right of", "right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
CANONICAL_SHAPES = {word: shape for shape, words in SHAPE_WORDS.items() for word in words}
SUPERSAMPLE = 4  # shapes are drawn at 4x and downscaled so their edges are anti-aliased


def pick(options, rng):
    """Return one of options chosen by rng."""
    return options[int(rng.integers(len(options)))]


def sample_objects(n_objects, image_size, rng):
    """Return n non-overlapping objects whose (colour, shape) pairs are all different."""
    pairs = rng.choice(len(COLOURS) * len(SHAPES), size=n_objects, replace=False)
    while True:  # a layout with no room left for its next object is redrawn from scratch
        objects = []
        for pair in pairs:
            size = pick(("small", "large"), rng)
            low = int(np.ceil(SIZE_FRACTIONS[size] * image_size))
            for _ in range(50):
                x, y = (int(v) for v in rng.integers(low, image_size - low, size=2))
                new = {
                    "shape": SHAPES[pair % len(SHAPES)],
                    "color": COLOURS[pair // len(SHAPES)],
                    "size": size,
                    "x": x,
                    "y": y,
                }
                if not any(overlaps(new, old, image_size) for old in objects):
                    objects.append(new)
                    break
        if len(objects) == n_objects:
            return objects


def overlaps(a, b, image_size):
    """Tell whether two objects come closer than a small gap, treating each as a disc."""
    reach = (SIZE_FRACTIONS[a["size"]] + SIZE_FRACTIONS[b["size"]] + 0.04) * image_size
    return np.hypot(a["x"] - b["x"], a["y"] - b["y"]) < reach


def draw_shape(draw, shape, cx, cy, radius, fill):
    """Draw one filled shape centred on (cx, cy) with the given half-extent."""
    if shape == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=fill)
    elif shape == "square":
        half = 0.85 * radius  # a slightly smaller square looks as big as the circle
        draw.rectangle([cx - half, cy - half, cx + half, cy + half], fill=fill)
    elif shape == "triangle":
        draw.polygon(
            [
                (cx, cy - radius),
                (cx - 0.95 * radius, cy + 0.75 * radius),
                (cx + 0.95 * radius, cy + 0.75 * radius),
            ],
            fill=fill,
        )
    else:  # five-pointed star
        angles = np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, radius, 0.45 * radius)
        draw.polygon(list(zip(cx + radii * np.cos(angles), cy - radii * np.sin(angles))), fill=fill)


def draw_image(objects, image_size, rng):
    """Render objects on a light tinted background with a mild gradient and noise."""
    background = rng.uniform(185, 235) + rng.uniform(-12, 12, size=3)
    canvas = Image.new("RGB", (image_size * SUPERSAMPLE,) * 2, tuple(int(v) for v in background))
    draw = ImageDraw.Draw(canvas)
    for obj in objects:
        fill = np.clip(np.array(COLOUR_RGB[obj["color"]]) + rng.integers(-15, 16, size=3), 0, 255)
        draw_shape(
            draw,
            obj["shape"],
            (obj["x"] + 0.5) * SUPERSAMPLE,
            (obj["y"] + 0.5) * SUPERSAMPLE,
            SIZE_FRACTIONS[obj["size"]] * image_size * SUPERSAMPLE,
            tuple(int(v) for v in fill),
        )
    pixels = np.asarray(canvas.reduce(SUPERSAMPLE), dtype=np.float32)
    ramp = np.linspace(-1.0, 1.0, image_size, dtype=np.float32)
    gradient = (
        rng.uniform(-10, 10) * ramp[None, :, None] + rng.uniform(-10, 10) * ramp[:, None, None]
    )
    noise = rng.normal(0.0, 4.0, size=pixels.shape)
    return Image.fromarray(np.clip(pixels + gradient + noise, 0, 255).round().astype(np.uint8))


def describe_object(obj, rng, article="a"):
    """Say '[article] [size] colour shape', with the size word included half of the time."""
    words = [article] if article else []
    if rng.random() < 0.5:
        words.append(pick(SIZE_WORDS[obj["size"]], rng))
    return " ".join(words + [obj["color"], pick(SHAPE_WORDS[obj["shape"]], rng)])


def describe_relation(obj, other, rng):
    """Say where obj is relative to other, along whichever axis separates them more."""
    dx, dy = obj["x"] - other["x"], obj["y"] - other["y"]
    if abs(dx) >= abs(dy):
        return pick(RELATION_WORDS["left" if dx < 0 else "right"], rng)
    return pick(RELATION_WORDS["above" if dy < 0 else "below"], rng)


def describe_region(obj, image_size):
    """Say which ninth of the image the object's centre lies in."""
    column = ("left", "", "right")[min(2, 3 * obj["x"] // image_size)]
    row = ("top", "", "bottom")[min(2, 3 * obj["y"] // image_size)]
    if row and column:
        return f"in the {row} {column} corner"
    return f"at the {row}" if row else f"on the {column}" if column else "in the middle"


def join_phrases(phrases):
    """Join phrases as 'x', 'x and y' or 'x, y and z'."""
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def write_captions(objects, image_size, rng, n_captions=5):
    """Return n distinct captions that name every object with its colour and nothing else."""
    count = COUNT_WORDS[len(objects)]

    def shuffled():
        return [objects[i] for i in rng.permutation(len(objects))]

    def listing(ordered=None):
        return join_phrases([describe_object(o, rng) for o in (ordered or shuffled())])

    def chain():
        first, second, *rest = shuffled()
        text = " ".join(
            [
                describe_object(first, rng),
                describe_relation(first, second, rng),
                describe_object(second, rng),
            ]
        )
        for obj in rest:
            text += f" which is {describe_relation(second, obj, rng)} {describe_object(obj, rng)}"
        return text

    def scan():
        xs, ys = [o["x"] for o in objects], [o["y"] for o in objects]
        if max(xs) - min(xs) >= max(ys) - min(ys):
            return "from left to right: " + listing(sorted(objects, key=lambda o: o["x"]))
        return "from top to bottom: " + listing(sorted(objects, key=lambda o: o["y"]))

    if len(objects) == 1:
        obj = objects[0]
        templates = [
            lambda: describe_object(obj, rng),
            lambda: f"a picture of {describe_object(obj, rng)}",
            lambda: f"there is {describe_object(obj, rng)} in the image",
            lambda: f"{describe_object(obj, rng)} {describe_region(obj, image_size)}",
            lambda: f"one shape: {describe_object(obj, rng)}",
            lambda: f"an image showing a single {describe_object(obj, rng, article='')}",
            lambda: f"{describe_object(obj, rng)} on its own",
        ]
    else:
        templates = [
            listing,
            lambda: f"{count} shapes: {listing()}",
            lambda: f"a picture of {listing()}",
            lambda: f"there are {count} shapes, {listing()}",
            scan,
            chain,
            lambda: f"there is {chain()}",
            lambda: f"an image with {listing()}",
        ]
    # every template has its own fixed wording, so captions from different templates never coincide
    return [templates[i]() for i in rng.permutation(len(templates))[:n_captions]]


def write_split(folder, split, n_images, image_size, seed, max_shapes, progress_bar):
    """Write one split's PNGs and its COCO captions JSON under folder."""
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    first_id = SPLITS.index(split) * IDS_PER_SPLIT + 1
    (folder / split).mkdir(parents=True)
    # exactly balanced shape counts, in random order
    shape_counts = rng.permutation(np.arange(n_images) % max_shapes + 1)
    images, annotations = [], []
    for index, n_objects in enumerate(shape_counts):
        image_id, file_name = first_id + index, f"{first_id + index:012d}.png"
        objects = sample_objects(int(n_objects), image_size, rng)
        draw_image(objects, image_size, rng).save(folder / split / file_name)
        images.append(
            {
                "id": image_id,
                "file_name": file_name,
                "width": image_size,
                "height": image_size,
                "objects": objects,
            }
        )
        for k, caption in enumerate(write_captions(objects, image_size, rng)):
            annotations.append({"id": image_id * 10 + k, "image_id": image_id, "caption": caption})
        progress_bar.update(1)
    info = {
        "description": f"synthetic shapes captioning demo, {split}, seed {seed}",
        "version": str(FORMAT_VERSION),
    }
    coco = {"info": info, "licenses": [], "images": images, "annotations": annotations}
    (folder / "annotations" / f"captions_{split}.json").write_text(
        json.dumps(coco, separators=(",", ":"))
    )


def read_marker(root):
    """Return the parameters recorded in root's marker file, or None if there is none."""
    try:
        return json.loads((Path(root) / MARKER_NAME).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def make_demo_dataset(
    root=DEFAULT_DEMO_ROOT,
    n_train=4000,
    n_val=500,
    n_test=500,
    image_size=64,
    seed=0,
    max_shapes=3,
    progress=True,
) -> Path:
    """Write the demo dataset under root unless an identical one is already there; return root."""
    root = Path(root)
    params = {
        "format_version": FORMAT_VERSION,
        "n_train": n_train,
        "n_val": n_val,
        "n_test": n_test,
        "image_size": image_size,
        "seed": seed,
        "max_shapes": max_shapes,
    }
    if read_marker(root) == params:
        return root
    sizes = (n_train, n_val, n_test)
    if not (
        1 <= max_shapes <= 3 and image_size >= 16 and all(0 <= n < IDS_PER_SPLIT for n in sizes)
    ):
        raise ValueError(
            f"unsupported demo parameters {params}: need max_shapes 1 to 3 and image_size >= 16"
        )
    if root.exists() and not looks_like_demo_dataset(root):
        raise FileExistsError(f"{root} exists and is not a demo dataset; refusing to replace it")
    temporary = root.parent / f"{root.name}.tmp-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    try:
        (temporary / "annotations").mkdir(parents=True)
        with tqdm(
            total=sum(sizes), desc="demo dataset", unit="img", disable=progress_disabled(progress)
        ) as bar:
            for split, n_images in zip(SPLITS, sizes):
                write_split(temporary, split, n_images, image_size, seed, max_shapes, bar)
        (temporary / MARKER_NAME).write_text(
            json.dumps(params, indent=1)
        )  # last: marks the dataset complete
        if read_marker(root) == params:  # another process finished the same dataset meanwhile
            shutil.rmtree(temporary)
        elif root.exists():
            retired = root.parent / f"{root.name}.old-{os.getpid()}"
            os.replace(root, retired)
            os.replace(temporary, root)
            shutil.rmtree(retired)
        else:
            os.replace(temporary, root)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)  # only still there if something failed
    return root


def resolve_data_dir(data_dir):
    """`data_dir`, or the built-in demo dataset when None; the built-in one is made on first use
    (named or not: `train.py --data-dir data/demo` on a fresh clone)."""
    if data_dir is None:
        return make_demo_dataset(DEFAULT_DEMO_ROOT)
    if Path(data_dir).resolve() == DEFAULT_DEMO_ROOT and read_marker(DEFAULT_DEMO_ROOT) is None:
        make_demo_dataset(DEFAULT_DEMO_ROOT)
    return Path(data_dir)


def looks_like_demo_dataset(folder):
    """Tell whether folder holds nothing but what make_demo_dataset writes, so replacing it loses nothing."""
    return folder.is_dir() and {p.name for p in folder.iterdir()} <= {
        *SPLITS,
        "annotations",
        MARKER_NAME,
    }


def parse_objects(caption: str) -> list[tuple[str, str]]:
    """Return the (colour, shape) pairs a caption names, in order, as canonical names."""
    words = re.findall(r"[a-z]+", caption.lower())
    return [
        (previous, CANONICAL_SHAPES[word])
        for previous, word in zip([""] + words, words)
        if word in CANONICAL_SHAPES and previous in COLOURS
    ]


def names_objects_correctly(caption: str, objects: list[dict]) -> bool:
    """Tell whether the caption names exactly the image's (colour, shape) pairs, no more and no fewer."""
    return set(parse_objects(caption)) == {(o["color"], o["shape"]) for o in objects}


def main(argv=None):
    """Generate the demo dataset from the command line."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", type=Path, default=DEFAULT_DEMO_ROOT)
    for name, default in (
        ("seed", 0),
        ("n-train", 4000),
        ("n-val", 500),
        ("n-test", 500),
        ("image-size", 64),
        ("max-shapes", 3),
    ):
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = vars(parser.parse_args(argv))
    root = make_demo_dataset(progress=not args.pop("quiet"), **args)
    print(f"demo dataset at {root}")


if __name__ == "__main__":
    main()
