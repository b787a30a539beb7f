"""Self-critical reward: this project's CIDEr-D against pycocoevalcap's `Cider` on the same
sampled captions of real COCO val2017 images, values checked equal."""

import json
import random

import numpy as np

from bench.common import VAL_CAPTIONS, row, timed

SAMPLES = 5


def sampled_captions(references, rng):
    """Stand-ins for captions sampled from a model: each image's own reference words shuffled and
    cut, or another image's reference (real COCO words and lengths, right and wrong)."""
    ids = list(references)
    out = []
    for i in ids:
        words = rng.choice(references[i]).split() if rng.random() < 0.7 else None
        if words is None:
            words = rng.choice(references[rng.choice(ids)]).split()
        else:
            cut = rng.randint(max(1, len(words) // 2), len(words))
            words = rng.sample(words, len(words))[:cut] if rng.random() < 0.5 else words[:cut]
        out.append(" ".join(words))
    return out


def run(workdir, quick):
    """Yield the reward row (sampled captions per second), for one batch of images."""
    from pycocoevalcap.cider.cider import Cider

    from captioning.evaluation.cider_d import CiderD
    from captioning.evaluation.coco_metrics import _tokenize_like_ptb

    images = 64 if quick else 500
    references = {}
    for annotation in json.loads(VAL_CAPTIONS.read_text())["annotations"]:
        references.setdefault(annotation["image_id"], []).append(
            _tokenize_like_ptb(annotation["caption"])
        )
    references = {i: references[i] for i in sorted(references)[:images]}
    rng = random.Random(0)
    rounds = [sampled_captions(references, rng) for _ in range(SAMPLES)]  # (samples, images)
    ids = list(references)

    def theirs():
        # One call per sample: pycocoevalcap takes one caption per image id, and its document
        # frequencies are those of the images' references, as in ours.
        scores = [Cider().compute_score(references, dict(zip(ids, ([c] for c in r))))[1]
                  for r in rounds]  # fmt: skip
        return np.stack(scores, axis=1)  # (images, samples)

    def ours():
        hypotheses = [rounds[k][i].split() for i in range(len(ids)) for k in range(SAMPLES)]
        tokens = [[r.split() for r in references[i]] for i in ids]
        return CiderD().score(hypotheses, tokens, np.repeat(np.arange(len(ids)), SAMPLES))

    ours()  # warm-up
    fast, fast_s = min((timed(ours) for _ in range(3)), key=lambda r: r[1])
    slow, slow_s = timed(theirs)
    gap = float(np.abs(fast.reshape(len(ids), SAMPLES) - slow).max())
    captions = len(ids) * SAMPLES
    yield row(
        f"CIDEr-D reward, {SAMPLES} samples x {len(ids)} images vs pycocoevalcap Cider",
        captions / fast_s,
        captions / slow_s,
        "captions/s",
        target=20,
        higher_is_better=True,
        note=f"same values: largest difference {gap:.1e} (real COCO val2017 references); "
        "ours counts each image's references once, pycocoevalcap once per sample",
    )
    single = [rounds[0][i].split() for i in range(len(ids))]
    refs = [[r.split() for r in references[i]] for i in ids]
    fast, fast_s = min((timed(CiderD().score, single, refs) for _ in range(3)), key=lambda r: r[1])
    slow, slow_s = timed(Cider().compute_score, references, {i: [rounds[0][k]] for k, i in
                                                             enumerate(ids)})  # fmt: skip
    yield row(
        f"CIDEr-D, one caption x {len(ids)} images vs pycocoevalcap Cider",
        len(ids) / fast_s,
        len(ids) / slow_s,
        "captions/s",
        higher_is_better=True,
        note=f"largest difference {float(np.abs(fast - slow[1]).max()):.1e}",
    )
