"""CIDEr-D in-process: equal to pycocoevalcap's Cider on real COCO captions, per image and for the
corpus; document frequencies cached on disk and rebuilt when the captions change; the training
references end with an end token that no caption word can spell."""

import hashlib
import json
import random

import numpy as np
import pytest
from pycocoevalcap.cider.cider import Cider

from bench import real_data
from captioning.data.annotations import _cache_key, read_split
from captioning.evaluation import cider_d
from captioning.evaluation.cider_d import (
    END_TOKEN,
    CiderD,
    corpus_cider_d,
    ptb_tokens,
    training_scorer,
)
from captioning.evaluation.coco_metrics import _tokenize_like_ptb
from tests.helpers import COCO_VAL_CAPTIONS


@pytest.fixture(scope="module")
def coco_references():
    """PTB-tokenised reference captions of 400 real COCO val2017 images."""
    if not COCO_VAL_CAPTIONS.is_file():
        pytest.skip(real_data.missing(COCO_VAL_CAPTIONS))
    refs = {}
    for annotation in json.loads(COCO_VAL_CAPTIONS.read_text())["annotations"]:
        refs.setdefault(annotation["image_id"], []).append(
            _tokenize_like_ptb(annotation["caption"])
        )
    return {i: refs[i] for i in sorted(refs)[:400]}


def candidates(refs, rng):
    """A hypothesis per image: its own reference, a shuffled or cut one, another image's, words
    repeated, or nothing: every branch of the metric (clipping, length penalty, zero norms)."""
    ids = list(refs)
    out = {}
    for i in ids:
        words = rng.choice(refs[i]).split()
        kind = rng.randrange(6)
        if kind == 1:
            rng.shuffle(words)
        elif kind == 2:
            words = words[: rng.randint(1, 4)]
        elif kind == 3:
            words = refs[rng.choice(ids)][0].split()
        elif kind == 4:
            words = words[:2] * 4
        elif kind == 5 and rng.random() < 0.3:
            words = []
        out[i] = " ".join(words)
    return out


def test_equals_pycocoevalcap_per_image_and_corpus(coco_references):
    hyps = candidates(coco_references, random.Random(0))
    ids = list(coco_references)
    theirs, their_scores = Cider().compute_score(coco_references, {i: [hyps[i]] for i in ids})
    ours, our_scores = corpus_cider_d(
        [hyps[i].split() for i in ids], [[r.split() for r in coco_references[i]] for i in ids]
    )
    assert ours == pytest.approx(theirs, abs=1e-9) and theirs > 0.3
    np.testing.assert_allclose(our_scores, their_scores, rtol=0, atol=1e-9)
    assert len(set(np.round(their_scores, 6))) > 100  # scores that tell the captions apart


def test_many_samples_per_image_equal_one_call_each(coco_references):
    # The reward's case: K captions per image scored at once, the document frequencies those of
    # the images (as K calls of pycocoevalcap, each with one caption per image, compute them).
    ids, k = list(coco_references)[:60], 3
    refs = {i: coco_references[i] for i in ids}
    rounds = [candidates(refs, random.Random(seed)) for seed in range(k)]
    theirs = np.stack(
        [Cider().compute_score(refs, {i: [h[i]] for i in ids})[1] for h in rounds], axis=1
    )  # (images, k)
    ours = CiderD().score(
        [h[i].split() for i in ids for h in rounds], [[r.split() for r in refs[i]] for i in ids],
        np.repeat(np.arange(len(ids)), k),
    )  # fmt: skip
    np.testing.assert_allclose(ours.reshape(len(ids), k), theirs, rtol=0, atol=1e-9)


def test_fixed_document_frequencies_equal_those_of_the_references(coco_references):
    ids = list(coco_references)
    refs = [[r.split() for r in coco_references[i]] for i in ids]
    scorer = CiderD.from_references(refs)
    hyps = candidates(coco_references, random.Random(1))
    fixed = scorer.score([hyps[i].split() for i in ids], refs)
    np.testing.assert_allclose(fixed, corpus_cider_d([hyps[i].split() for i in ids], refs)[1],
                               rtol=0, atol=1e-12)  # fmt: skip
    # Scored with the frequencies of all 400 images, 50 images' captions differ from scoring
    # them with those of the 50 alone, as pycocoevalcap would.
    alone = corpus_cider_d([hyps[i].split() for i in ids[:50]], refs[:50])[1]
    assert np.abs(scorer.score([hyps[i].split() for i in ids[:50]], refs[:50]) - alone).max() > 0.01


def test_n_gram_keys_are_exact_and_ordered():
    assert cider_d.BASE**4 <= 2**63 - 1 < (cider_d.BASE + 1) ** 4
    sentence, keys = cider_d.ngrams(np.array([5, cider_d.BASE - 1, 5]), np.array([0, 3]))
    assert sorted(cider_d.ngram_order(keys).tolist()) == [1, 1, 1, 2, 2, 3]
    assert keys.max() == (5 * cider_d.BASE + cider_d.BASE - 1) * cider_d.BASE + 5


def test_document_frequencies_are_cached_and_rebuilt_when_captions_change(
    demo_root, tmp_path, monkeypatch
):
    split = read_split(demo_root, "train")
    scorer, (ref_ids, ref_offsets) = training_scorer(split, tmp_path)
    files = list((tmp_path / "cider-d").glob("*.npz"))
    assert len(files) == 1
    with np.load(files[0], allow_pickle=False) as z:
        assert int(z["documents"]) == len(split.image_ids)
    # The frequencies are those of the split's references, counted image by image in Python.
    words = scorer.words.words()
    expected = {}
    for image in range(len(split.image_ids)):
        grams = set()
        for c in np.flatnonzero(split.caption_image == image):
            sentence = [words[i - 1] for i in ref_ids[ref_offsets[c] : ref_offsets[c + 1]]]
            grams |= {tuple(sentence[s : s + n]) for n in range(1, 5)
                      for s in range(len(sentence) - n + 1)}  # fmt: skip
        for gram in grams:
            expected[gram] = expected.get(gram, 0) + 1
    spelled = {tuple(_spell(k, words)): c
               for k, c in zip(scorer.df_keys.tolist(), scorer.df_counts.tolist())}  # fmt: skip
    assert spelled == expected and max(expected.values()) > 1

    def no_rebuild(*args, **kwargs):
        raise AssertionError("document frequencies computed again")

    with monkeypatch.context() as m:
        m.setattr(cider_d, "document_frequencies", no_rebuild)
        again, _ = training_scorer(split, tmp_path)
    assert np.array_equal(again.df_keys, scorer.df_keys)
    assert np.array_equal(again.df_counts, scorer.df_counts)

    split.captions[0] = "a purple hexagon beside a purple hexagon"
    changed, _ = training_scorer(split, tmp_path)
    assert len(list((tmp_path / "cider-d").glob("*.npz"))) == 2
    assert not np.array_equal(changed.df_keys, scorer.df_keys)


def test_training_references_end_once_with_a_token_no_caption_word_can_spell(demo_root, tmp_path):
    split = read_split(demo_root, "train")
    scorer, (ref_ids, ref_offsets) = training_scorer(split, tmp_path)
    end = scorer.words.ids[END_TOKEN]
    assert np.array_equal(ref_ids[ref_offsets[1:] - 1], np.full(len(split.captions), end))
    assert np.count_nonzero(ref_ids == end) == len(split.captions)
    # PTB tokenisation lower-cases every word: a caption that writes the token gets "<end>".
    spelled = ptb_tokens([END_TOKEN, f"A horse {END_TOKEN}.", "<end>", "END"])
    assert END_TOKEN not in {t for tokens in spelled for t in tokens}


def test_frequencies_cached_before_the_end_token_are_not_reused(demo_root, tmp_path):
    # The file the version without the end token wrote, at the name it gave it.
    split = read_split(demo_root, "train")
    tokens = split.tokenized(tmp_path)
    words = cider_d.WordIndex()
    table = [[words.add(t) for t in tokens_of] for tokens_of in ptb_tokens(tokens.words)]
    ids, offsets = cider_d.TokenMap(table)(tokens.ids, tokens.offsets)
    df_keys, df_counts = cider_d.document_frequencies(ids, offsets, split.caption_image)
    key = hashlib.sha1(f"cider-d/1|{_cache_key(split)}".encode()).hexdigest()[:20]
    old = tmp_path / "cider-d" / f"{key}.npz"
    old.parent.mkdir()
    text = np.frombuffer("\n".join(words.words()).encode("utf-8"), np.uint8)
    np.savez(old, words=text, df_keys=df_keys, df_counts=df_counts, documents=len(split.image_ids))
    written = old.read_bytes()

    scorer, _ = training_scorer(split, tmp_path)
    end = np.array([scorer.words.ids[END_TOKEN]])
    assert cider_d._lookup(scorer.df_keys, scorer.df_counts, end).tolist() == [len(split.image_ids)]
    # A checkout of the old version sharing the cache keeps its file, under its own name.
    assert old.read_bytes() == written and len(list(old.parent.glob("*.npz"))) == 2


def _spell(key, words):
    """The words of an n-gram key."""
    ids = []
    while key:
        key, digit = divmod(key, cider_d.BASE)
        ids.append(digit)
    return [words[i - 1] for i in reversed(ids)]
