"""Batched greedy, beam-search, diverse beam-search and sampled caption decoding for any decoder
that speaks the decoder protocol of `model` (`init_state`, `step`; CPU or GPU).

The decoder should be in eval mode (the caller's job: these functions never change the mode).
Sequences follow `DecoderRNN.sample`: every sequence begins with the given `<start>` id,
and ends with (and includes) `end_id`. `decode_captions` (and `decode_ids` below it) is the
one entry point for captions a person reads: `DecodingOptions` choose the decoder and the rules
captions keep to, and `<unk>` is suppressed unless they allow it.
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
# Diverse beam search's penalty per earlier group that chose a token: ruotianluo's default.
DIVERSITY = 0.5


def is_punctuation(token):
    """Whether a token is punctuation (no letter or digit): ".", ",", "!", "--"."""
    return not any(character.isalnum() for character in token)


@dataclasses.dataclass(frozen=True)
class DecodingOptions:
    """How captions are chosen, beyond beam size, length and length penalty; the defaults give
    the model's most likely caption (greedy or beam search) without `<unk>`.

    Rules every decoder keeps to (off by default): no_bad_endings: no `<end>` and no
    punctuation right after a word of `BAD_ENDINGS` ("a man in a ."); block_trigrams: no word
    that would complete a word trigram already in the caption (ruotianluo/self-critical.pytorch's
    `block_trigrams`); no_repeat_words: no word twice in a row. allow_unk: let captions hold
    `<unk>`, which is otherwise never chosen. `for_vocab` fills in the ids these need
    (`bad_ending_ids`, `punctuation_ids`, `unk_id`); without `unk_id`, nothing is suppressed.

    samples: draw this many captions per image instead of searching (0: search), from
    softmax(scores / temperature), cut to the top_k most likely tokens and to the top_p nucleus
    (None: no cut). groups: diverse beam search (Vijayakumar et al.): the beam split into this
    many groups, each returning its best caption, a group's log-probabilities less `diversity`
    for each earlier group that chose the same token at the same step. Sampling for
    self-critical training ignores all of these: its log-probabilities must be the model's own.
    """

    no_bad_endings: bool = False
    block_trigrams: bool = False
    no_repeat_words: bool = False
    bad_ending_ids: tuple[int, ...] | None = None
    allow_unk: bool = False
    samples: int = 0
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    groups: int = 1
    diversity: float = DIVERSITY
    punctuation_ids: tuple[int, ...] | None = None
    unk_id: int | None = None

    def __post_init__(self):
        """Refuse settings no decoder can follow, naming the field and its flag."""
        sampling = (self.temperature, self.top_k, self.top_p)
        wrong = (
            (self.samples < 0, f"samples (--sample) must be 0 or more, not {self.samples}"),
            (self.temperature <= 0, f"temperature must be above 0, not {self.temperature}"),
            (self.top_k is not None and self.top_k < 1,
             f"top_k must be 1 or more, not {self.top_k}"),
            (self.top_p is not None and not 0 < self.top_p <= 1,
             f"top_p must be above 0 and at most 1, not {self.top_p}"),
            (self.groups < 1, f"groups (--groups) must be 1 or more, not {self.groups}"),
            (self.diversity < 0, f"diversity must be 0 or more, not {self.diversity}"),
            (self.samples and self.groups > 1,
             f"samples={self.samples} and groups={self.groups}: sample or search, not both"),
            (not self.samples and sampling != (1.0, None, None),
             "temperature, top_k and top_p (--temperature, --top-k, --top-p) shape sampling: "
             "set samples (--sample N) too"),
        )  # fmt: skip
        for is_wrong, message in wrong:
            if is_wrong:
                raise ValueError(message)

    @property
    def suppresses_unk(self):
        """Whether `<unk>` is forbidden: not allowed, and its id known."""
        return not self.allow_unk and self.unk_id is not None

    @property
    def any_on(self):
        """Whether any rule is on, `<unk>` suppression included."""
        rules = (self.no_bad_endings, self.block_trigrams, self.no_repeat_words)
        return any(rules) or self.suppresses_unk

    @property
    def captions_per_image(self):
        """How many captions these options decode per image: the samples, or one per group."""
        return max(self.samples, self.groups)

    @property
    def listed(self):
        """Whether each image's captions come as a list (sampling, diverse beam search), even
        of one, rather than as one caption (greedy and beam search)."""
        return self.samples > 0 or self.groups > 1

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
        parser.add_argument(
            "--allow-unk", action="store_true",
            help="let captions hold <unk> (by default it is never chosen)",
        )  # fmt: skip
        parser.add_argument(
            "--sample", type=int, default=0, metavar="N",
            help="draw N captions per image from the model instead of searching",
        )  # fmt: skip
        parser.add_argument(
            "--temperature", type=float, default=1.0, metavar="T",
            help="with --sample: draw from softmax(scores / T) (below 1: closer to greedy)",
        )  # fmt: skip
        parser.add_argument(
            "--top-k", type=int, metavar="K", help="with --sample: only the K most likely words"
        )
        parser.add_argument(
            "--top-p", type=float, metavar="P",
            help="with --sample: only the most likely words that together hold probability P",
        )  # fmt: skip
        parser.add_argument(
            "--groups", type=int, default=1, metavar="G",
            help="diverse beam search: split --beam K into G groups, one caption each",
        )  # fmt: skip
        parser.add_argument(
            "--diversity", type=float, metavar="L",
            help="with --groups: a group's penalty on each word an earlier group chose at the "
            f"same step (default {DIVERSITY})",
        )  # fmt: skip

    @classmethod
    def from_flags(cls, args):
        """The options that `add_flags`' flags ask for."""
        if args.diversity is not None and args.groups == 1:
            raise ValueError("--diversity L goes with --groups G (G above 1)")
        return cls(
            args.no_bad_endings, args.block_trigrams, args.no_repeat_words,
            allow_unk=args.allow_unk, samples=args.sample, temperature=args.temperature,
            top_k=args.top_k, top_p=args.top_p, groups=args.groups,
            diversity=DIVERSITY if args.diversity is None else args.diversity,
        )  # fmt: skip

    def for_vocab(self, vocab):
        """These options with the ids they need from the vocabulary: its bad-ending words, its
        punctuation and `<unk>`."""
        return dataclasses.replace(
            self,
            bad_ending_ids=tuple(sorted(vocab(word) for word in BAD_ENDINGS if word in vocab)),
            punctuation_ids=tuple(
                sorted(i for word, i in vocab.word2idx.items() if is_punctuation(word))
            ),
            unk_id=vocab.unk_id,
        )


def vocab_options(options, vocab):
    """`options` (None: the defaults, which suppress `<unk>`) with the ids `vocab` gives them."""
    return (options or DecodingOptions()).for_vocab(vocab)


def forbidden_tokens(words, options, end_id, vocab_size):
    """Where `options` forbid the next token (rows, vocab) after `words` (rows, t), the tokens
    generated so far (`<start>` not included); None when nothing is forbidden."""
    if options is None or not options.any_on:
        return None
    forbidden = torch.zeros(words.size(0), vocab_size, dtype=torch.bool, device=words.device)
    if options.suppresses_unk:
        forbidden[:, options.unk_id] = True
    if words.size(1) == 0:
        return forbidden
    last = words[:, -1:]  # (rows, 1)
    if options.no_repeat_words:
        forbidden.scatter_(1, last, True)
    if options.no_bad_endings:
        if options.bad_ending_ids is None:
            raise ValueError("no_bad_endings needs the words' ids: pass options.for_vocab(vocab)")
        bad = torch.tensor(options.bad_ending_ids, dtype=torch.long, device=words.device)
        # Punctuation too: "a man in a ." ends on "a" as surely as "a man in a" does.
        ends = torch.tensor([end_id, *(options.punctuation_ids or ())], device=words.device)
        after_bad = torch.isin(last, bad)  # (rows, 1)
        forbidden[:, ends] = forbidden[:, ends] | after_bad
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
    `end_id`. `options` (`DecodingOptions`): the rules captions keep to, `<unk>` among them
    when the options hold its id (None: none).
    """
    state, word = start(decoder, features)  # word: (batch,) `<start>`
    done = word == decoder.end_id
    columns, weights = [word], []
    while len(columns) < max_len and not bool(done.all()):
        # Finished rows keep stepping on `<pad>` so the batch stays whole; their output is masked.
        scores, state, alpha = decoder.step(word, state)  # (batch, vocab)
        forbidden = _forbidden_after(columns, options, decoder.end_id, scores.size(1))
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


def _forbidden_after(columns, options, end_id, vocab_size):
    """`forbidden_tokens` after the ids decoded so far, columns (rows,) from `<start>` on."""
    if options is None or not options.any_on:  # no stacking when no rule is on
        return None
    words = torch.stack(columns, dim=1)[:, 1:]  # (rows, words so far)
    return forbidden_tokens(words, options, end_id, vocab_size)


class Samples(NamedTuple):
    """Sampled captions, image-major: row i * samples + k is image i's k-th sample."""

    ids: torch.Tensor  # (rows, steps): `<start>` first, `pad_id` after `end_id`
    log_probs: torch.Tensor  # (rows, steps - 1): of each generated token, 0 after `end_id`
    mask: torch.Tensor  # (rows, steps - 1): True for generated tokens, `end_id` included


def sampling_log_probs(scores, temperature=1.0, pad_id=PAD_ID, *, top_k=None, top_p=None,
                       forbidden=None):  # fmt: skip
    """Log-probabilities (..., vocab) that `sample_decode` draws from: softmax(scores /
    temperature) without `pad_id`, which marks finished rows and is never a word, nor the
    `forbidden` tokens (a mask like `scores`); then only the top_k most likely tokens, and
    only the nucleus of top_p: the fewest most likely tokens whose probabilities reach it."""
    scores = scores.float() / temperature
    scores[..., pad_id] = float("-inf")
    if forbidden is not None:
        scores = scores.masked_fill(forbidden, float("-inf"))
    if top_k is not None:
        top = scores.topk(min(top_k, scores.size(-1)), dim=-1).indices  # (..., k)
        kept = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top, True)
        scores = scores.masked_fill(~kept, float("-inf"))
    if top_p is not None and top_p < 1:  # 1: every token, whatever the rounding of the sums
        probs, order = scores.softmax(dim=-1).sort(dim=-1, descending=True)  # (..., vocab)
        # A token is in the nucleus while the more likely tokens hold less than top_p.
        outside = probs.cumsum(dim=-1) - probs >= top_p  # (..., vocab), in `order`
        scores = scores.masked_fill(outside.scatter(-1, order, outside), float("-inf"))
    return scores.log_softmax(dim=-1)


@torch.no_grad()
def sample_decode(decoder, features, samples=1, temperature=1.0, max_len=20, pad_id=PAD_ID, *,
                  top_k=None, top_p=None, options=None):  # fmt: skip
    """`samples` captions per image drawn from `sampling_log_probs`, as `Samples`.

    Sampling draws from torch's global generator (of the features' device), so a seeded run
    samples the same captions again. top_k, top_p and `options` (`DecodingOptions`' rules and
    `<unk>`) narrow the distribution for captions a person reads; self-critical training leaves
    them unset, to sample the model's own.
    """
    state, word = start(decoder, features.repeat_interleave(samples, dim=0))  # (rows,) `<start>`
    done = word == decoder.end_id
    columns, log_probs = [word], []
    while len(columns) < max_len and not bool(done.all()):
        scores, state, _ = decoder.step(word, state)  # (rows, vocab)
        forbidden = _forbidden_after(columns, options, decoder.end_id, scores.size(1))
        logp = sampling_log_probs(
            scores, temperature, pad_id, top_k=top_k, top_p=top_p, forbidden=forbidden
        )  # (rows, vocab)
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
    positions). `options` (`DecodingOptions`): the rules every beam keeps to, `<unk>` among
    them when the options hold its id (None: none); a forbidden token is never a candidate, and
    the others keep their log-probabilities.

    Diverse beam search (options.groups = G > 1): the beam splits into G groups of
    beam_size / G beams, each searching as above for one image of its own, group by group at
    each step; a group ranks its candidates by log-probabilities less options.diversity for
    each earlier group whose beam_size / G best candidates chose the same token at this step,
    and returns its best caption by the model's own log-probabilities: ids (batch * G, steps),
    row i * G + g group g's for image i. Group 0 is plain beam search with beam_size / G beams.
    """
    groups = options.groups if options is not None else 1
    if beam_size % groups:
        raise ValueError(f"beam_size {beam_size} does not split into {groups} groups")
    # Each group searches as an image of its own: `batch` counts images * groups.
    batch, k = features.size(0) * groups, beam_size // groups
    # At most k of the 2k best candidates end (one per beam), so k unfinished ones always remain.
    width = 2 * k
    vocab = decoder.vocab_size
    if width > vocab:
        raise ValueError(
            f"beam_size {beam_size} too large for a vocabulary of {vocab} "
            f"(needs 2 * beam_size / groups <= vocab)"
        )
    state, word = start(decoder, features.repeat_interleave(groups * k, dim=0))  # (batch * beam,)
    cum = torch.zeros(batch, k, device=features.device)  # (batch, beam) summed log-probabilities
    cum[:, 1:] = float("-inf")  # beams start identical: expanding only beam 0 avoids duplicates
    # The same sums without the diversity penalties, which rank the finished captions.
    model_cum = cum.clone()  # (batch, beam)
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
        if groups == 1:
            cand = _best_extensions(scores, cum, width, forbidden)
        else:
            cand = _diverse_extensions(scores, cum, model_cum, width, forbidden, options)
        is_end = cand.token == decoder.end_id  # (batch, width)
        if finished.record(cand, is_end, tokens, t, history):
            break
        rows, word, cum, model_cum = _survivors(cand, is_end, k)
        tokens = tokens[rows]
        tokens[:, t] = word
        history = history[rows] if history is not None else None
        state = tuple(s.index_select(0, rows) for s in state)  # every state is batch first
    else:
        finished.prefer_live(model_cum, tokens, history)

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

    score: torch.Tensor  # (batch, width) summed log-probabilities, less any diversity penalty
    token: torch.Tensor  # (batch, width) the added token
    parent: torch.Tensor  # (batch, width) the extended beam's row of batch * beam
    model_score: torch.Tensor  # (batch, width) summed log-probabilities alone


def _best_extensions(scores, cum, width, forbidden=None, model_cum=None, penalty=None):
    """The `width` best extensions per image, from step scores (batch * beam, vocab), none of
    them a `forbidden` token (batch * beam, vocab), ranked by `cum` (batch, beam) plus their
    log-probabilities less `penalty` (batch * beam, vocab; None: none). Their model_score adds
    the log-probabilities alone to `model_cum` (needed with a penalty)."""
    batch, k = cum.shape
    logp = scores.float().log_softmax(dim=1)  # (batch * beam, vocab)
    if forbidden is not None:
        # The log-probabilities too: with fewer than `width` tokens allowed, topk takes others.
        scores = scores.masked_fill(forbidden, float("-inf"))
        logp = logp.masked_fill(forbidden, float("-inf"))
    if penalty is None:
        # Choosing on the raw logits first (log_softmax is monotone) keeps beam 1 == argmax.
        top_ids = scores.topk(width, dim=1).indices  # (batch * beam, width)
        gain = logp.gather(1, top_ids)  # (batch * beam, width)
    else:
        steered = logp - penalty  # (batch * beam, vocab): what the group ranks by
        top_ids = steered.topk(width, dim=1).indices  # (batch * beam, width)
        gain = steered.gather(1, top_ids)  # (batch * beam, width)
    cand = (cum.reshape(-1, 1) + gain).view(batch, k * width)  # (batch, beam * width)
    # A stable sort keeps the logit order on rounding ties, again for beam 1 == greedy.
    score, order = cand.sort(dim=1, descending=True, stable=True)
    score, order = score[:, :width], order[:, :width]  # (batch, width)
    token = top_ids.view(batch, k * width).gather(1, order)  # (batch, width)
    first_rows = torch.arange(batch, device=cum.device).unsqueeze(1) * k  # (batch, 1)
    model_score = score
    if penalty is not None:
        own = model_cum.reshape(-1, 1) + logp.gather(1, top_ids)  # (batch * beam, width)
        model_score = own.view(batch, k * width).gather(1, order)  # (batch, width)
    return _Candidates(score, token, first_rows + order // width, model_score)


def _diverse_extensions(scores, cum, model_cum, width, forbidden, options):
    """`_best_extensions` of diverse beam search, whose rows of `cum` (images * groups, beam)
    are the groups of one image after another: group g at a time, its log-probabilities less
    options.diversity times the number of earlier groups of its image whose beam-many best
    candidates (ended ones included) took the token."""
    rows, k = cum.shape
    groups, vocab = options.groups, scores.size(1)
    images = rows // groups
    scores = scores.view(images, groups, k, vocab)  # (images, groups, beam, vocab)
    if forbidden is not None:
        forbidden = forbidden.view(images, groups, k, vocab)  # as scores
    cum, model_cum = cum.view(images, groups, k), model_cum.view(images, groups, k)
    chosen = torch.zeros(images, vocab, device=scores.device)  # (images, vocab) earlier groups'
    parts = []
    for g in range(groups):
        penalty = None
        if g:
            penalty = (options.diversity * chosen).repeat_interleave(k, dim=0)  # (images * beam, V)
        part = _best_extensions(
            scores[:, g].reshape(images * k, vocab),  # (images * beam, vocab)
            cum[:, g], width,
            None if forbidden is None else forbidden[:, g].reshape(images * k, vocab),
            model_cum[:, g], penalty,
        )  # fmt: skip
        chosen.scatter_add_(1, part.token[:, :k], torch.ones(images, k, device=scores.device))
        # Parents count rows of this group's beams alone (image * beam + j): to rows of all.
        image, beam = part.parent // k, part.parent % k  # (images, width) each
        parts.append(part._replace(parent=(image * groups + g) * k + beam))
    # Back to one row per image and group, each field (images, groups, width) flattened.
    return _Candidates(*(torch.stack(field, dim=1).view(rows, width) for field in zip(*parts)))


def _survivors(cand, is_end, k):
    """The k best candidates that did not end: rows to follow (batch * beam,), tokens, and
    their scores with and without any diversity penalty (batch, beam)."""
    width = is_end.size(1)
    rank = torch.arange(width, device=is_end.device)  # (width,)
    # Ends sort behind every other candidate, so the k smallest keys are the best k going on.
    keep = (is_end.long() * width + rank).topk(k, dim=1, largest=False).indices  # (batch, beam)
    rows = cand.parent.gather(1, keep).view(-1)  # (batch * beam,)
    word = cand.token.gather(1, keep).view(-1)  # (batch * beam,)
    return rows, word, cand.score.gather(1, keep), cand.model_score.gather(1, keep)


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
        """Count the hypotheses ending at step t, keep the best by the model's own scores; True
        once every image is done."""
        rank = torch.arange(is_end.size(1), device=is_end.device)  # (width,)
        ended = is_end & (rank < self.beam_size) & ~self.done.unsqueeze(1)  # (batch, width)
        if not bool(ended.any()):
            return False
        # Such a hypothesis holds tokens 0 to t: `<start>` to `<end>`.
        norm = cand.model_score / (t + 1) ** self.length_penalty  # (batch, width)
        step_best, pos = norm.masked_fill(~ended, float("-inf")).max(dim=1)  # (batch,)
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
        """At max_len: an image still searching takes its best live beam where that ranks higher
        (`cum` (batch, beam): the model's own summed log-probabilities)."""
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
def decode_ids(decoder, features, beam_size=1, max_len=20, length_penalty=LENGTH_PENALTY,
               pad_id=PAD_ID, options=None, with_attention=False):  # fmt: skip
    """Ids (rows, steps) decoded as `options` ask, `<start>` first, `pad_id` after `end_id`:
    greedily (beam_size 1), by beam search, by diverse beam search (options.groups) or by
    sampling (options.samples); options.captions_per_image rows per image, image-major.
    With_attention: also the attention weights, as `greedy_decode` and `beam_search` give them
    (sampling has none)."""
    if options is not None and options.samples:
        if beam_size != 1:
            raise ValueError(f"sampling draws captions, beam search searches: beam_size must be "
                             f"1 with samples, not {beam_size}")  # fmt: skip
        if with_attention:
            raise ValueError("sampled captions come without attention weights: search instead")
        return sample_decode(
            decoder, features, options.samples, options.temperature, max_len, pad_id,
            top_k=options.top_k, top_p=options.top_p, options=options,
        ).ids  # fmt: skip
    if beam_size == 1 and (options is None or options.groups == 1):
        return greedy_decode(decoder, features, max_len, pad_id, with_attention, options)
    return beam_search(decoder, features, beam_size, max_len, length_penalty, pad_id,
                       with_attention, options)  # fmt: skip


@torch.no_grad()
def decode_captions(
    decoder, features, vocab, beam_size=1, max_len=20, length_penalty=LENGTH_PENALTY, options=None
) -> tuple[list[list[int]], list[str]]:
    """Id lists (through `end_id`, no padding) and their sentences via `vocab.decode`, as
    `decode_ids` decodes them: one per image, or options.captions_per_image per image,
    image-major (`per_image` groups them). `options` (`DecodingOptions`; None: the defaults)
    always come with the vocabulary's ids, so `<unk>` is suppressed unless they allow it."""
    if max_len < 2:
        raise ValueError(f"max_len {max_len} leaves no word: it counts <start> and <end>")
    ids = decode_ids(decoder, features, beam_size, max_len, length_penalty, vocab.pad_id,
                     vocab_options(options, vocab))  # fmt: skip
    lengths = _lengths(ids, decoder.end_id).tolist()
    id_lists = [row[:n] for row, n in zip(ids.tolist(), lengths)]
    return id_lists, [vocab.decode(row) for row in id_lists]


def per_image(rows, options=None):
    """Image-major `rows` as `decode_captions` gives them, one item per image: the row itself,
    or the list of the image's options.captions_per_image rows when `options` are `listed`."""
    if options is None or not options.listed:
        return list(rows)
    n = options.captions_per_image
    return [list(rows[i : i + n]) for i in range(0, len(rows), n)]
