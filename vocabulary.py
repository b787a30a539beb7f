"""The CVND call `from vocabulary import Vocabulary`; the vocabulary lives in
captioning/data/vocabulary.py."""

from captioning.data.vocabulary import PAD_WORD, Vocabulary

__all__ = ["PAD_WORD", "Vocabulary"]
