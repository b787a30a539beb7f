"""A small Flickr8k folder as `download.py --dataset flickr8k` leaves it: Karpathy's split file
(dataset_flickr8k.json, in the format of caption_datasets.zip) and tiny JPEGs in
Flicker8k_Dataset/, the archive's own (misspelt) folder."""

import json
from pathlib import Path

from PIL import Image, ImageDraw

from captioning.data.download import FLICKR8K_IMAGE_DIR, FLICKR8K_SPLIT_FILE

# Few words, each in many captions: COCO's vocabulary threshold (6) keeps them on a few dozen images.
SUBJECTS = ("a dog", "a black dog", "a child", "two people", "a man")
ACTIONS = ("runs on the grass", "jumps into the water", "sits on a bench", "plays in the snow")
SPLIT_SIZES = {"train": 24, "val": 6, "test": 6}


def image_name(k):
    """A file name shaped like Flickr8k's (`1000268201_693b08cb0e.jpg`)."""
    return f"{1000268201 + k}_{k * 7919:010x}.jpg"


def captions_of(k):
    """The five captions of image k."""
    return [f"{SUBJECTS[(k + j) % len(SUBJECTS)]} {ACTIONS[(k * 3 + j) % len(ACTIONS)]} ."
            for j in range(5)]  # fmt: skip


def flickr8k_split_file(split_sizes=SPLIT_SIZES):
    """Karpathy's dataset_flickr8k.json for `split_sizes` ({split: images}) images, in order."""
    images, sentence_id = [], 0
    splits = [split for split, count in split_sizes.items() for _ in range(count)]
    for k, split in enumerate(splits):
        sentences = []
        for raw in captions_of(k):
            tokens = [word for word in raw.split() if word.isalnum()]
            sentences.append({"tokens": tokens, "raw": raw, "imgid": k, "sentid": sentence_id})
            sentence_id += 1
        images.append({
            "sentids": [s["sentid"] for s in sentences], "imgid": k, "sentences": sentences,
            "split": split, "filename": image_name(k),
        })  # fmt: skip
    return {"images": images, "dataset": "flickr8k"}


def draw_image(k, size=(40, 30)):
    """A small landscape picture, different for each k: a coloured ground and a box."""
    image = Image.new("RGB", size, ((k * 53) % 256, (k * 97) % 256, (k * 31) % 256))
    ImageDraw.Draw(image).rectangle((k % 10, 5, k % 10 + 15, 20), fill=(255 - k * 7 % 256, 40, 90))
    return image


def make_flickr8k_folder(root, split_sizes=SPLIT_SIZES):
    """Write the split file and its images under root (made if missing); return root."""
    root = Path(root)
    (root / FLICKR8K_IMAGE_DIR).mkdir(parents=True, exist_ok=True)
    split_file = flickr8k_split_file(split_sizes)
    for entry in split_file["images"]:
        draw_image(entry["imgid"]).save(root / FLICKR8K_IMAGE_DIR / entry["filename"])
    (root / FLICKR8K_SPLIT_FILE).write_text(json.dumps(split_file))
    return root
