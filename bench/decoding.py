"""Caption decoding speed: batched greedy and beam search vs one image at a time."""

import torch

from bench.common import DECODER_VOCAB, row, timed

BATCH_SIZE = 64
MAX_LEN = 20
BEAM = 3


def sizes(quick):
    """Images decoded (batched, one at a time): greedy, then beam search. Rates are per image."""
    return ((64, 16), (64, 16)) if quick else ((512, 128), (256, 64))


def make_decoder():
    """Random DecoderRNN (embed 256, hidden 512, 10k words) that never emits `<end>`.

    Suppressing `<end>` makes every caption run all MAX_LEN steps, so both ways do equal work.
    """
    from model import DecoderRNN

    torch.manual_seed(0)
    decoder = DecoderRNN(256, 512, DECODER_VOCAB).eval()
    with torch.no_grad():
        decoder.fc.bias[decoder.end_id] = -1e4
    return decoder


def batched(decode, decoder, feats, **kwargs):
    """Rows of `decode` run on batches of BATCH_SIZE images."""
    return [
        r
        for i in range(0, len(feats), BATCH_SIZE)
        for r in decode(decoder, feats[i : i + BATCH_SIZE], max_len=MAX_LEN, **kwargs).tolist()
    ]


def run(workdir, quick):
    """Yield the greedy and beam-search rows (captions per second)."""
    from captioning.decoding import beam_search, greedy_decode

    decoder = make_decoder()
    (n_greedy, m_greedy), (n_beam, m_beam) = sizes(quick)
    feats = torch.randn(max(n_greedy, n_beam), 256)  # stand-ins for projected image features
    batched(greedy_decode, decoder, feats[:BATCH_SIZE])  # warm-up
    fast, fast_s = timed(batched, greedy_decode, decoder, feats[:n_greedy])
    slow, slow_s = timed(
        lambda: [decoder.sample(f.view(1, 1, -1), max_len=MAX_LEN) for f in feats[:m_greedy]]
    )
    same = sum(a == b for a, b in zip(fast, slow))
    yield row(
        "greedy decoding, batch 64 vs DecoderRNN.sample",
        n_greedy / fast_s,
        m_greedy / slow_s,
        "captions/s",
        target=10,
        higher_is_better=True,
        note=f"{n_greedy} vs {m_greedy} images, {MAX_LEN} steps each (<end> suppressed); "
        f"same ids {same}/{m_greedy}",
    )
    fast, fast_s = timed(batched, beam_search, decoder, feats[:n_beam], beam_size=BEAM)
    slow, slow_s = timed(
        lambda: [
            beam_search(decoder, f.view(1, -1), BEAM, MAX_LEN)[0].tolist() for f in feats[:m_beam]
        ]
    )
    same = sum(a == b for a, b in zip(fast, slow))
    yield row(
        f"beam search k={BEAM}, batch 64 vs one image",
        n_beam / fast_s,
        m_beam / slow_s,
        "captions/s",
        higher_is_better=True,
        note=f"{n_beam} vs {m_beam} images, {MAX_LEN} steps each (<end> suppressed); "
        f"same ids {same}/{m_beam}",
    )
    yield from run_transformer(quick)


def make_transformer():
    """Random TransformerDecoder of the COCO preset's sizes (6 + 6 layers, width 512, 8 heads,
    feed-forward 2048, 10k words) over a 7 x 7 grid of 2048 features; `<end>` suppressed."""
    from captioning.transformer import TransformerDecoder

    torch.manual_seed(0)
    decoder = TransformerDecoder(2048, DECODER_VOCAB, 512, 8, 6, 6, 2048, dropout=0.0).eval()
    with torch.no_grad():
        decoder.fc.bias[decoder.end_id] = -1e4
    return decoder


def run_transformer(quick):
    """Yield the transformer's row: greedy decoding with the key-value cache against re-running
    the prefix (`PrefixDecoder`) at every word, on the same batch."""
    from captioning.decoding import greedy_decode
    from captioning.transformer import PrefixDecoder

    decoder, images = make_transformer(), 8 if quick else 32
    grids = torch.randn(images, 49, 2048)  # stand-ins for ResNet grids at 224 px
    with torch.no_grad():
        greedy_decode(decoder, grids[:2], max_len=3)  # warm-up
        cached, cached_s = timed(greedy_decode, decoder, grids, max_len=MAX_LEN)
        rerun, rerun_s = timed(greedy_decode, PrefixDecoder(decoder), grids, max_len=MAX_LEN)
    same = sum(a == b for a, b in zip(cached.tolist(), rerun.tolist()))
    yield row(
        "transformer greedy, cached keys and values vs re-running the prefix",
        images / cached_s,
        images / rerun_s,
        "captions/s",
        higher_is_better=True,
        note=f"{images} images in one batch, {MAX_LEN} steps each (<end> suppressed), COCO "
        f"preset sizes; same ids {same}/{images}",
    )
