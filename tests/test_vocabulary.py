"""Vocabulary: thresholds, special ids, unknown words, JSON storage, offline tokenisation."""

import json
import pickle

import nltk
import pytest

from bench import real_data
from captioning.data.vocabulary import Vocabulary, tokenize
from tests.helpers import COCO_VAL_CAPTIONS

CAPTIONS = [
    "A dog runs on the grass.",
    "a dog sleeps",
    "The cat, the dog and a bird!",
    "A cat sits on a mat",
    "a DOG barks",
]


def build(threshold, tmp_path, captions=CAPTIONS):
    return Vocabulary(threshold, vocab_file=str(tmp_path / "vocab.json"), captions=captions)


def test_special_ids_match_cvnd(tmp_path):
    vocab = build(1, tmp_path)
    assert (vocab("<start>"), vocab("<end>"), vocab("<unk>"), vocab("<pad>")) == (0, 1, 2, 3)
    assert (vocab.start_word, vocab.end_word, vocab.unk_word) == ("<start>", "<end>", "<unk>")
    assert vocab.idx2word[0] == "<start>" and vocab.word2idx["<end>"] == 1


def test_threshold_keeps_words_seen_often_enough(tmp_path):
    # counts: a=5, dog=4, cat=2, the=3, on=2, sleeps=1
    vocab = build(3, tmp_path)
    assert {"a", "dog", "the"} <= set(vocab.word2idx)
    assert "cat" not in vocab and "sleeps" not in vocab
    assert len(build(1, tmp_path)) > len(vocab) > len(build(5, tmp_path)) == 5


def test_unknown_words_map_to_unk(tmp_path):
    vocab = build(2, tmp_path)
    assert vocab("zebra") == vocab.unk_id == 2
    assert vocab("sleeps") == 2  # seen once, below threshold


def test_ids_are_deterministic_and_frequency_ordered(tmp_path):
    a = build(1, tmp_path)
    b = build(1, tmp_path, list(reversed(CAPTIONS)))
    assert a.word2idx == b.word2idx
    assert a.idx2word[4] == "a"  # most frequent word comes right after the specials


def test_encode_decode(tmp_path):
    vocab = build(1, tmp_path)
    ids = vocab.encode("A dog sleeps on the zebra")
    assert ids[0] == 0 and ids[-1] == 1 and vocab.unk_id in ids
    assert vocab.decode(ids) == "a dog sleeps on the"
    assert vocab.decode([0, vocab("cat"), 3, 1, vocab("dog")]) == "cat"  # stops at <end>


def test_json_round_trip(tmp_path):
    vocab = build(1, tmp_path)
    data = json.loads((tmp_path / "vocab.json").read_text())
    assert data["words"][:4] == ["<start>", "<end>", "<unk>", "<pad>"]
    loaded = Vocabulary(vocab_file=str(tmp_path / "vocab.json"), vocab_from_file=True)
    assert loaded.word2idx == vocab.word2idx and loaded.idx2word == vocab.idx2word
    assert Vocabulary.from_dict(vocab.to_dict()).word2idx == vocab.word2idx


def test_pickle_vocabulary_is_refused(tmp_path):
    path = tmp_path / "vocab.json"
    path.write_bytes(pickle.dumps({"words": ["x"]}))
    with pytest.raises(ValueError, match="vocab.json: not a JSON vocabulary"):
        Vocabulary.load(path)


def test_missing_vocab_file_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        Vocabulary(vocab_file=str(tmp_path / "nope.json"), vocab_from_file=True)


def test_tokenize_needs_no_nltk_data(monkeypatch):
    monkeypatch.setattr(nltk.data, "path", [])  # no punkt or any other resource reachable
    assert tokenize("A man, riding a HORSE.") == ["a", "man", ",", "riding", "a", "horse", "."]
    assert tokenize("Two dogs' toys aren't here") == [
        "two",
        "dogs",
        "'",
        "toys",
        "are",
        "n't",
        "here",
    ]


def test_build_from_real_coco_annotations_file(tmp_path):
    if not COCO_VAL_CAPTIONS.exists():
        pytest.skip(real_data.missing(COCO_VAL_CAPTIONS))
    vocab = Vocabulary(5, str(tmp_path / "v.json"), annotations_file=str(COCO_VAL_CAPTIONS))
    assert 1500 < len(vocab) < 5000
    assert vocab("man") != vocab.unk_id and vocab("qwertyzz") == vocab.unk_id
