"""Word vocabulary for captions: offline tokenisation, word <-> id maps, JSON storage."""

import json
import os
from collections import Counter
from pathlib import Path

# `tokenize` lives in annotations (the token cache needs it); `vocabulary.tokenize` stays a name
# callers use.
from captioning.data.annotations import read_captions, tokenize
from captioning.atomic_file import write_text

PAD_WORD = "<pad>"


class Vocabulary:
    """Maps caption words to ids and back; `<start>`=0, `<end>`=1, `<unk>`=2, `<pad>`=3 as in CVND."""

    def __init__(
        self,
        vocab_threshold=5,
        vocab_file="./vocab.json",
        start_word="<start>",
        end_word="<end>",
        unk_word="<unk>",
        annotations_file=None,
        vocab_from_file=False,
        captions=None,
        strip_punctuation=False,
    ):
        """Load `vocab_file`, or build from `captions` (strings or token lists, else those of
        `annotations_file`) and save it there; `strip_punctuation`: strings tokenise to words
        only (`annotations.tokenize`), here and in `encode`."""
        self.vocab_threshold = vocab_threshold
        self.strip_punctuation = strip_punctuation
        self.vocab_file = vocab_file
        self.start_word, self.end_word, self.unk_word = start_word, end_word, unk_word
        self.pad_word = PAD_WORD
        self.annotations_file = annotations_file
        if vocab_from_file and vocab_file and os.path.exists(vocab_file):
            self._load(vocab_file)
            return
        if vocab_from_file:
            raise FileNotFoundError(
                f"{vocab_file}: vocabulary file not found "
                "(build it first with vocab_from_file=False)"
            )
        if captions is None:
            if annotations_file is None:
                raise ValueError("Vocabulary needs captions or annotations_file to build from")
            captions = [c for _, c in read_captions(annotations_file)]
        if not hasattr(captions, "counts"):
            captions = (
                tokenize(c, strip_punctuation) if isinstance(c, str) else c for c in captions
            )
        self.build(captions)
        if vocab_file:
            self.save(vocab_file)

    def build(self, tokenized_captions):
        """Keep words seen at least `vocab_threshold` times; ids ordered by count, then word."""
        if hasattr(tokenized_captions, "counts"):  # annotations.TokenizedCaptions counts at once
            counts = tokenized_captions.counts()
        else:
            counts = Counter()
            for tokens in tokenized_captions:
                counts.update(tokens)
        specials = [self.start_word, self.end_word, self.unk_word, self.pad_word]
        kept = sorted(
            (w for w, n in counts.items() if n >= self.vocab_threshold and w not in specials),
            key=lambda w: (-counts[w], w),
        )
        self.idx2word = dict(enumerate(specials + kept))
        self.word2idx = {w: i for i, w in self.idx2word.items()}

    def __call__(self, word):
        """Id of `word`; unknown words give the `<unk>` id."""
        return self.word2idx.get(word, self.word2idx[self.unk_word])

    def __len__(self):
        return len(self.word2idx)

    def __contains__(self, word):
        return word in self.word2idx

    @property
    def start_id(self):
        return self.word2idx[self.start_word]

    @property
    def end_id(self):
        return self.word2idx[self.end_word]

    @property
    def unk_id(self):
        return self.word2idx[self.unk_word]

    @property
    def pad_id(self):
        return self.word2idx[self.pad_word]

    def encode(self, caption):
        """Ids of a caption string (or token list) wrapped in `<start>` ... `<end>`."""
        tokens = tokenize(caption, self.strip_punctuation) if isinstance(caption, str) else caption
        get, unk = self.word2idx.get, self.unk_id
        return [self.start_id, *[get(t, unk) for t in tokens], self.end_id]

    def decode(self, ids):
        """Sentence from ids: stops at `<end>`, drops `<start>`, `<pad>` and `<unk>`."""
        words = []
        skip = {self.start_id, self.pad_id, self.unk_id}
        for i in ids:
            i = int(i)
            if i == self.end_id:
                break
            if i not in skip:
                words.append(self.idx2word[i])
        return " ".join(words)

    def to_dict(self):
        """JSON-ready form: settings and words in id order."""
        return {
            "format": "captioning-vocabulary/1",
            "vocab_threshold": self.vocab_threshold,
            "start_word": self.start_word,
            "end_word": self.end_word,
            "unk_word": self.unk_word,
            "pad_word": self.pad_word,
            "strip_punctuation": self.strip_punctuation,
            "words": [self.idx2word[i] for i in range(len(self.idx2word))],
        }

    def save(self, path):
        """Write the vocabulary as JSON (atomically: temp file, then rename)."""
        write_text(path, json.dumps(self.to_dict(), ensure_ascii=False))

    def _load(self, path):
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(
                f"{path}: not a JSON vocabulary file ({e}); vocabularies are never "
                "read from pickles, rebuild it with vocab_from_file=False"
            ) from None
        self._set_from_dict(data, source=path)

    def _set_from_dict(self, data, source="<dict>"):
        if not isinstance(data, dict) or not isinstance(data.get("words"), list):
            raise ValueError(f"{source}: vocabulary JSON must be an object with a 'words' list")
        self.vocab_threshold = data.get("vocab_threshold", self.vocab_threshold)
        # Vocabularies saved before the option tokenised with punctuation.
        self.strip_punctuation = bool(data.get("strip_punctuation", False))
        for key in ("start_word", "end_word", "unk_word", "pad_word"):
            setattr(self, key, data.get(key, getattr(self, key)))
        words = data["words"]
        if len(set(words)) != len(words):
            raise ValueError(f"{source}: vocabulary has repeated words")
        self.idx2word = dict(enumerate(words))
        self.word2idx = {w: i for i, w in self.idx2word.items()}
        missing = [
            w
            for w in (self.start_word, self.end_word, self.unk_word, self.pad_word)
            if w not in self.word2idx
        ]
        if missing:
            raise ValueError(f"{source}: vocabulary lacks special tokens {missing}")

    @classmethod
    def from_dict(cls, data):
        """Vocabulary from `to_dict()` output (as stored in checkpoints)."""
        vocab = cls.__new__(cls)
        vocab.vocab_file, vocab.annotations_file = None, None
        vocab.vocab_threshold = data.get("vocab_threshold")
        vocab.start_word, vocab.end_word, vocab.unk_word, vocab.pad_word = (
            "<start>",
            "<end>",
            "<unk>",
            PAD_WORD,
        )
        vocab._set_from_dict(data)
        return vocab

    @classmethod
    def load(cls, path):
        """Vocabulary from a JSON file."""
        vocab = cls.__new__(cls)
        vocab.vocab_file, vocab.annotations_file = str(path), None
        vocab.vocab_threshold = None
        vocab.start_word, vocab.end_word, vocab.unk_word, vocab.pad_word = (
            "<start>",
            "<end>",
            "<unk>",
            PAD_WORD,
        )
        vocab._load(path)
        return vocab
