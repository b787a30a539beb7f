"""Batched greedy, beam-search, diverse beam-search and sampled decoding (decoding.py) against
DecoderRNN.sample, by hand and on rigged decoders."""

import pytest
import torch

from captioning.data.vocabulary import Vocabulary
from captioning.decoding import (
    DecodingOptions,
    beam_search,
    decode_captions,
    decode_ids,
    greedy_decode,
    sample_decode,
    sampling_log_probs,
    vocab_options,
)
from model import DecoderRNN

EMBED, HIDDEN, VOCAB, END, PAD = 16, 32, 30, 1, 3
BIGRAM = 20  # vocabulary (and embedding and hidden) size of the hand-built decoder


# Single-threaded torch: these tiny ops only lose time to thread hand-offs on a busy CPU.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def random_decoder(seed, num_layers=1, end_bias=0.5):
    """Random DecoderRNN in eval mode; a raised `<end>` bias makes rows end at various steps."""
    torch.manual_seed(seed)
    decoder = DecoderRNN(EMBED, HIDDEN, VOCAB, num_layers=num_layers).eval()
    with torch.no_grad():
        # Wider than the default init, so captions vary instead of repeating one token.
        for p in decoder.parameters():
            p.normal_(0.0, 0.5)
        decoder.fc.bias[END] += end_bias
    return decoder


def lengths(ids):
    """Tokens per row through the first `<end>` (the width when there is none)."""
    out = []
    for row in ids.tolist():
        out.append(row.index(END) + 1 if END in row else len(row))
    return out


def sequence_logprob(decoder, feature, ids):
    """Summed log-probability of `ids` under the decoder, by teacher forcing (`<start>` is given)."""
    assert ids[0] == 0, "every sequence begins with the given <start>"
    captions = torch.tensor([ids])
    with torch.no_grad():
        logits = decoder(feature.unsqueeze(0), captions)  # (1, len, vocab)
    return float(logits.log_softmax(-1)[0, torch.arange(1, len(ids)), captions[0, 1:]].sum())


def check_padding(ids):
    """After the first `<end>` a row is all padding."""
    for row, n in zip(ids.tolist(), lengths(ids)):
        assert all(i == PAD for i in row[n:])


@pytest.mark.parametrize("num_layers", [1, 2])
def test_greedy_matches_sample_per_image(num_layers):
    decoder = random_decoder(0, num_layers)
    torch.manual_seed(1)
    features = torch.randn(12, EMBED)
    ids = greedy_decode(decoder, features, max_len=20)
    assert ids.dtype == torch.long and ids.shape[0] == 12
    for i in range(12):
        expected = decoder.sample(features[i].view(1, 1, -1), max_len=20)
        row = ids[i].tolist()
        assert row[: len(expected)] == expected
        assert all(t == PAD for t in row[len(expected) :])
    assert len(set(lengths(ids))) >= 2  # some rows end early, at different steps
    check_padding(ids)


def test_greedy_stops_once_every_row_ended():
    decoder = random_decoder(3, end_bias=1.5)
    features = torch.randn(5, EMBED)
    ids = greedy_decode(decoder, features, max_len=50)
    assert ids.shape[1] == max(lengths(ids)) < 50
    assert (ids == END).any(dim=1).all() and len(set(lengths(ids))) >= 3
    check_padding(ids)


def test_greedy_runs_to_max_len_without_end():
    decoder = random_decoder(0, end_bias=-100.0)
    features = torch.randn(4, EMBED)
    ids = greedy_decode(decoder, features, max_len=7)
    assert ids.shape == (4, 7) and not (ids == END).any()
    assert torch.equal(beam_search(decoder, features, beam_size=1, max_len=7), ids)
    assert beam_search(decoder, features, beam_size=3, max_len=7).shape == (4, 7)


@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("seed,batch", [(0, 1), (1, 5), (2, 12), (3, 7)])
def test_beam_one_is_greedy(num_layers, seed, batch):
    decoder = random_decoder(seed, num_layers)
    torch.manual_seed(100 + seed)
    features = torch.randn(batch, EMBED)
    greedy = greedy_decode(decoder, features, max_len=15)
    for penalty in (0.0, 1.0):
        assert torch.equal(
            beam_search(decoder, features, beam_size=1, max_len=15, length_penalty=penalty), greedy
        )


def bigram_decoder(after_start):
    """A DecoderRNN whose next-token logits depend only on the last input token (by hand).

    Identity embeddings; the LSTM forgets its cell and copies the input's one-hot into the hidden
    state, so `fc` holds a table of next-token logits; `after_start` {token: probability} is the
    row of `<start>`. After `<start>`, token 4 spreads over six words, 5 and 17 end at once, 16
    goes to 17 (0.6) or one of the six words.
    """
    logits = torch.full((BIGRAM, BIGRAM), -8.0)  # logits[prev, next]
    for token, p in after_start.items():
        logits[0, token] = torch.tensor(p).log()
    logits[4, 6:12] = torch.tensor(1 / 6).log()  # 4 -> any of six words
    logits[6:12, END] = 8.0  # each word -> <end>
    logits[5, END] = 8.0  # 5 -> <end>
    logits[16, 17] = torch.tensor(0.6).log()  # 16 -> 17, else one of six words
    logits[16, 6:12] = torch.tensor(0.4 / 6).log()
    logits[17, END] = 8.0  # 17 -> <end>
    return table_decoder(logits)


def table_decoder(logits):
    """A DecoderRNN whose next-token logits are the row `logits` (BIGRAM, BIGRAM) of the last
    input token, and 3 images for it (any image: after `<start>` only the last token counts)."""
    size = BIGRAM
    decoder = DecoderRNN(size, size, size).eval()
    eye = torch.eye(size)
    with torch.no_grad():
        decoder.embed.weight.copy_(eye)
        lstm = decoder.lstm
        lstm.weight_hh_l0.zero_()
        lstm.bias_hh_l0.zero_()
        lstm.weight_ih_l0.zero_()
        lstm.weight_ih_l0[2 * size : 3 * size] = 10 * eye  # cell input: the token's one-hot
        lstm.bias_ih_l0.copy_(torch.cat([torch.full((size,), v) for v in (20.0, -20.0, 0.0, 20.0)]))
        scale = torch.tanh(torch.tanh(torch.tensor(10.0)))  # hidden value of the active token
        decoder.fc.weight.copy_(logits.t() / scale)
        decoder.fc.bias.zero_()
    return decoder, eye[[12, 13, 12]]


@pytest.mark.parametrize("beam_size", [2, 3])
@pytest.mark.parametrize("penalty", [0.0, 1.0])
def test_beam_beats_greedy_where_greedy_is_suboptimal(beam_size, penalty):
    # After <start>, token 4 is locally best (0.5 against 0.4 for token 5) but spreads over six
    # words, while 5 ends at once: greedy is provably suboptimal.
    decoder, features = bigram_decoder({4: 0.5, 5: 0.4})
    greedy = greedy_decode(decoder, features)
    assert greedy[:, :3].tolist() == [[0, 4, 6]] * 3  # greedy takes the locally best token 4
    beam = beam_search(decoder, features, beam_size=beam_size, length_penalty=penalty)
    assert beam.tolist() == [[0, 5, END]] * 3
    for i, feature in enumerate(features):
        g_ids = greedy[i, : lengths(greedy[i : i + 1])[0]].tolist()
        b_ids = beam[i, : lengths(beam[i : i + 1])[0]].tolist()
        assert (
            sequence_logprob(decoder, feature, b_ids)
            > sequence_logprob(decoder, feature, g_ids) + 1.0
        )


def test_length_penalty_favours_the_longer_caption(tmp_path):
    # After <start>: <end> at once (0.45), or 16 (0.5), 17 (0.6), <end>: shorter by raw sum,
    # longer per token.
    decoder, features = bigram_decoder({END: 0.45, 16: 0.5})
    short = beam_search(decoder, features[:1], beam_size=2, length_penalty=0.0)
    long = beam_search(decoder, features[:1], beam_size=2, length_penalty=1.0)
    assert short.tolist() == [[0, END]] and long.tolist() == [[0, 16, 17, END]]
    # The default ranks by the raw sum, in beam_search and in decode_captions (evaluate, caption).
    assert beam_search(decoder, features[:1], beam_size=2).tolist() == short.tolist()
    words = " ".join(f"w{i}" for i in range(BIGRAM))
    vocab = Vocabulary(1, vocab_file=str(tmp_path / "v.json"), captions=[words])
    assert decode_captions(decoder, features[:1], vocab, beam_size=2)[0] == [[0, END]]
    raw = [sequence_logprob(decoder, features[0], ids) for ids in ([0, END], [0, 16, 17, END])]
    assert raw[0] > raw[1] and raw[0] / 2 < raw[1] / 4  # length counts <start> and <end>


@pytest.mark.parametrize("num_layers,seed", [(1, 4), (2, 1)])
def test_beam_scores_at_least_greedy_on_random_weights(num_layers, seed):
    # Beam search is not guaranteed to beat greedy per image (greedy's path can leave the beam),
    # so this asserts the typical case: most images at least as good, a gain overall.
    decoder = random_decoder(seed, num_layers, end_bias=1.0)
    torch.manual_seed(5)
    features = torch.randn(16, EMBED)
    greedy = greedy_decode(decoder, features, max_len=20)
    beam = beam_search(decoder, features, beam_size=3, max_len=20, length_penalty=0.0)
    better_or_equal, differ, gain = 0, 0, 0.0
    for i, feature in enumerate(features):
        g_ids = greedy[i, : lengths(greedy[i : i + 1])[0]].tolist()
        b_ids = beam[i, : lengths(beam[i : i + 1])[0]].tolist()
        g, b = sequence_logprob(decoder, feature, g_ids), sequence_logprob(decoder, feature, b_ids)
        better_or_equal += b >= g - 1e-4
        differ += b_ids != g_ids
        gain += b - g
    assert better_or_equal >= 14 and differ >= 3 and gain > 0


@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("beam_size,penalty", [(3, 1.0), (4, 0.0), (2, 0.7)])
def test_beam_is_batch_invariant(num_layers, beam_size, penalty):
    decoder = random_decoder(6, num_layers)
    torch.manual_seed(7)
    features = torch.randn(6, EMBED)
    batched = beam_search(
        decoder, features, beam_size=beam_size, max_len=12, length_penalty=penalty
    )
    for i in range(6):
        alone = beam_search(
            decoder, features[i : i + 1], beam_size=beam_size, max_len=12, length_penalty=penalty
        )
        n = alone.shape[1]
        assert batched[i, :n].tolist() == alone[0].tolist()
        assert (batched[i, n:] == PAD).all()


def test_beam_shapes_and_padding():
    decoder = random_decoder(8)
    features = torch.randn(9, EMBED)
    ids = beam_search(decoder, features, beam_size=3, max_len=10, pad_id=PAD)
    assert ids.dtype == torch.long and ids.shape[0] == 9 and 1 <= ids.shape[1] <= 10
    assert ids.shape[1] == max(lengths(ids))
    check_padding(ids)
    with pytest.raises(ValueError):
        beam_search(decoder, features, beam_size=VOCAB)


def test_runs_in_float64():
    decoder = random_decoder(9).double()
    features = torch.randn(3, EMBED, dtype=torch.float64)
    greedy = greedy_decode(decoder, features)
    assert greedy.dtype == torch.long
    assert torch.equal(beam_search(decoder, features, beam_size=1), greedy)
    assert beam_search(decoder, features, beam_size=3).dtype == torch.long


def test_decode_captions(tmp_path):
    captions = ["a dog runs on the grass", "a cat sits on the mat", "a dog and a cat"]
    vocab = Vocabulary(1, vocab_file=str(tmp_path / "v.json"), captions=captions)
    torch.manual_seed(10)
    decoder = DecoderRNN(EMBED, HIDDEN, len(vocab)).eval()
    with torch.no_grad():
        decoder.fc.bias[vocab.end_id] += 1.0
    features = torch.randn(4, EMBED)
    for beam_size in (1, 3):
        ids, sentences = decode_captions(decoder, features, vocab, beam_size=beam_size, max_len=8)
        assert len(ids) == len(sentences) == 4
        expected = (
            greedy_decode(decoder, features, max_len=8)
            if beam_size == 1
            else beam_search(decoder, features, beam_size=3, max_len=8)
        )
        for row, full, sentence in zip(ids, expected.tolist(), sentences):
            assert row == full[: len(row)] and all(t == vocab.pad_id for t in full[len(row) :])
            assert vocab.end_id not in row[:-1]
            assert sentence == vocab.decode(row)
            assert all(word in vocab for word in sentence.split())


# Beam search against exhaustive search. Beam search is exact when the beam holds every candidate
# and no image stops early, so the decoder makes every token but `<end>` and two words rare: then
# step t has 3 * 2 ** (t - 1) candidates, 12 at the last step of EXACT_LEN, and only 1 + 2 + 4
# captions finish, fewer than the beam. The rare tokens' logits sit far below the random spread.
EXACT_VOCAB, EXACT_BEAM, EXACT_LEN = 24, 12, 4
COMMON = (5, 9)  # the two likely words
RARE = 50.0  # how far the logits of the other tokens are pushed down
PENALTIES = (-0.5, 0.0, 0.5, 1.0, 2.0)  # below 0: shorter captions favoured


def few_token_decoder(seed, ends=True):
    """Random DecoderRNN and 6 images where only COMMON and (if `ends`) `<end>` are likely."""
    torch.manual_seed(seed)
    decoder = DecoderRNN(EMBED, HIDDEN, EXACT_VOCAB).eval()
    rare = torch.ones(EXACT_VOCAB, dtype=torch.bool)
    rare[[END, *COMMON]] = False
    start, flag_unit, lstm = decoder.start_id, HIDDEN - 1, decoder.lstm
    gates = torch.arange(4) * HIDDEN + flag_unit  # its input, forget, cell and output rows
    with torch.no_grad():
        # Wide weights, so the best caption often differs from greedy's and varies in length.
        for p in decoder.parameters():
            p.normal_(0.0, 0.8)
        decoder.embed.weight.normal_(0.0, 1.5)
        decoder.fc.bias[rare] -= RARE
        if not ends:
            decoder.fc.bias[END] -= 2 * RARE  # below the rare tokens: no candidate ever ends
        # A beam wider than the likely candidates is padded with rare tokens, and a padded beam
        # that emitted `<end>` would count as finished and could stop the search early. So the
        # flag unit remembers any rare input (flagged in the last embedding dimension) and rules
        # `<end>` out after it; `<start>`, the first input, cannot carry the flag, so it is rarer.
        decoder.embed.weight[:, -1] = rare.float()
        decoder.embed.weight[start, -1] = 0.0
        decoder.fc.bias[start] -= RARE
        for weights in (lstm.weight_ih_l0, lstm.weight_hh_l0, lstm.bias_hh_l0):
            weights[gates] = 0.0
        lstm.bias_ih_l0[gates] = torch.tensor([20.0, 20.0, 0.0, 20.0])  # open, never forgets
        lstm.weight_ih_l0[gates[2], -1] = 20.0  # the cell adds the flag
        decoder.fc.weight[END, flag_unit] = -200.0
    torch.manual_seed(100 + seed)
    features = torch.randn(6, EMBED)
    features[:, -1] = 0.0  # an image is no rare token
    return decoder, features


@torch.no_grad()
def exhaustive_best(decoder, features, max_len, penalties):
    """Per length penalty, each image's best caption (batch, max_len), found by scoring them all."""
    # A caption is any token sequence after `<start>` up to its first `<end>`, or cut at max_len
    # tokens. It ranks as beam_search documents: summed log-probabilities / length ** penalty.
    batch, vocab = features.size(0), decoder.fc.out_features
    go_on = torch.tensor([i for i in range(vocab) if i != END])  # (vocab - 1,)
    states = decoder.init_state(features)
    word = torch.full((batch,), decoder.start_id)  # (batch,) `<start>`
    prefixes = word[:1].unsqueeze(1)  # (live, t): the unfinished captions, the same for each image
    cum = torch.zeros(batch, 1)  # (batch, live) summed log-probabilities
    best = {p: torch.full((batch, max_len), PAD) for p in penalties}
    best_score = {p: torch.full((batch,), float("-inf")) for p in penalties}

    def keep_better(p, score, captions):
        """Take the best of `captions` (n, max_len), scored (batch, n), where it beats the best."""
        top, pos = score.max(dim=1)  # (batch,)
        better = top > best_score[p]
        best[p][better] = captions[pos[better]]
        best_score[p] = torch.where(better, top, best_score[p])

    for t in range(1, max_len):
        scores, states, _ = decoder.step(word, states)  # (batch * live, V)
        logp = cum.unsqueeze(2) + scores.log_softmax(dim=1).view(batch, -1, vocab)  # (b, live, V)
        ended = torch.full((len(prefixes), max_len), PAD)  # (live, max_len)
        ended[:, :t], ended[:, t] = prefixes, END
        for p in penalties:
            keep_better(p, logp[:, :, END] / (t + 1) ** p, ended)
        live = len(prefixes)
        cum = logp[:, :, go_on].reshape(batch, -1)  # (batch, live * (vocab - 1))
        prefixes = torch.cat(
            [prefixes.repeat_interleave(len(go_on), dim=0), go_on.repeat(live).unsqueeze(1)], dim=1
        )  # (live * (vocab - 1), t + 1)
        word = prefixes[:, -1].repeat(batch)  # (batch * live,)
        states = tuple(s.repeat_interleave(len(go_on), dim=0) for s in states)  # batch first
    for p in penalties:
        keep_better(p, cum / max_len**p, prefixes)
    return best


def padded(ids, width=EXACT_LEN):
    """`ids` (batch, steps) padded with PAD to (batch, width)."""
    return torch.nn.functional.pad(ids, (0, width - ids.size(1)), value=PAD)


def test_beam_finds_the_exhaustive_best():
    best_lengths, greedy_misses = set(), 0
    for seed in range(4):
        decoder, features = few_token_decoder(seed)
        best = exhaustive_best(decoder, features, EXACT_LEN, PENALTIES)
        greedy = padded(greedy_decode(decoder, features, max_len=EXACT_LEN))
        for penalty in PENALTIES:
            beam = beam_search(
                decoder, features, EXACT_BEAM, max_len=EXACT_LEN, length_penalty=penalty
            )
            assert padded(beam).tolist() == best[penalty].tolist(), (seed, penalty)
            best_lengths.update(lengths(best[penalty]))
            greedy_misses += int((greedy != best[penalty]).any(dim=1).sum())
    # The search has work to do, and finished captions of every length and cut ones compete.
    assert greedy_misses >= 5 and best_lengths == {2, 3, EXACT_LEN}


def test_beam_finds_the_exhaustive_best_when_no_caption_ends():
    decoder, features = few_token_decoder(5, ends=False)
    best = exhaustive_best(decoder, features, EXACT_LEN, PENALTIES)
    greedy = padded(greedy_decode(decoder, features, max_len=EXACT_LEN))
    for penalty in PENALTIES:
        assert not (best[penalty] == END).any()
        beam = beam_search(decoder, features, EXACT_BEAM, max_len=EXACT_LEN, length_penalty=penalty)
        assert padded(beam).tolist() == best[penalty].tolist(), penalty
        assert not torch.equal(greedy, best[penalty])


# Decoding options. The rigged decoders below want to break a rule: their step scores depend on
# the last word only (`table_decoder`); `<end>` is unlikely (-8) unless set.
A = 4  # "a" in `rigged_vocab`, a bad ending
RULES = {
    "no_bad_endings": DecodingOptions(no_bad_endings=True, bad_ending_ids=(A,)),
    "block_trigrams": DecodingOptions(block_trigrams=True),
    "no_repeat_words": DecodingOptions(no_repeat_words=True),
}


def rigged_decoder(rule):
    """(decoder, images, max_len, its ids without the rule, with it: greedy and beam alike)."""
    logits = torch.full((BIGRAM, BIGRAM), -8.0)  # logits[prev, next]
    if rule == "no_bad_endings":
        # "a" then `<end>` (or "a" w5 `<end>`), against w9 `<end>` after <start>.
        logits[0, A], logits[0, 9] = 3.0, 0.0
        logits[A, END], logits[A, 5] = 5.0, 3.0
        logits[5, END] = logits[9, END] = 5.0
        return *table_decoder(logits), 20, [0, A, END], [0, A, 5, END]
    if rule == "block_trigrams":
        # The cycle 5 6 7 5 6 7 ..., left after 6 for 8 (then 5, or 9 less often).
        logits[0, 5] = logits[5, 6] = logits[6, 7] = logits[7, 5] = 5.0
        logits[6, 8], logits[8, 5], logits[8, 9] = 3.0, 4.0, 3.0
        return *table_decoder(logits), 7, [0, 5, 6, 7, 5, 6, 7], [0, 5, 6, 7, 5, 6, 8]
    # no_repeat_words: 5 again and again, else 6 then 7 and back to 5.
    logits[0, 5] = logits[5, 5] = logits[6, 7] = logits[7, 5] = 5.0
    logits[5, 6] = 3.0
    return *table_decoder(logits), 6, [0, 5, 5, 5, 5, 5], [0, 5, 6, 7, 5, 6]


def breaks(rule, row):
    """Whether a caption's ids (`<start>` first, maybe padded) break `rule`."""
    words = row[1 : row.index(END)] if END in row else row[1:]
    if rule == "no_bad_endings":
        return END in row and words[-1:] == [A]
    if rule == "block_trigrams":
        trigrams = list(zip(words, words[1:], words[2:]))
        return len(set(trigrams)) < len(trigrams)
    return any(a == b for a, b in zip(words, words[1:]))


def decode(decoder, features, beam_size, max_len, options=None):
    """Greedy (beam_size 1) or beam-search ids as lists."""
    if beam_size == 1:
        return greedy_decode(decoder, features, max_len=max_len, options=options).tolist()
    return beam_search(decoder, features, beam_size, max_len=max_len, options=options).tolist()


# Beam BIGRAM // 2 ranks the whole vocabulary at each step, forbidden words included.
@pytest.mark.parametrize("beam_size", [1, 2, 3, BIGRAM // 2])
@pytest.mark.parametrize("rule", RULES)
def test_each_option_keeps_a_rigged_decoder_to_its_rule(rule, beam_size):
    decoder, features, max_len, wanted, kept = rigged_decoder(rule)
    without = decode(decoder, features, beam_size, max_len)
    assert without == [wanted] * 3 and breaks(rule, wanted)  # the decoder wants to break it
    assert decode(decoder, features, beam_size, max_len, DecodingOptions()) == without
    ruled = decode(decoder, features, beam_size, max_len, RULES[rule])
    assert ruled == [kept] * 3 and not breaks(rule, kept)


@pytest.mark.parametrize("seed", [11, 14])
def test_options_on_random_decoders(seed):
    # Seeds whose captions (up to 16 tokens) break each rule now and then.
    decoder = random_decoder(seed, end_bias=0.0)
    torch.manual_seed(seed)
    features = torch.randn(24, EMBED)
    every = DecodingOptions(True, True, True, bad_ending_ids=tuple(range(4, 12)))
    broken = set()
    for beam_size in (1, 3):
        plain = decode(decoder, features, beam_size, 16)
        # All options off: exactly today's captions.
        assert decode(decoder, features, beam_size, 16, DecodingOptions()) == plain
        ruled = decode(decoder, features, beam_size, 16, every)
        for rule in RULES:
            with_rules = [i for i, row in enumerate(ruled) if breaks_any(rule, row)]
            assert not with_rules, (rule, beam_size, with_rules)
            broken.update(rule for row in plain if breaks_any(rule, row))
    assert broken == set(RULES)  # each rule had something to stop


def breaks_any(rule, row):
    """`breaks`, with every id from 4 to 11 a bad ending."""
    if rule != "no_bad_endings":
        return breaks(rule, row)
    words = row[1 : row.index(END)] if END in row else []
    return bool(words) and 4 <= words[-1] < 12


def test_beam_one_is_greedy_with_every_option():
    decoder = random_decoder(13, end_bias=1.0)
    features = torch.randn(16, EMBED)
    every = DecodingOptions(True, True, True, bad_ending_ids=tuple(range(4, 12)))
    greedy = greedy_decode(decoder, features, max_len=15, options=every)
    assert torch.equal(beam_search(decoder, features, 1, max_len=15, options=every), greedy)
    assert not torch.equal(greedy, greedy_decode(decoder, features, max_len=15))


def rigged_vocab(tmp_path):
    """A vocabulary of BIGRAM ids: "a" is A, and word "wN" id N for N from 5."""
    words = ["a"] + [f"w{i:02d}" for i in range(5, BIGRAM)]
    vocab = Vocabulary(1, vocab_file=str(tmp_path / "v.json"), captions=[" ".join(words)])
    assert vocab("a") == A and vocab("w05") == 5 and len(vocab) == BIGRAM
    return vocab


@pytest.mark.parametrize("beam_size", [1, 3])
def test_decode_captions_finds_the_bad_endings_in_the_vocabulary(tmp_path, beam_size):
    decoder, features, max_len, _, _ = rigged_decoder("no_bad_endings")
    vocab = rigged_vocab(tmp_path)
    plain = decode_captions(decoder, features, vocab, beam_size, max_len)
    assert plain[1] == ["a"] * 3
    assert decode_captions(decoder, features, vocab, beam_size, max_len, options=None) == plain
    rule = DecodingOptions(no_bad_endings=True)
    assert (
        decode_captions(decoder, features, vocab, beam_size, max_len, options=rule)[1]
        == ["a w05"] * 3
    )
    with pytest.raises(ValueError, match="for_vocab"):
        greedy_decode(decoder, features, options=rule)  # the words' ids are unknown


# `<unk>`, sampling and diverse beam search. The rigged decoders' step scores depend on the last
# word only (`table_decoder`); their other tokens sit far below (-30), out of every count.
UNK = 2  # `<unk>` in every Vocabulary


def unk_decoder():
    """(decoder, images): `<unk>` is the likeliest first word (0.88), then w05; each ends."""
    logits = torch.full((BIGRAM, BIGRAM), -30.0)  # logits[prev, next]
    logits[0, UNK], logits[0, 5] = 2.0, 0.0
    logits[UNK, END] = logits[5, END] = 8.0
    return table_decoder(logits)


@pytest.mark.parametrize(
    "beam_size,options",
    [(1, {}), (3, {}), (4, dict(groups=2, diversity=0.1)), (1, dict(samples=50))],
    ids=["greedy", "beam", "diverse", "sampling"],
)
def test_unk_is_suppressed_unless_allowed(tmp_path, beam_size, options):
    decoder, features = unk_decoder()
    vocab = rigged_vocab(tmp_path)
    torch.manual_seed(0)
    default = DecodingOptions(**options) if options else None  # None: decode_captions' default
    ids, _ = decode_captions(decoder, features, vocab, beam_size, 5, options=default)
    assert not any(UNK in row for row in ids)
    assert {tuple(row) for row in ids} == {(0, 5, END)}
    allowed, _ = decode_captions(
        decoder, features, vocab, beam_size, 5, options=DecodingOptions(allow_unk=True, **options)
    )
    assert sum(UNK in row for row in allowed) >= len(allowed) / 2  # the decoder's favourite


def test_the_low_level_decoders_suppress_nothing_without_a_vocabulary(tmp_path):
    decoder, features = unk_decoder()
    assert greedy_decode(decoder, features, 5)[:, 1].tolist() == [UNK] * 3
    assert vocab_options(None, rigged_vocab(tmp_path)).suppresses_unk  # what every caller uses
    assert not DecodingOptions().suppresses_unk  # no unk_id: nothing to suppress


@pytest.mark.parametrize("num_layers", [1, 2])
def test_top_k_one_and_a_tiny_nucleus_are_greedy(num_layers):
    decoder = random_decoder(22, num_layers)
    with torch.no_grad():
        decoder.fc.bias[PAD] -= 100.0  # greedy could take `<pad>`, which sampling never draws
    features = torch.randn(6, EMBED)
    greedy = greedy_decode(decoder, features, max_len=15).repeat_interleave(4, dim=0)
    for cut in (dict(top_k=1), dict(top_p=1e-6), dict(top_k=1, temperature=3.0)):
        torch.manual_seed(1)
        options = DecodingOptions(samples=4, **cut)
        assert torch.equal(decode_ids(decoder, features, max_len=15, options=options), greedy)
    # Without the cut the samples differ from greedy, or the test would show nothing.
    torch.manual_seed(1)
    assert not torch.equal(sample_decode(decoder, features, 4, max_len=15).ids, greedy)


FIRST_WORDS = {5: 0.5, 6: 0.3, 7: 0.15, 8: 0.05}  # after `<start>`: word id, probability


@pytest.mark.parametrize(
    "temperature,top_k,top_p,expected",
    [
        (1.0, None, None, FIRST_WORDS),
        (2.0, None, None, {w: p**0.5 for w, p in FIRST_WORDS.items()}),  # softmax(log p / 2)
        (0.5, None, None, {w: p**2 for w, p in FIRST_WORDS.items()}),
        (1.0, 2, None, {5: 0.5, 6: 0.3}),
        (1.0, None, 0.75, {5: 0.5, 6: 0.3}),  # 0.5 < 0.75: 6 is needed to reach it
        (1.0, None, 0.85, {5: 0.5, 6: 0.3, 7: 0.15}),
        (2.0, 3, 0.5, {5: 0.5**0.5, 6: 0.3**0.5}),  # 0.379 < 0.5 after the temperature
    ],
)
def test_sampled_first_words_follow_the_softmax(temperature, top_k, top_p, expected):
    logits = torch.full((BIGRAM, BIGRAM), -30.0)  # logits[prev, next]
    logits[0, list(FIRST_WORDS)] = torch.tensor(list(FIRST_WORDS.values())).log()
    decoder, features = table_decoder(logits)
    draws = 20_000
    torch.manual_seed(0)
    samples = sample_decode(decoder, features[:1], draws, temperature, max_len=2, top_k=top_k,
                            top_p=top_p)  # fmt: skip
    counts = torch.bincount(samples.ids[:, 1], minlength=BIGRAM).double() / draws
    total = sum(expected.values())
    for word in range(BIGRAM):
        p = expected.get(word, 0.0) / total
        # Five binomial standard deviations: a chance of about 1e-6 per word to be outside.
        assert abs(counts[word] - p) <= 5 * (p * (1 - p) / draws) ** 0.5, (word, counts[word], p)
    # The log-probabilities are those of the distribution drawn from.
    drawn = samples.ids[:, 1]
    wanted = torch.tensor([expected[int(w)] / total for w in drawn[:50]]).log()
    assert torch.allclose(samples.log_probs[:50, 0].double(), wanted.double(), atol=1e-4)


def test_top_p_keeps_exactly_the_nucleus():
    # Two rows, the same probabilities in other places; id 3 is `<pad>`, never drawn.
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.0, 0.3], [0.3, 0.15, 0.05, 0.0, 0.5]])
    scores = probs.log()
    nuclei = {0.4: (0.5,), 0.79: (0.5, 0.3), 0.81: (0.5, 0.3, 0.15), 0.96: (0.5, 0.3, 0.15, 0.05)}
    for top_p, nucleus in {**nuclei, 1.0: nuclei[0.96]}.items():
        logp = sampling_log_probs(scores, pad_id=3, top_p=top_p)  # (2, 5)
        for row in range(2):
            kept = probs[row] >= min(nucleus)
            assert torch.isfinite(logp[row]).tolist() == kept.tolist(), (top_p, row)
            assert torch.allclose(logp[row][kept].exp(), probs[row][kept] / sum(nucleus))


def test_sampling_keeps_the_rules_and_self_critical_sampling_stays_the_models():
    decoder, features, max_len, wanted, _ = rigged_decoder("no_repeat_words")
    torch.manual_seed(0)
    ruled = sample_decode(decoder, features, 20, max_len=max_len, options=RULES["no_repeat_words"])
    assert not any(breaks("no_repeat_words", row) for row in ruled.ids.tolist())
    torch.manual_seed(0)
    plain = sample_decode(decoder, features, 20, max_len=max_len)  # as self_critical.py calls it
    # The model's own choice: "w05 w05" about 59 times in 60.
    assert sum(breaks("no_repeat_words", row) for row in plain.ids.tolist()) >= 50
    scores = torch.randn(4, BIGRAM)
    assert torch.equal(sampling_log_probs(scores, 0.7, PAD), (scores / 0.7).index_fill(
        1, torch.tensor([PAD]), float("-inf")).log_softmax(dim=1))  # fmt: skip


@pytest.mark.parametrize("num_layers,seed", [(1, 20), (2, 21)])
def test_diverse_beam_search_with_one_group_or_no_penalty_is_beam_search(num_layers, seed):
    decoder = random_decoder(seed, num_layers)
    features = torch.randn(5, EMBED)
    beam2, beam4 = (beam_search(decoder, features, k, max_len=12) for k in (2, 4))
    one_group = DecodingOptions(groups=1, diversity=2.0)
    assert torch.equal(beam_search(decoder, features, 4, max_len=12, options=one_group), beam4)
    diverse = padded(beam_search(decoder, features, 4, 12, options=DecodingOptions(groups=2)), 12)
    assert diverse.shape[0] == 10  # one caption per group, image-major
    assert torch.equal(diverse[0::2], padded(beam2, 12))  # group 0 has no penalty
    assert not torch.equal(diverse[1::2], diverse[0::2])
    level = DecodingOptions(groups=2, diversity=0.0)
    same = padded(beam_search(decoder, features, 4, 12, options=level), 12)
    assert torch.equal(same[0::2], padded(beam2, 12)) and torch.equal(same[1::2], same[0::2])


@pytest.mark.parametrize(
    "diversity,expected", [(0.0, [5, 5, 5]), (0.3, [5, 5, 6]), (0.5, [5, 6, 5])]
)
def test_each_earlier_group_that_chose_a_word_costs_it_the_diversity(diversity, expected):
    # After <start>: 5 (0.6) or 6 (0.4), each then <end>; three groups of one beam. The third
    # group pays the diversity once per earlier group that chose 5: log 0.6 - 2 * 0.3 < log 0.4.
    logits = torch.full((BIGRAM, BIGRAM), -30.0)  # logits[prev, next]
    logits[0, 5], logits[0, 6] = torch.tensor(0.6).log(), torch.tensor(0.4).log()
    logits[5, END] = logits[6, END] = 8.0
    decoder, features = table_decoder(logits)
    options = DecodingOptions(groups=3, diversity=diversity)
    ids = beam_search(decoder, features, 3, max_len=5, options=options)
    assert ids.tolist() == [[0, word, END] for word in expected] * 3


def test_a_group_returns_its_best_caption_by_the_models_own_score():
    # Group 0 (two beams) takes 5 and 6; the penalty (1.0) pushes group 1 to 7 first, then 5:
    # penalised, 7 <end> ranks above 5 <end>; by the model's log-probabilities, 5 <end> does.
    logits = torch.full((BIGRAM, BIGRAM), -30.0)  # logits[prev, next]
    logits[0, [5, 6, 7]] = torch.tensor([0.5, 0.3, 0.2]).log()
    logits[[5, 6, 7], END] = 8.0
    decoder, features = table_decoder(logits)
    ids = beam_search(decoder, features[:1], 4, max_len=5, options=DecodingOptions(groups=2,
                      diversity=1.0))  # fmt: skip
    assert ids.tolist() == [[0, 5, END], [0, 5, END]]


def test_decoding_options_refuse_what_no_decoder_can_do(tmp_path):
    for wrong, message in (
        (dict(samples=-1), "samples"), (dict(samples=2, temperature=0.0), "temperature"),
        (dict(samples=2, top_k=0), "top_k"), (dict(samples=2, top_p=0.0), "top_p"),
        (dict(samples=2, top_p=1.5), "top_p"), (dict(groups=0), "groups"),
        (dict(groups=2, diversity=-0.1), "diversity"), (dict(samples=2, groups=2), "not both"),
        (dict(top_k=5), "set samples"), (dict(temperature=0.5), "set samples"),
    ):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            DecodingOptions(**wrong)
    decoder, features = unk_decoder()
    with pytest.raises(ValueError, match="does not split into 2 groups"):
        beam_search(decoder, features, 3, options=DecodingOptions(groups=2))
    with pytest.raises(ValueError, match="beam_size must be 1"):
        decode_ids(decoder, features, 3, options=DecodingOptions(samples=2))
    with pytest.raises(ValueError, match="max_len"):
        decode_captions(decoder, features, rigged_vocab(tmp_path), max_len=1)
    assert DecodingOptions(samples=3).captions_per_image == 3
    assert DecodingOptions(groups=2).captions_per_image == 2
    assert DecodingOptions().captions_per_image == 1


# Punctuation: a model trained on captions that end in " ." ends "a man in a ." rather than
# "a man in a". Vocabulary of BIGRAM ids: "," 4, "." 5, "a" 6, "wN" N from 7.
COMMA, PERIOD, A_WORD = 4, 5, 6


def punctuation_vocab(tmp_path):
    words = ["a", ".", ","] + [f"w{i:02d}" for i in range(7, BIGRAM)]
    vocab = Vocabulary(1, vocab_file=str(tmp_path / "p.json"), captions=[words])
    assert [vocab(w) for w in (",", ".", "a", "w07")] == [COMMA, PERIOD, A_WORD, 7]
    return vocab


@pytest.mark.parametrize("mark", [PERIOD, COMMA])
@pytest.mark.parametrize("beam_size", [1, 3])
def test_no_bad_endings_forbids_punctuation_after_a_bad_word(tmp_path, mark, beam_size):
    from captioning.evaluation.caption_health import ends_badly

    # "a" then punctuation (then <end>), against "a w07 ." or w09 after <start>.
    logits = torch.full((BIGRAM, BIGRAM), -8.0)  # logits[prev, next]
    logits[0, A_WORD], logits[0, 9] = 3.0, 0.0
    logits[A_WORD, mark], logits[A_WORD, END], logits[A_WORD, 7] = 5.0, 4.0, 3.0
    logits[mark, END] = logits[PERIOD, END] = 8.0
    logits[7, PERIOD], logits[9, PERIOD] = 5.0, 5.0
    decoder, features = table_decoder(logits)
    vocab = punctuation_vocab(tmp_path)
    options = DecodingOptions(no_bad_endings=True).for_vocab(vocab)
    assert options.punctuation_ids == (COMMA, PERIOD) and A_WORD in options.bad_ending_ids
    plain = decode_captions(decoder, features, vocab, beam_size, 8)
    assert plain[0] == [[0, A_WORD, mark, END]] * 3 and all(map(ends_badly, plain[1]))
    ruled = decode_captions(decoder, features, vocab, beam_size, 8, options=options)
    assert ruled[0] == [[0, A_WORD, 7, PERIOD, END]] * 3 and ruled[1] == ["a w07 ."] * 3
    assert not any(map(ends_badly, ruled[1]))
