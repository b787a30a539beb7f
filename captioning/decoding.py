"""Batched greedy, beam-search and sampled caption decoding for any decoder that speaks the
decoder protocol of `model` (`init_state`, `step`; CPU or GPU).

The decoder should be in eval mode (the caller's job: these functions never change the mode).
Sequences follow `DecoderRNN.sample`: every sequence begins with the given `<start>` id,
and ends with (and includes) `end_id`. Greedy and beam search can hold captions to
`DecodingOptions` (all off by default).
"""

import dataclasses
from typing import NamedTuple

import torch

# ruotianluo/self-critical.pytorch's `bad_endings` (its eval utils' `bad_count_rate`): articles,
# prepositions and auxiliaries no caption ends with; "and" added, which cannot end one either.
BAD_ENDINGS = frozenset(
    {"a", "an", "the", "in", "for", "at", "of", "with", "before", "after", "on", "upon", "near",
     "to", "is", "are", "am", "and"}
)  # fmt: skip
PAD_ID = 3  # `<pad>` in vocabulary.Vocabulary
# Beam search ranks by the raw summed log-probability by default, as im2txt does: length
# normalisation (1.0) preferred longer phrasings and cost CIDEr on the demo
# (docs/decoding.md, "Length penalty").
LENGTH_PENALTY = 0.0


@dataclasses.dataclass(frozen=True)
class DecodingOptions:
    """Rules greedy and beam search hold captions to; all off by default (the model's choice).

    no_bad_endings: no `<end>` right after a word of `BAD_ENDINGS` (their ids are
    `bad_ending_ids`, which `for_vocab` fills in); block_trigrams: no word that would complete a
    word trigram already in the caption (ruotianluo/self-critical.pytorch's `block_trigrams`);
    no_repeat_words: no word twice in a row. Sampling for self-critical training ignores them:
    its log-probabilities must be the model's own for the policy gradient.
    """

    no_bad_endings: bool = False
    block_trigrams: bool = False
    no_repeat_words: bool = False
    bad_ending_ids: tuple[int, ...] | None = None

    @property
    def any_on(self):
        """Whether any rule is on."""
        return self.no_bad_endings or self.block_trigrams or self.no_repeat_words

    @staticmethod
    def add_flags(parser):
        """The options' flags for a command line (argparse), as evaluate.py and caption.py take."""
        parser.add_argument(
            "--no-bad-endings", action="store_true",
            help="never end a caption on a word like a, the, with (decoding.BAD_ENDINGS)",
        )  # fmt: skip
        parser.add_argument(
            "--block-trigrams", action="store_true", help="never repeat a word trigram in a caption"
        )  # fmt: skip
        parser.add_argument(
            "--no-repeat-words", action="store_true", help="never the same word twice in a row"
        )

    @classmethod
    def from_flags(cls, args):
        """The options that `add_flags`' flags ask for."""
        return cls(args.no_bad_endings, args.block_trigrams, args.no_repeat_words)

    def for_vocab(self, vocab):
        """These options with the ids of the vocabulary's bad-ending words."""
        ids = tuple(sorted(vocab(word) for word in BAD_ENDINGS if word in vocab))
        return dataclasses.replace(self, bad_ending_ids=ids)


def forbidden_tokens(words, options, end_id, vocab_size):
    """Where `options` forbid the next token (rows, vocab) after `words` (rows, t), the tokens
    generated so far (`<start>` not included); None when nothing is forbidden."""
    if options is None or not options.any_on or words.size(1) == 0:
        return None
    forbidden = torch.zeros(words.size(0), vocab_size, dtype=torch.bool, device=words.device)
    last = words[:, -1:]  # (rows, 1)
    if options.no_repeat_words:
        forbidden.scatter_(1, last, True)
    if options.no_bad_endings:
        if options.bad_ending_ids is None:
            raise ValueError("no_bad_endings needs the words' ids: pass options.for_vocab(vocab)")
        bad = torch.tensor(options.bad_ending_ids, dtype=torch.long, device=words.device)
        forbidden[:, end_id] |= torch.isin(last.squeeze(1), bad)
    if options.block_trigrams and words.size(1) >= 3:
        # Trigram i is words i, i + 1, i + 2: where its first two are the caption's last two
        # words, its third would repeat it.
        seen = (words[:, :-2] == words[:, -2:-1]) & (words[:, 1:-1] == last)  # (rows, t - 2)
        hits = torch.zeros(forbidden.shape, device=words.device)
        forbidden |= hits.scatter_add_(1, words[:, 2:], seen.float()) > 0
    return forbidden


def start(decoder, features):
    """The decoder's first state and the `<start>` ids (batch,) that it reads first."""
    word = torch.full((features.size(0),), decoder.start_id, dtype=torch.long,
                      device=features.device)  # fmt: skip
    return decoder.init_state(features), word


@torch.no_grad()
def greedy_decode(decoder, features, max_len=20, pad_id=PAD_ID, with_attention=False,
                  options=None):  # fmt: skip
    """Greedy ids (batch, steps): each row as `decoder.sample` gives it, `pad_id` after `end_id`.

    `features` are image features (Show and Tell) or grids (attention). With_attention: also
    the attention weights of every generated word (batch, steps - 1, positions), zero after
    `end_id`. `options` (`DecodingOptions`): the rules captions keep to (None: none).
    """
    state, word = start(decoder, features)  # word: (batch,) `<start>`
    done = word == decoder.end_id
    columns, weights = [word], []
    while len(columns) < max_len and not bool(done.all()):
        # Finished rows keep stepping on `<pad>` so the batch stays whole; their output is masked.
        scores, state, alpha = decoder.step(word, state)  # (batch, vocab)
        if options is not None and options.any_on:
            words = torch.stack(columns, dim=1)[:, 1:]  # (batch, words so far)
            forbidden = forbidden_tokens(words, options, decoder.end_id, scores.size(1))
            if forbidden is not None:
                scores = scores.masked_fill(forbidden, float("-inf"))
        word = scores.argmax(dim=1).masked_fill(done, pad_id)  # (batch,)
        columns.append(word)
        if alpha is not None:
            weights.append(alpha.masked_fill(done.unsqueeze(1), 0.0))
        done = done | (word == decoder.end_id)
    ids = torch.stack(columns, dim=1)  # (batch, steps)
    if not with_attention:
        return ids
    return ids, _stack_weights(weights, features)


class Samples(NamedTuple):
    """Sampled captions, image-major: row i * samples + k is image i's k-th sample."""

    ids: torch.Tensor  # (rows, steps): `<start>` first, `pad_id` after `end_id`
    log_probs: torch.Tensor  # (rows, steps - 1): of each generated token, 0 after `end_id`
    mask: torch.Tensor  # (rows, steps - 1): True for generated tokens, `end_id` included


def sampling_log_probs(scores, temperature=1.0, pad_id=PAD_ID):
    """Log-probabilities (..., vocab) that `sample_decode` draws from: softmax(scores /
    temperature) without `pad_id`, which marks finished rows and is never a word."""
    scores = scores.float() / temperature
    scores[..., pad_id] = float("-inf")
    return scores.log_softmax(dim=-1)


@torch.no_grad()
def sample_decode(decoder, features, samples=1, temperature=1.0, max_len=20, pad_id=PAD_ID):
    """`samples` captions per image drawn from `sampling_log_probs`, as `Samples`.

    Sampling draws from torch's global generator (of the features' device), so a seeded run
    samples the same captions again.
    """
    state, word = start(decoder, features.repeat_interleave(samples, dim=0))  # (rows,) `<start>`
    done = word == decoder.end_id
    columns, log_probs = [word], []
    while len(columns) < max_len and not bool(done.all()):
        scores, state, _ = decoder.step(word, state)  # (rows, vocab)
        logp = sampling_log_probs(scores, temperature, pad_id)  # (rows, vocab)
        word = torch.multinomial(logp.exp(), 1).squeeze(1)  # (rows,)
        log_probs.append(logp.gather(1, word.unsqueeze(1)).squeeze(1).masked_fill(done, 0.0))
        word = word.masked_fill(done, pad_id)
        columns.append(word)
        done = done | (word == decoder.end_id)
    ids = torch.stack(columns, dim=1)  # (rows, steps)
    empty = torch.zeros(ids.size(0), 0, device=ids.device)
    log_probs = torch.stack(log_probs, dim=1) if log_probs else empty  # (rows, steps - 1)
    return Samples(ids, log_probs, ids[:, 1:] != pad_id)


def _stack_weights(weights, grid):
    """Per-step weights (batch, positions) stacked to (batch, steps, positions)."""
    if not weights:
        return grid.new_zeros(grid.size(0), 0, grid.size(1))
    return torch.stack(weights, dim=1)


@torch.no_grad()
def beam_search(decoder, features, beam_size=3, max_len=20, length_penalty=LENGTH_PENALTY,
                pad_id=PAD_ID, with_attention=False, options=None):  # fmt: skip
    """Best beam-search ids (batch, steps) per image, `pad_id` after `end_id`.

    Scores are summed log-probabilities; a hypothesis is ranked at the end by simple length
    normalisation, score / length ** length_penalty, with length counting every emitted token
    (`<start>` and `<end>` included); length_penalty=0 (the default) ranks by the raw sum.
    An image stops once `beam_size` hypotheses have finished (those that were among its
    `beam_size` best candidates when they emitted `end_id`); otherwise the unfinished beams at
    `max_len` compete too. beam_size=1 gives exactly `greedy_decode`. With_attention (attention
    decoders): also the attention weights of the returned hypothesis's words (batch, steps - 1,
    positions). `options` (`DecodingOptions`): the rules every beam keeps to (None: none); a
    forbidden token is never a candidate, and the others keep their log-probabilities.
    """
    batch, k = features.size(0), beam_size
    # At most k of the 2k best candidates end (one per beam), so k unfinished ones always remain.
    width = 2 * k
    vocab = decoder.vocab_size
    if width > vocab:
        raise ValueError(f"beam_size {k} too large for a vocabulary of {vocab} (needs 2k <= vocab)")
    state, word = start(decoder, features.repeat_interleave(k, dim=0))  # (batch * beam,) `<start>`
    cum = torch.zeros(batch, k, device=features.device)  # (batch, beam) summed log-probabilities
    cum[:, 1:] = float("-inf")  # beams start identical: expanding only beam 0 avoids duplicates
    tokens = torch.full((batch * k, max_len), pad_id, dtype=torch.long, device=features.device)
    tokens[:, 0] = word
    # Each beam's attention weights per generated word, kept in step with `tokens` (decoders
    # without attention: None).
    history = None
    finished = _Finished(batch, k, max_len, length_penalty, decoder.end_id, pad_id, features.device)
    for t in range(1, max_len):
        scores, state, alpha = decoder.step(word, state)  # (batch * beam, vocab)
        if alpha is not None:
            if history is None:
                history = alpha.new_zeros(batch * k, max_len - 1, alpha.size(1))
                finished.weights = history[:batch].clone()
            history[:, t - 1] = alpha  # (batch * beam, positions) of the current beams
        forbidden = forbidden_tokens(tokens[:, 1:t], options, decoder.end_id, vocab)
        cand = _best_extensions(scores, cum, width, forbidden)
        is_end = cand.token == decoder.end_id  # (batch, width)
        if finished.record(cand, is_end, tokens, t, history):
            break
        rows, word, cum = _survivors(cand, is_end, k)
        tokens = tokens[rows]
        tokens[:, t] = word
        history = history[rows] if history is not None else None
        state = tuple(s.index_select(0, rows) for s in state)  # every state is batch first
    else:
        finished.prefer_live(cum, tokens, history)

    # Drop the columns that are padding in every row, as greedy_decode never makes them.
    steps = int(_lengths(finished.seq, decoder.end_id).max())
    ids = finished.seq[:, :steps]  # (batch, steps)
    if not with_attention:
        return ids
    if finished.weights is None:  # max_len 1: no word, so no weights
        return ids, features.new_zeros(batch, 0, features.size(1))
    return ids, finished.weights[:, : steps - 1]  # (batch, steps - 1, positions)


class _Candidates(NamedTuple):
    """Each image's `width` best one-token extensions of its beams, best first."""

    score: torch.Tensor  # (batch, width) summed log-probabilities
    token: torch.Tensor  # (batch, width) the added token
    parent: torch.Tensor  # (batch, width) the extended beam's row of batch * beam


def _best_extensions(scores, cum, width, forbidden=None):
    """The `width` best extensions per image, from step scores (batch * beam, vocab), none of
    them a `forbidden` token (batch * beam, vocab)."""
    batch, k = cum.shape
    logp = scores.float().log_softmax(dim=1)  # (batch * beam, vocab)
    if forbidden is not None:
        # The log-probabilities too: with fewer than `width` tokens allowed, topk takes others.
        scores = scores.masked_fill(forbidden, float("-inf"))
        logp = logp.masked_fill(forbidden, float("-inf"))
    # Choosing on the raw logits first (log_softmax is monotone) keeps beam 1 == argmax.
    top_ids = scores.topk(width, dim=1).indices  # (batch * beam, width)
    logp = logp.gather(1, top_ids)  # (batch * beam, width)
    cand = (cum.view(-1, 1) + logp).view(batch, k * width)  # (batch, beam * width)
    # A stable sort keeps the logit order on rounding ties, again for beam 1 == greedy.
    score, order = cand.sort(dim=1, descending=True, stable=True)
    score, order = score[:, :width], order[:, :width]  # (batch, width)
    token = top_ids.view(batch, k * width).gather(1, order)  # (batch, width)
    first_rows = torch.arange(batch, device=cum.device).unsqueeze(1) * k  # (batch, 1)
    return _Candidates(score, token, first_rows + order // width)


def _survivors(cand, is_end, k):
    """The k best candidates that did not end: rows to follow (batch * beam,), tokens, scores."""
    width = is_end.size(1)
    rank = torch.arange(width, device=is_end.device)  # (width,)
    # Ends sort behind every other candidate, so the k smallest keys are the best k going on.
    keep = (is_end.long() * width + rank).topk(k, dim=1, largest=False).indices  # (batch, beam)
    rows = cand.parent.gather(1, keep).view(-1)  # (batch * beam,)
    word = cand.token.gather(1, keep).view(-1)  # (batch * beam,)
    return rows, word, cand.score.gather(1, keep)  # cum: (batch, beam)


class _Finished:
    """Per image: the best finished hypothesis so far, and whether the search is done."""

    def __init__(self, batch, beam_size, max_len, length_penalty, end_id, pad_id, device):
        self.beam_size, self.length_penalty, self.end_id = beam_size, length_penalty, end_id
        self.seq = torch.full((batch, max_len), pad_id, dtype=torch.long, device=device)
        # Attention weights of the best hypothesis (batch, max_len - 1, positions), if any.
        self.weights = None
        self.score = torch.full((batch,), float("-inf"), device=device)  # length-normalised
        self.count = torch.zeros(batch, dtype=torch.long, device=device)
        self.done = torch.zeros(batch, dtype=torch.bool, device=device)

    def record(self, cand, is_end, tokens, t, history=None):
        """Count the hypotheses ending at step t, keep the best; True once every image is done."""
        rank = torch.arange(is_end.size(1), device=is_end.device)  # (width,)
        ended = is_end & (rank < self.beam_size) & ~self.done.unsqueeze(1)  # (batch, width)
        if not bool(ended.any()):
            return False
        # Such a hypothesis holds tokens 0 to t: `<start>` to `<end>`.
        norm = (cand.score / (t + 1) ** self.length_penalty).masked_fill(~ended, float("-inf"))
        step_best, pos = norm.max(dim=1)  # (batch,)
        src = cand.parent.gather(1, pos.unsqueeze(1)).squeeze(1)  # (batch,)
        seq = tokens[src]  # (batch, max_len), a copy
        seq[:, t] = self.end_id
        better = step_best > self.score  # (batch,)
        self.seq = torch.where(better.unsqueeze(1), seq, self.seq)
        if history is not None:
            self.weights = torch.where(better.view(-1, 1, 1), history[src], self.weights)
        self.score = torch.where(better, step_best, self.score)
        self.count += ended.sum(dim=1)
        self.done = self.count >= self.beam_size
        return bool(self.done.all())

    def prefer_live(self, cum, tokens, history=None):
        """At max_len: an image still searching takes its best live beam where that ranks higher."""
        batch, k = cum.shape
        norm = cum / tokens.size(1) ** self.length_penalty  # (batch, beam)
        live_best, pos = norm.max(dim=1)  # (batch,)
        better = (live_best > self.score) & ~self.done  # (batch,)
        live = torch.arange(batch, device=cum.device) * k + pos  # (batch,) rows of batch * beam
        self.seq = torch.where(better.unsqueeze(1), tokens[live], self.seq)
        if history is not None:
            self.weights = torch.where(better.view(-1, 1, 1), history[live], self.weights)


def _lengths(ids, end_id):
    """Tokens per row up to and including the first `end_id` (the row width when absent)."""
    is_end = ids == end_id  # (batch, steps)
    first = is_end.long().argmax(dim=1)  # (batch,)
    return torch.where(is_end.any(dim=1), first + 1, torch.full_like(first, ids.size(1)))


@torch.no_grad()
def decode_captions(
    decoder, features, vocab, beam_size=1, max_len=20, length_penalty=LENGTH_PENALTY, options=None
) -> tuple[list[list[int]], list[str]]:
    """Per-image id lists (through `end_id`, no padding) and their sentences via `vocab.decode`;
    `options` (`DecodingOptions`, None: none) are the rules the captions keep to."""
    options = options and options.for_vocab(vocab)
    if beam_size == 1:
        ids = greedy_decode(
            decoder, features, max_len=max_len, pad_id=vocab.pad_id, options=options
        )
    else:
        ids = beam_search(
            decoder,
            features,
            beam_size=beam_size,
            max_len=max_len,
            length_penalty=length_penalty,
            pad_id=vocab.pad_id,
            options=options,
        )
    lengths = _lengths(ids, decoder.end_id).tolist()
    id_lists = [row[:n] for row, n in zip(ids.tolist(), lengths)]
    return id_lists, [vocab.decode(row) for row in id_lists]
