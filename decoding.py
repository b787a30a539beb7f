"""Batched greedy and beam-search caption decoding for `model.DecoderRNN` (CPU or GPU).

The decoder should be in eval mode (the caller's job: these functions never change the mode).
Sequences follow `DecoderRNN.sample`: the image feature is the first LSTM input, every
sequence begins with the given `<start>` id, and ends with (and includes) `end_id`.
"""

import torch

PAD_ID = 3  # `<pad>` in vocabulary.Vocabulary


@torch.no_grad()
def greedy_decode(decoder, features, max_len=20, pad_id=PAD_ID):
    """Greedy ids (batch, steps): each row as `decoder.sample` gives it, `pad_id` after `end_id`."""
    states, word = decoder.begin(features)  # word: (batch,) `<start>`
    done = word == decoder.end_id
    columns = [word]
    while len(columns) < max_len and not bool(done.all()):
        # Finished rows keep stepping on `<pad>` so the batch stays whole; their output is masked.
        scores, states = decoder.step(decoder.embed(word).unsqueeze(1), states)  # (batch, vocab)
        word = scores.argmax(dim=1).masked_fill(done, pad_id)  # (batch,)
        columns.append(word)
        done = done | (word == decoder.end_id)
    return torch.stack(columns, dim=1)  # (batch, steps)


@torch.no_grad()
def beam_search(decoder, features, beam_size=3, max_len=20, length_penalty=1.0, pad_id=PAD_ID):
    """Best beam-search ids (batch, steps) per image, `pad_id` after `end_id`.

    Scores are summed log-probabilities; a hypothesis is ranked at the end by simple length
    normalisation, score / length ** length_penalty, with length counting every emitted token
    (`<start>` and `<end>` included); length_penalty=0 ranks by the raw sum. An image stops once
    `beam_size` hypotheses have finished (those that were among its `beam_size` best candidates
    when they emitted `end_id`); otherwise the unfinished beams at `max_len` compete too.
    beam_size=1 gives exactly `greedy_decode`.
    """
    batch, k = features.size(0), beam_size
    device, end_id = features.device, decoder.end_id
    # At most k of the 2k best candidates end (one per beam), so k unfinished ones always remain.
    width = 2 * k
    vocab = decoder.fc.out_features
    if width > vocab:
        raise ValueError(f"beam_size {k} too large for a vocabulary of {vocab} (needs 2k <= vocab)")
    neg_inf = float("-inf")
    states, word = decoder.begin(features.repeat_interleave(k, dim=0))  # (batch * beam,) `<start>`
    inputs = decoder.embed(word).unsqueeze(1)  # (batch * beam, 1, embed)
    cum = torch.zeros(batch, k, device=device)
    cum[:, 1:] = neg_inf  # beams start identical: expanding only beam 0 avoids duplicates
    tokens = torch.full((batch * k, max_len), pad_id, dtype=torch.long, device=device)
    tokens[:, 0] = word
    best_seq = torch.full((batch, max_len), pad_id, dtype=torch.long, device=device)
    best_score = torch.full((batch,), neg_inf, device=device)
    n_finished = torch.zeros(batch, dtype=torch.long, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    first_rows = torch.arange(batch, device=device).unsqueeze(1) * k  # (batch, 1)
    rank = torch.arange(width, device=device)  # (width,)
    for t in range(1, max_len):
        scores, states = decoder.step(inputs, states)  # (batch * beam, vocab)
        # Choosing on the raw logits first (log_softmax is monotone) keeps beam 1 == argmax.
        top_ids = scores.topk(width, dim=1).indices  # (batch * beam, width)
        logp = scores.float().log_softmax(dim=1).gather(1, top_ids)  # (batch * beam, width)
        cand = (cum.view(-1, 1) + logp).view(batch, k * width)  # (batch, beam * width)
        # A stable sort keeps the logit order on rounding ties, again for beam 1 == greedy.
        cand_score, order = cand.sort(dim=1, descending=True, stable=True)
        cand_score, order = cand_score[:, :width], order[:, :width]  # (batch, width)
        cand_tok = top_ids.view(batch, k * width).gather(1, order)  # (batch, width)
        parent = first_rows + order // width  # (batch, width), rows of batch * beam
        is_end = cand_tok == end_id  # (batch, width)

        finished = is_end & (rank < k) & ~done.unsqueeze(1)  # (batch, width)
        if bool(finished.any()):
            norm = (cand_score / (t + 1) ** length_penalty).masked_fill(~finished, neg_inf)
            step_best, pos = norm.max(dim=1)  # (batch,)
            src = parent.gather(1, pos.unsqueeze(1)).squeeze(1)  # (batch,)
            seq = tokens[src]  # (batch, max_len), a copy
            seq[:, t] = end_id
            better = step_best > best_score  # (batch,)
            best_seq = torch.where(better.unsqueeze(1), seq, best_seq)
            best_score = torch.where(better, step_best, best_score)
            n_finished += finished.sum(dim=1)
            done = n_finished >= k
            if bool(done.all()):
                break

        # The k best candidates that did not end continue (ends sort behind every other one).
        keep = (is_end.long() * width + rank).topk(k, dim=1, largest=False).indices  # (batch, beam)
        rows = parent.gather(1, keep).view(-1)  # (batch * beam,)
        word = cand_tok.gather(1, keep).view(-1)  # (batch * beam,)
        cum = cand_score.gather(1, keep)  # (batch, beam)
        tokens = tokens[rows]
        tokens[:, t] = word
        states = tuple(s.index_select(1, rows) for s in states)  # (layers, batch * beam, hidden)
        inputs = decoder.embed(word).unsqueeze(1)  # (batch * beam, 1, embed)
    else:
        # Ran out of steps: unfinished beams of images still searching are candidates too.
        norm = cum / max_len**length_penalty  # (batch, beam)
        live_best, pos = norm.max(dim=1)  # (batch,)
        better = (live_best > best_score) & ~done  # (batch,)
        beams = tokens.view(batch, k, max_len)  # (batch, beam, max_len)
        live_seq = beams[torch.arange(batch, device=device), pos]  # (batch, max_len)
        best_seq = torch.where(better.unsqueeze(1), live_seq, best_seq)

    # Drop the columns that are padding in every row, as greedy_decode never makes them.
    lengths = _lengths(best_seq, end_id)  # (batch,)
    return best_seq[:, : int(lengths.max())]  # (batch, steps)


def _lengths(ids, end_id):
    """Tokens per row up to and including the first `end_id` (the row width when absent)."""
    is_end = ids == end_id  # (batch, steps)
    first = is_end.long().argmax(dim=1)  # (batch,)
    return torch.where(is_end.any(dim=1), first + 1, torch.full_like(first, ids.size(1)))


@torch.no_grad()
def decode_captions(
    decoder, features, vocab, beam_size=1, max_len=20, length_penalty=1.0
) -> tuple[list[list[int]], list[str]]:
    """Per-image id lists (through `end_id`, no padding) and their sentences via `vocab.decode`."""
    if beam_size == 1:
        ids = greedy_decode(decoder, features, max_len=max_len, pad_id=vocab.pad_id)
    else:
        ids = beam_search(
            decoder,
            features,
            beam_size=beam_size,
            max_len=max_len,
            length_penalty=length_penalty,
            pad_id=vocab.pad_id,
        )
    lengths = _lengths(ids, decoder.end_id).tolist()
    id_lists = [row[:n] for row, n in zip(ids.tolist(), lengths)]
    return id_lists, [vocab.decode(row) for row in id_lists]
