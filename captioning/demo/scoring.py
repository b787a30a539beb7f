"""Scoring captions against what the demo dataset knows of each image: the objects a caption
names, CIDEr against references drawn afresh, and where attention looks."""

import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from captioning.command import progress_disabled
from captioning.demo.dataset import (
    CANONICAL_SHAPES,
    SIZE_FRACTIONS,
    names_objects_correctly,
    write_captions,
)
from captioning.evaluation.cider_d import corpus_cider_d, ptb_tokens


def object_accuracy(predictions: dict[int, str], annotations_file) -> dict:
    """Score predicted captions by names_objects_correctly, overall and by number of objects."""
    path = Path(annotations_file)
    truth = {image["id"]: image["objects"] for image in json.loads(path.read_text())["images"]}
    unknown = sorted(int(i) for i in predictions if int(i) not in truth)
    if unknown or not predictions:
        raise ValueError(
            f"{path} has no image ids {unknown[:5]}" if unknown else "no predictions to score"
        )
    hits_by_count: dict[int, list[bool]] = {}
    for image_id, caption in predictions.items():
        objects = truth[int(image_id)]
        hits_by_count.setdefault(len(objects), []).append(names_objects_correctly(caption, objects))
    hits = [hit for count_hits in hits_by_count.values() for hit in count_hits]
    return {
        "accuracy": sum(hits) / len(hits),
        "by_count": {count: sum(h) / len(h) for count, h in sorted(hits_by_count.items())},
        "n": len(hits),
    }


def redraw_references(images, rng) -> dict[int, list[str]]:
    """Each image's five captions written afresh from its stored objects (`images`: the
    annotations file's "images"): references the generator could as well have drawn."""
    return {image["id"]: write_captions(image["objects"], image["width"], rng) for image in images}


def cider_over_redrawn_references(predictions: dict, annotations_file, draws=60, seed=0,
                                  progress=True) -> dict[str, list[float]]:  # fmt: skip
    """{name: corpus CIDEr per draw} for named sets of predictions ({image id: caption}), each
    draw against freshly written references: the spread is what the choice of phrasings alone
    does to a CIDEr difference on this data (Python tokenisation, as `cider_score`, and the
    in-process CIDEr-D that equals its scorer)."""
    images = json.loads(Path(annotations_file).read_text())["images"]
    tokens = {
        name: dict(zip(map(int, captions), ptb_tokens(captions.values())))
        for name, captions in predictions.items()
    }
    scores = {name: [] for name in predictions}
    for draw in tqdm(range(draws), desc="reference draws", disable=progress_disabled(progress)):
        references = redraw_references(images, np.random.default_rng([seed, draw]))
        tokenised = {}  # each image's references tokenised once per draw, for every name
        for name, hypotheses in tokens.items():
            for i in hypotheses.keys() - tokenised.keys():
                tokenised[i] = ptb_tokens(references[i])
            score, _ = corpus_cider_d(list(hypotheses.values()), [tokenised[i] for i in hypotheses])
            scores[name].append(score)
    return scores


def attention_on_objects(maps: dict, annotations_file) -> dict:
    """How often the attention of a word that names an object looks at that object.

    `maps` is {image id: (words, weights (words, positions))} from an attention model over a
    square grid. For every object a caption names right (its colour word and shape word),
    each of the two words counts as a hit when its attention peak's grid cell overlaps the
    object's box. "chance" is what a peak at a random cell would score: the share of cells
    that overlap the box, averaged over the same words. "on_another_object": the share of the
    words whose peak misses the named object's box but overlaps another object's.
    """
    path = Path(annotations_file)
    images = {image["id"]: image for image in json.loads(path.read_text())["images"]}
    hits, elsewhere, chances = [], [], []
    for image_id, (words, weights) in maps.items():
        image = images[int(image_id)]
        weights = np.asarray(weights, dtype=np.float64)
        side = int(round(np.sqrt(weights.shape[1])))
        cell = image["width"] / side
        boxes = {(o["color"], o["shape"]): object_box(o, image["width"]) for o in image["objects"]}
        for k in range(1, len(words)):
            pair = (words[k - 1], CANONICAL_SHAPES.get(words[k]))
            if pair not in boxes:
                continue
            overlapping = cells_overlapping(boxes[pair], side, cell)  # (side, side) booleans
            others = np.zeros_like(overlapping)
            for other in boxes.keys() - {pair}:
                others |= cells_overlapping(boxes[other], side, cell)
            for word in (k - 1, k):
                row, col = divmod(int(weights[word].argmax()), side)
                hits.append(bool(overlapping[row, col]))
                elsewhere.append(bool(others[row, col] and not overlapping[row, col]))
                chances.append(float(overlapping.mean()))
    if not hits:  # no caption names an object right: nothing to measure
        return {"on_object": None, "on_another_object": None, "chance": None, "words": 0}
    return {
        "on_object": float(np.mean(hits)),
        "on_another_object": float(np.mean(elsewhere)),
        "chance": float(np.mean(chances)),
        "words": len(hits),
    }


def object_box(obj, image_size):
    """(left, top, right, bottom) pixel box of a drawn object."""
    half = SIZE_FRACTIONS[obj["size"]] * image_size
    return (
        obj["x"] + 0.5 - half,
        obj["y"] + 0.5 - half,
        obj["x"] + 0.5 + half,
        obj["y"] + 0.5 + half,
    )


def cells_overlapping(box, side, cell):
    """(side, side) booleans: which grid cells (of `cell` pixels) overlap the box."""
    left, top, right, bottom = box
    edges = np.arange(side) * cell
    columns = (edges < right) & (edges + cell > left)
    rows = (edges < bottom) & (edges + cell > top)
    return rows[:, None] & columns[None, :]
