"""CIDEr-D in-process and vectorised: pycocoevalcap's `Cider` (which is CIDEr-D) without Java or
Python loops over n-grams, with document frequencies fixed once (a training reward) or taken
from the scored references (the metric).

Sentences are token lists. N-grams (n = 1 to 4) become exact integer keys: word ids are 1 to
BASE - 1 and a key is the ids as digits in base BASE, so an n-gram's key lies in
[BASE ** (n - 1), BASE ** n) and its order can be read off the key.
"""

import hashlib
from pathlib import Path

import numpy as np

from captioning.atomic_file import atomic_path

MAX_N = 4
SIGMA = 6.0
# The largest base whose 4-digit keys fit in int64.
BASE = int((2**63 - 1) ** 0.25)
while BASE**MAX_N > 2**63 - 1:
    BASE -= 1
# The end of a caption as a word of the self-critical reward (Rennie et al. 2017, appendix):
# upper case, which the PTB tokenisation never produces (it lower-cases everything and spells
# brackets "-lrb-"), so no word of a real caption can stand for it; "<end>" could (PTB keeps
# a tag whole).
END_TOKEN = "<END>"
# 2: the references end with END_TOKEN (frequencies cached by version 1 have no end).
CACHE_VERSION = "cider-d/2"


class WordIndex:
    """Word -> id (1, 2, ...) shared by every sentence scored together, grown on demand."""

    def __init__(self, words=()):
        self.ids = {}
        for word in words:
            self.add(word)

    def add(self, word):
        """The id of `word`, new if unseen."""
        index = self.ids.setdefault(word, len(self.ids) + 1)
        if index >= BASE:
            raise ValueError(
                f"CIDEr-D: more than {BASE - 1} distinct words; n-gram keys would not fit in 64 bits"
            )
        return index

    def encode(self, sentences):
        """Flat ids (tokens,) and offsets (sentences + 1,) of token lists."""
        tokens, offsets = [], [0]
        for sentence in sentences:
            tokens.extend(sentence)
            offsets.append(len(tokens))
        for word in set(tokens).difference(self.ids):
            self.add(word)
        ids = list(map(self.ids.__getitem__, tokens))
        return np.asarray(ids, np.int64), np.asarray(offsets, np.int64)

    def words(self):
        """The words in id order (id 1 first)."""
        return list(self.ids)


def ngrams(ids, offsets):
    """Every n-gram occurrence (n <= 4) of the sentences: (sentence, key) arrays."""
    ids = np.asarray(ids, np.int64)
    lengths = np.diff(offsets)  # (sentences,)
    sentence = np.repeat(np.arange(len(lengths)), lengths)  # (tokens,)
    # Tokens left in the sentence from each token on, itself included.
    left = offsets[1:][sentence] - np.arange(len(ids))  # (tokens,)
    key = np.zeros(len(ids), np.int64)
    keys, owners = [], []
    for n in range(1, MAX_N + 1):
        # key[i] becomes the n-gram starting at token i (meaningful where left[i] >= n).
        key[: len(ids) - n + 1] = key[: len(ids) - n + 1] * BASE + ids[n - 1 :]
        starts = left >= n
        keys.append(key[starts])
        owners.append(sentence[starts])
    return np.concatenate(owners), np.concatenate(keys)


def count_pairs(first, second, size):
    """Distinct (first, second) pairs, second < size, sorted, and how often each occurs."""
    pairs, counts = np.unique(first * size + second, return_counts=True)
    return pairs // size, pairs % size, counts


def ngram_order(keys):
    """n of each n-gram key (1 to 4)."""
    return 1 + sum((keys >= BASE**k).astype(np.int64) for k in range(1, MAX_N))


def document_frequencies(ref_ids, ref_offsets, ref_image):
    """Per distinct n-gram key of the references, the number of images with it in any of their
    references: (sorted keys, counts)."""
    sentence, keys = ngrams(ref_ids, ref_offsets)
    distinct, dense = np.unique(keys, return_inverse=True)
    _, present, _ = count_pairs(np.asarray(ref_image, np.int64)[sentence], dense, len(distinct))
    return distinct, np.bincount(present, minlength=len(distinct))


class CiderD:
    """CIDEr-D with document frequencies fixed at construction (or taken from each call's
    references), scoring many hypotheses per image at once."""

    def __init__(self, words=None, df_keys=None, df_counts=None, documents=None, sigma=SIGMA):
        self.words = words if words is not None else WordIndex()
        self.df_keys, self.df_counts, self.documents = df_keys, df_counts, documents
        self.sigma = sigma

    @classmethod
    def from_references(cls, references, sigma=SIGMA):
        """A scorer whose document frequencies are those of `references` (per image, token lists)."""
        words = WordIndex()
        ids, offsets = words.encode(r for refs in references for r in refs)
        image = np.repeat(np.arange(len(references)), [len(r) for r in references])
        keys, counts = document_frequencies(ids, offsets, image)
        return cls(words, keys, counts, len(references), sigma)

    def score(self, hypotheses, references, image_of=None):
        """Per-hypothesis CIDEr-D (hypotheses,) of token lists against `references` (per image,
        token lists); hypothesis k describes image `image_of[k]` (default k)."""
        hyp_ids, hyp_offsets = self.words.encode(hypotheses)
        ref_ids, ref_offsets = self.words.encode(r for refs in references for r in refs)
        ref_image = np.repeat(np.arange(len(references)), [len(r) for r in references])
        image_of = np.arange(len(hypotheses)) if image_of is None else np.asarray(image_of)
        return self.score_ids(hyp_ids, hyp_offsets, image_of, ref_ids, ref_offsets, ref_image)

    def score_ids(self, hyp_ids, hyp_offsets, hyp_image, ref_ids, ref_offsets, ref_image):
        """`score` on sentences already encoded by `self.words` (flat ids and offsets each);
        `ref_image` numbers the images 0 to images - 1, `hyp_image` refers to those numbers."""
        hyp_image = np.asarray(hyp_image, np.int64)
        ref_image = np.asarray(ref_image, np.int64)
        images = int(ref_image.max()) + 1 if len(ref_image) else 0
        n_hyps, n_refs = len(hyp_offsets) - 1, len(ref_offsets) - 1
        # One numbering of the n-grams in this call (dense ids) serves counting and joining.
        sentence_h, key_h = ngrams(hyp_ids, hyp_offsets)
        sentence_r, key_r = ngrams(ref_ids, ref_offsets)
        distinct, dense = np.unique(np.concatenate([key_h, key_r]), return_inverse=True)
        size = len(distinct)
        sentence_h, gram_h, tf_h = count_pairs(sentence_h, dense[: len(key_h)], size)
        sentence_r, gram_r, tf_r = count_pairs(sentence_r, dense[len(key_h) :], size)
        if self.df_keys is None:  # pycocoevalcap: frequencies over the images being scored
            _, present, _ = count_pairs(ref_image[sentence_r], gram_r, size)
            df, documents = np.bincount(present, minlength=size), images
        else:
            df, documents = _lookup(self.df_keys, self.df_counts, distinct), self.documents
        idf = np.log(float(documents)) - np.log(np.maximum(1.0, df.astype(np.float64)))  # (size,)
        order = ngram_order(distinct)  # (size,)
        vec_h, vec_r = tf_h * idf[gram_h], tf_r * idf[gram_r]
        hyp_norm, hyp_len = _norms(sentence_h, order[gram_h], tf_h, vec_h, n_hyps)
        ref_norm, ref_len = _norms(sentence_r, order[gram_r], tf_r, vec_r, n_refs)

        # Each reference's slot among its image's references, to lay pairs out as (hyp, slot).
        refs_per_image = np.bincount(ref_image, minlength=images)  # (images,)
        first_ref = np.concatenate(([0], np.cumsum(refs_per_image)))  # refs sorted by image
        by_image = np.argsort(ref_image, kind="stable")
        slot = np.empty(len(ref_image), np.int64)
        slot[by_image] = np.arange(len(ref_image)) - first_ref[ref_image[by_image]]
        slots = int(refs_per_image.max()) if images else 0

        # Join hypothesis and reference n-grams of the same image on the n-gram.
        join_h = hyp_image[sentence_h] * size + gram_h
        join_r = ref_image[sentence_r] * size + gram_r
        by_join = np.argsort(join_r, kind="stable")
        sorted_r = join_r[by_join]
        lo = np.searchsorted(sorted_r, join_h, "left")
        matches = np.searchsorted(sorted_r, join_h, "right") - lo  # (hyp n-grams,)
        h = np.repeat(np.arange(len(join_h)), matches)  # (matched pairs,)
        r = by_join[concatenated_ranges(lo, matches)]
        clipped = np.minimum(vec_h[h], vec_r[r]) * vec_r[r]
        # pair = (hypothesis, reference slot, n - 1)
        pair = (sentence_h[h] * slots + slot[sentence_r[r]]) * MAX_N + order[gram_h[h]] - 1
        dot = np.bincount(pair, clipped, minlength=n_hyps * slots * MAX_N)
        dot = dot.reshape(n_hyps, slots, MAX_N)  # (hyps, slots, 4)

        # The reference in each (hypothesis, slot), -1 where the image has fewer references.
        ref_at = np.full((images, max(slots, 1)), -1, np.int64)
        ref_at[ref_image, slot] = np.arange(len(ref_image))
        ref_at = ref_at[hyp_image][:, :slots]  # (hyps, slots)
        present = ref_at >= 0
        norm_r = np.where(present[..., None], ref_norm[ref_at], 0.0)  # (hyps, slots, 4)
        denominator = hyp_norm[:, None, :] * norm_r
        val = np.where(denominator != 0, dot / np.where(denominator != 0, denominator, 1), dot)
        delta = hyp_len[:, None] - np.where(present, ref_len[ref_at], 0)  # (hyps, slots)
        val = val * np.e ** (-(delta.astype(np.float64) ** 2) / (2 * self.sigma**2))[..., None]
        val = np.where(present[..., None], val, 0.0)
        per_n = val.sum(axis=1)  # (hyps, 4)
        return per_n.mean(axis=1) / refs_per_image[hyp_image] * 10.0


def _lookup(df_keys, df_counts, keys):
    """Document frequency of each key in a sorted table (0 where absent)."""
    if len(df_keys) == 0:
        return np.zeros(len(keys), np.int64)
    pos = np.minimum(np.searchsorted(df_keys, keys), len(df_keys) - 1)
    return np.where(df_keys[pos] == keys, df_counts[pos], 0)


def _norms(sentence, order, counts, vec, sentences):
    """Per sentence, the norm of each order's tf-idf vector (sentences, 4), and its length,
    which pycocoevalcap counts in bigrams."""
    norm = np.bincount(sentence * MAX_N + order - 1, vec**2, minlength=sentences * MAX_N)
    bigrams = order == 2
    length = np.bincount(sentence[bigrams], counts[bigrams], minlength=sentences)
    return np.sqrt(norm.reshape(sentences, MAX_N)), length


def corpus_cider_d(hypotheses, references):
    """(corpus CIDEr-D, per-image scores) for one hypothesis per image, as pycocoevalcap's
    `Cider().compute_score` gives them for the same tokenised captions."""
    scores = CiderD().score(hypotheses, references)
    return float(np.mean(scores)), scores


def ptb_tokens(words):
    """Each word's tokens as the COCO scorer's tokenisation gives them (punctuation dropped)."""
    from captioning.evaluation.coco_metrics import _tokenize_like_ptb

    return [_tokenize_like_ptb(word).split() for word in words]


class TokenMap:
    """Replaces each token id `i` of flat sentences with the id list `table[i]` (maybe empty)."""

    def __init__(self, table):
        self.counts = np.array([len(t) for t in table], np.int64)  # (table,)
        self.flat = np.array([i for t in table for i in t], np.int64)
        self.start = np.cumsum(self.counts) - self.counts

    def __call__(self, ids, offsets):
        """(new flat ids, new offsets) of sentences given as flat ids and offsets."""
        per_token = self.counts[ids]  # (tokens,)
        new_offsets = np.concatenate(([0], np.cumsum(per_token)))[offsets]
        return self.flat[concatenated_ranges(self.start[ids], per_token)], new_offsets


def select_sentences(ids, offsets, which):
    """Sentences `which` (in that order) of flat sentences: (flat ids, offsets)."""
    lengths = offsets[1:][which] - offsets[:-1][which]  # (selected,)
    selected = ids[concatenated_ranges(offsets[:-1][which], lengths)]
    return selected, np.concatenate(([0], np.cumsum(lengths)))


def append_token(ids, offsets, token):
    """Flat sentences with `token` added at the end of each: (flat ids, offsets)."""
    return np.insert(ids, offsets[1:], token), offsets + np.arange(len(offsets))


def concatenated_ranges(starts, lengths):
    """starts[0] to starts[0] + lengths[0] - 1, then the same for starts[1], ..., as one array."""
    lengths = np.asarray(lengths, np.int64)
    ends = np.cumsum(lengths)
    return np.repeat(np.asarray(starts, np.int64) - (ends - lengths), lengths) + np.arange(
        int(ends[-1]) if len(ends) else 0
    )


def training_scorer(split, cache_dir=None):
    """A `CiderD` whose document frequencies are those of `split`'s references, and those
    references encoded for it: (scorer, ref ids, ref offsets), captions in `split` order, each
    ending with `END_TOKEN`.

    The frequencies are computed once per set of captions and cached as plain arrays (.npz,
    no pickle) beside the token cache; edited captions get a new file, and so does a new
    `CACHE_VERSION` (the file's name hashes it).
    """
    from captioning.data.annotations import _cache_key, default_cache_dir

    tokens = split.tokenized(cache_dir)
    key = hashlib.sha1(f"{CACHE_VERSION}|{_cache_key(split)}".encode()).hexdigest()[:20]
    path = Path(cache_dir or default_cache_dir()) / "cider-d" / f"{key}.npz"
    words = WordIndex()
    table = [[words.add(t) for t in tokens_of] for tokens_of in ptb_tokens(tokens.words)]
    ref_ids, ref_offsets = append_token(
        *TokenMap(table)(tokens.ids, tokens.offsets), words.add(END_TOKEN)
    )
    images = len(np.unique(split.caption_image))  # images with references
    if path.exists():
        with np.load(path, allow_pickle=False) as z:
            if bytes(z["words"]).decode("utf-8") == "\n".join(words.words()):
                return CiderD(words, z["df_keys"], z["df_counts"], int(z["documents"])), (
                    ref_ids, ref_offsets)  # fmt: skip
    df_keys, df_counts = document_frequencies(ref_ids, ref_offsets, split.caption_image)
    with atomic_path(path) as tmp:
        text = np.frombuffer("\n".join(words.words()).encode("utf-8"), np.uint8)
        np.savez(tmp, words=text, df_keys=df_keys, df_counts=df_counts, documents=images)
    return CiderD(words, df_keys, df_counts, images), (ref_ids, ref_offsets)
