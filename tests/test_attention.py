"""The attention decoder (Show, Attend and Tell) and the encoder's spatial grid."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from captioning.caption import attention_maps
from captioning.caption import main as caption_main
from captioning.checkpoint import CheckpointError, load_trained
from captioning.data import feature_cache
from captioning.data.annotations import read_split
from captioning.data.loading import load_image, make_transform
from captioning.data.vocabulary import Vocabulary
from captioning.decoding import beam_search, decode_captions, greedy_decode
from captioning.demo.scoring import attention_on_objects, cells_overlapping, object_box
from captioning.demo.small_cnn import SmallCNN
from captioning.training.train import train
from model import AttentionDecoder, EncoderCNN, attention_penalty, scored_positions
from tests.helpers import (
    greedy_alone,
    tiny_config,
    train_cut_and_resumed,
)

FEATURES, EMBED, HIDDEN, VOCAB, PAD, END = 12, 8, 16, 10, 3, 1


def random_attention_decoder(seed=0, end_bias=0.0, **kwargs):
    """An attention decoder with random weights, scaled up so that its choices vary; with the
    word in the query and coverage unless `kwargs` say otherwise."""
    torch.manual_seed(seed)
    kwargs = {"word_in_query": True, "coverage": True, **kwargs}
    decoder = AttentionDecoder(FEATURES, EMBED, HIDDEN, VOCAB, **kwargs).eval()
    with torch.no_grad():
        for p in decoder.parameters():
            p.mul_(3)
        decoder.fc.bias[END] += end_bias
    return decoder


def captions_with_padding():
    """Two captions, `<start>` first; the second is two words shorter and padded."""
    return torch.tensor([[0, 4, 5, 6, 7, END], [0, 8, 9, END, PAD, PAD]])


@pytest.mark.parametrize("grid_shape", [(2, 4), (3, 3)])
def test_forward_shapes_and_weights_sum_to_one(grid_shape):
    decoder = random_attention_decoder()
    positions = grid_shape[0] * grid_shape[1]
    grid = torch.randn(2, positions, FEATURES)
    captions = captions_with_padding()
    scores, weights = decoder(grid, captions)
    assert scores.shape == (2, 5, VOCAB) and weights.shape == (2, 5, positions)
    assert torch.allclose(weights.sum(dim=2), torch.ones(2, 5))
    assert (weights > 0).all()  # soft attention: every position gets some


def test_scored_mask_selects_words_and_zeroes_padded_weights():
    decoder = random_attention_decoder()
    grid = torch.randn(2, 6, FEATURES)
    captions = captions_with_padding()
    scored = captions != PAD  # (batch, seq_len)
    scored[:, 0] = False
    all_scores, all_weights = decoder(grid, captions)
    scores, weights = decoder(grid, captions, scored_positions(scored))
    assert scores.shape == (8, VOCAB)  # 5 + 3 words predicted
    # A tolerance: oneDNN picks kernels by shape, so a subset of rows may differ in the last
    # bits on some CPUs (seen on an Intel Xeon).
    assert torch.allclose(scores, all_scores[scored[:, 1:]], rtol=1e-5, atol=1e-6)
    assert torch.allclose(weights[0], all_weights[0])
    assert torch.allclose(weights[1, :3], all_weights[1, :3])
    assert not weights[1, 3:].any()  # the padded steps carry no attention


def test_padding_does_not_change_a_captions_scores():
    decoder = random_attention_decoder()
    grid = torch.randn(2, 6, FEATURES)
    captions = captions_with_padding()
    batched, _ = decoder(grid, captions)
    alone, _ = decoder(grid[1:], captions[1:, :4])
    assert torch.allclose(batched[1, :3], alone[0], atol=1e-6)


def test_attention_follows_the_hidden_state_and_the_word_and_the_gate_scales_the_context():
    decoder = random_attention_decoder()
    grid = torch.randn(1, 6, FEATURES)
    h, c, _, _, projected = decoder.init_state(grid)
    word = decoder.embed(torch.tensor([3]))
    coverage = torch.rand(1, 6)
    context, weights = decoder.attend((h, c, coverage, grid, projected), word)
    query = decoder.hidden_attention(torch.cat([h, word], dim=1))
    covered = decoder.coverage_attention(coverage.unsqueeze(2))
    expected = decoder.attention_score(torch.tanh(projected + query + covered))
    assert torch.allclose(weights, expected.squeeze(2).softmax(dim=1))
    gate = torch.sigmoid(decoder.gate(h))  # (1, 1): one scalar per image
    assert gate.shape == (1, 1) and 0 < float(gate.detach()) < 1
    assert torch.allclose(context, gate * (weights.unsqueeze(2) * grid).sum(dim=1), atol=1e-6)
    other, _ = decoder.attend((torch.randn_like(h), c, coverage, grid, projected), word)
    assert not torch.allclose(context, other)
    other_word, _ = decoder.attend(
        (h, c, coverage, grid, projected), decoder.embed(torch.tensor([4]))
    )
    assert not torch.allclose(context, other_word)
    _, uncovered = decoder.attend((h, c, torch.zeros(1, 6), grid, projected), word)
    assert not torch.allclose(weights, uncovered)


def test_by_default_the_query_is_the_hidden_state_alone_as_in_the_paper():
    decoder = random_attention_decoder(word_in_query=False, coverage=False)
    assert decoder.coverage_attention is None
    grid = torch.randn(1, 6, FEATURES)
    h, c, _, _, projected = decoder.init_state(grid)
    state = (h, c, torch.rand(1, 6), grid, projected)
    _, weights = decoder.attend(state, decoder.embed(torch.tensor([3])))
    expected = decoder.attention_score(torch.tanh(projected + decoder.hidden_attention(h)))
    assert torch.allclose(weights, expected.squeeze(2).softmax(dim=1))
    # Neither the word nor the coverage moves the attention.
    _, other_word = decoder.attend(state, decoder.embed(torch.tensor([4])))
    _, uncovered = decoder.attend(
        (h, c, torch.zeros(1, 6), grid, projected), decoder.embed(torch.tensor([3]))
    )
    assert torch.equal(weights, other_word) and torch.equal(weights, uncovered)
    defaults = AttentionDecoder(FEATURES, EMBED, HIDDEN, VOCAB)
    assert not defaults.word_in_query and defaults.coverage_attention is None


def test_coverage_is_the_attention_each_position_has_had():
    decoder = random_attention_decoder()
    grid = torch.randn(2, 6, FEATURES)
    state = decoder.init_state(grid)
    assert not state[2].any()  # (batch, positions): nothing attended before the first word
    seen = []
    for word in (0, 4, 7):
        _, state, weights = decoder.step(torch.tensor([word, word]), state)
        seen.append(weights)
        assert torch.allclose(state[2], sum(seen), atol=1e-6)


def test_word_scores_read_the_hidden_state_the_context_and_the_previous_word():
    """The deep output of Xu et al. (eq. 7): fc(hidden_out(h_t) + context_out(z_t) + E y_{t-1})."""
    decoder = random_attention_decoder()
    grid = torch.randn(2, 6, FEATURES)
    state = decoder.init_state(grid)
    words = torch.tensor([4, 7])
    scores, new_state, _ = decoder.step(words, state)
    word = decoder.embed(words)
    context, _ = decoder.attend(state, word)
    lstm = decoder.lstm(torch.cat([word, context], 1), state[:2])
    assert torch.allclose(new_state[0], lstm[0]) and torch.allclose(new_state[1], lstm[1])
    deep = decoder.hidden_out(new_state[0]) + decoder.context_out(context) + word
    assert torch.allclose(scores, decoder.fc(deep), atol=1e-5)
    teacher, _ = decoder(grid, torch.stack([torch.zeros_like(words), words], dim=1))
    first, _, _ = decoder.step(torch.zeros_like(words), state)
    assert torch.allclose(teacher[:, 0], first, atol=1e-5)


def test_state_starts_from_the_mean_grid_feature():
    decoder = random_attention_decoder()
    grid = torch.randn(1, 6, FEATURES)
    shuffled = grid[:, torch.randperm(6)]
    h, c = decoder.init_state(grid)[:2]
    h2, c2 = decoder.init_state(shuffled)[:2]
    assert torch.allclose(h, h2, atol=1e-6) and torch.allclose(c, c2, atol=1e-6)
    assert torch.allclose(h, torch.tanh(decoder.init_h(grid.mean(dim=1))))


def test_stepping_greedily_gives_each_words_attention():
    decoder = random_attention_decoder(seed=2)
    grid = torch.randn(1, 6, FEATURES)
    ids, weights = greedy_alone(decoder, grid, max_len=7)
    assert ids[0] == 0 and type(ids) is list and all(type(i) is int for i in ids)
    assert len(ids) == 7 or ids[-1] == END
    assert weights.shape == (len(ids) - 1, 6)
    # Teacher-forcing the sampled caption reproduces its choices and weights step by step.
    scores, forced = decoder(grid, torch.tensor([ids]))
    assert scores[0].argmax(dim=1).tolist() == ids[1:]
    assert torch.allclose(forced[0], weights, atol=1e-6)


def test_attention_penalty_is_zero_when_every_position_gets_one_word():
    uniform = torch.full((1, 4, 4), 0.25)  # four words, each spreading over four positions
    assert float(attention_penalty(uniform)) == pytest.approx(0.0)
    peaked = torch.zeros(1, 4, 4)
    peaked[0, :, 0] = 1.0  # every word looks at position 0: it gets 4, the others 0
    assert float(attention_penalty(peaked)) == pytest.approx((9 + 1 + 1 + 1) / 4)
    decoder = random_attention_decoder(attention_weight=0.3)
    output = decoder(torch.randn(2, 6, FEATURES), captions_with_padding())
    assert torch.allclose(decoder.regulariser(output), 0.3 * attention_penalty(output.weights))


def test_forget_gate_bias_is_set():
    decoder = AttentionDecoder(FEATURES, EMBED, HIDDEN, VOCAB, forget_bias=5.0)
    assert torch.all(decoder.lstm.bias_ih[HIDDEN : 2 * HIDDEN] == 5.0)
    assert torch.all(decoder.lstm.bias_hh[HIDDEN : 2 * HIDDEN] == 0.0)


@pytest.mark.parametrize(
    "backbone, size, grid_size, positions, channels",
    [("smallcnn", 64, None, 16, 128), ("smallcnn", 64, 2, 4, 128), ("resnet18", 64, None, 4, 512),
     ("resnet18", 96, 2, 4, 512)],
)  # fmt: skip
def test_encoder_grid_is_the_last_feature_map(backbone, size, grid_size, positions, channels):
    encoder = EncoderCNN(8, SmallCNN() if backbone == "smallcnn" else backbone, pretrained=False)
    encoder.eval()
    images = torch.randn(2, 3, size, size)
    with torch.no_grad():
        grid = encoder.extract_grid(images, grid_size)
        pooled = encoder.extract(images)
    assert grid.shape == (2, positions, channels)
    if backbone == "smallcnn" and grid_size is None:  # the small CNN max-pools its own grid
        assert torch.allclose(grid.amax(dim=1), pooled, atol=1e-6)
    if backbone == "resnet18" and grid_size is None:  # a ResNet average-pools it
        assert torch.allclose(grid.mean(dim=1), pooled, atol=1e-5)


def unpadded(ids, weights, row):
    """Row `row` of batched ids (through `<end>`) and its words' weights."""
    tokens = ids[row].tolist()
    n = tokens.index(END) + 1 if END in tokens else len(tokens)
    return tokens[:n], weights[row, : n - 1]


@pytest.mark.parametrize("seed", [0, 1, 6])
def test_batched_greedy_equals_greedy_per_image(seed):
    decoder = random_attention_decoder(seed, end_bias=0.5)
    grids = torch.randn(5, 6, FEATURES)
    ids, weights = greedy_decode(decoder, grids, max_len=8, with_attention=True)
    assert weights.shape == (5, ids.size(1) - 1, 6)
    lengths = set()
    for row in range(5):
        expected_ids, expected_weights = greedy_alone(decoder, grids[row : row + 1], max_len=8)
        tokens, row_weights = unpadded(ids, weights, row)
        assert tokens == expected_ids
        assert torch.allclose(row_weights, expected_weights, atol=1e-6)
        assert not weights[row, len(tokens) - 1 :].any()  # nothing after `<end>`
        lengths.add(len(tokens))
    assert len(lengths) > 1  # rows end at different steps, so the padding is exercised


@pytest.mark.parametrize("seed", [0, 3])
def test_beam_one_equals_greedy_with_attention(seed):
    decoder = random_attention_decoder(seed)
    grids = torch.randn(4, 6, FEATURES)
    greedy_ids, greedy_weights = greedy_decode(decoder, grids, max_len=8, with_attention=True)
    beam_ids, beam_weights = beam_search(decoder, grids, 1, max_len=8, with_attention=True)
    assert torch.equal(beam_ids, greedy_ids)
    assert torch.allclose(beam_weights, greedy_weights, atol=1e-6)


@pytest.mark.parametrize("beam_size, penalty", [(2, 1.0), (3, 0.0), (4, 2.0)])
def test_beam_weights_are_those_of_the_returned_caption_and_batch_invariant(beam_size, penalty):
    decoder = random_attention_decoder(2, end_bias=0.5)
    grids = torch.randn(12, 6, FEATURES) * 3  # varied images: beams overtake each other
    options = dict(beam_size=beam_size, max_len=8, length_penalty=penalty, with_attention=True)
    ids, weights = beam_search(decoder, grids, **options)
    for row in range(12):
        tokens, row_weights = unpadded(ids, weights, row)
        alone_ids, alone_weights = beam_search(decoder, grids[row : row + 1], **options)
        assert unpadded(alone_ids, alone_weights, 0)[0] == tokens
        assert torch.allclose(alone_weights[0, : len(tokens) - 1], row_weights, atol=1e-6)
        # Teacher-forcing the returned caption gives the same weights, word by word.
        _, forced = decoder(grids[row : row + 1], torch.tensor([tokens]))
        assert torch.allclose(forced[0], row_weights, atol=1e-5)


def test_decode_captions_works_for_the_attention_decoder():
    decoder = random_attention_decoder(1)
    vocab = Vocabulary.from_dict({"words": ["<start>", "<end>", "<unk>", "<pad>", *"abcdef"]})
    ids, texts = decode_captions(decoder, torch.randn(3, 6, FEATURES), vocab, beam_size=2)
    assert len(ids) == len(texts) == 3 and all(i[0] == 0 for i in ids)


def test_attention_training_resumes_exactly_like_an_uninterrupted_run(
    demo_root, tmp_path, monkeypatch
):
    config = dict(decoder="attention", epochs=3, dropout=0.2)
    full, resumed = train_cut_and_resumed(demo_root, tmp_path, monkeypatch, **config)
    assert full["train_loss"][-1] < full["train_loss"][0]
    assert resumed["step_loss"] == full["step_loss"] and resumed["val_loss"] == full["val_loss"]
    model, _, loaded = load_trained(tmp_path / "full" / "best.pt", decoder="attention")
    assert isinstance(model.decoder, AttentionDecoder) and loaded.decoder == "attention"
    with pytest.raises(
        CheckpointError, match="a checkpoint of a 'attention' decoder, not 'showtell'"
    ):
        load_trained(tmp_path / "full" / "best.pt", decoder="showtell")
    with pytest.raises(
        CheckpointError, match="decoder: checkpoint 'attention' vs config 'showtell'"
    ):
        train(tiny_config(demo_root, tmp_path / "full", epochs=4, resume=True))


def test_grid_feature_cache_equals_the_grid_and_follows_the_weights(demo_root, tmp_path):
    split = read_split(demo_root, "val")
    transform = make_transform(32)
    torch.manual_seed(0)
    encoder = EncoderCNN(8, SmallCNN(), grid=True)
    cached = feature_cache.cached_features(
        encoder, split, transform, cache_dir=tmp_path, progress=False
    )
    images = torch.stack([transform(load_image(p)) for p in split.image_paths])
    with torch.no_grad():
        grids = encoder.eval().backbone_features(images)  # (images, 4, 128) at 32 px
    assert cached.shape == grids.shape == (len(split.image_ids), 4, 128)
    assert np.allclose(cached, grids.numpy().astype(np.float16), atol=1e-3)
    pooled = EncoderCNN(8, SmallCNN())
    pooled.backbone.load_state_dict(encoder.backbone.state_dict())
    keys = {
        feature_cache.cache_key(e, split, transform)
        for e in (encoder, pooled, EncoderCNN(8, SmallCNN(), grid=True),
                  EncoderCNN(8, SmallCNN(), grid=True, grid_size=1))
    }  # fmt: skip
    assert len(keys) == 4  # grid or pooled, other weights, other grid size: another cache


def test_blind_attention_model_sees_a_zero_grid(demo_root, tmp_path):
    config = tiny_config(demo_root, tmp_path, decoder="attention", blind=True, epochs=1)
    train(config)
    model, _, _ = load_trained(tmp_path / "best.pt")
    assert torch.equal(model.encode(torch.randn(2, 3, 32, 32)), torch.zeros(2, 1, 128))


def test_attention_on_the_named_object_on_hand_made_maps(demo_root):
    annotations = demo_root / "annotations" / "captions_val2017.json"
    images = json.loads(annotations.read_text())["images"]
    image = next(i for i in images if len(i["objects"]) == 1)
    obj, size, side = image["objects"][0], image["width"], 4
    cell = size / side
    inside = int((obj["y"] + 0.5) // cell) * side + int((obj["x"] + 0.5) // cell)
    overlapping = cells_overlapping(object_box(obj, size), side, cell)
    far = next(c for c in range(side * side) if not overlapping.flat[c])
    words = ["a", obj["color"], obj["shape"], "<end>"]

    def peaked_at(position):
        weights = torch.full((len(words), side * side), 0.01)
        weights[:, position] = 1.0
        return weights

    on = attention_on_objects({image["id"]: (words, peaked_at(inside))}, annotations)
    off = attention_on_objects({image["id"]: (words, peaked_at(far))}, annotations)
    assert on["on_object"] == 1.0 and off["on_object"] == 0.0 and on["words"] == 2
    assert on["chance"] == pytest.approx(overlapping.mean()) and 0 < on["chance"] < 0.5
    wrong_colour = [w if w != obj["color"] else "plaid" for w in words]
    none = attention_on_objects({image["id"]: (wrong_colour, peaked_at(inside))}, annotations)
    assert none == {"on_object": None, "on_another_object": None, "chance": None, "words": 0}
    assert on["on_another_object"] == off["on_another_object"] == 0.0  # no other object here
    # Two objects, the first named: a peak on the second alone counts as on another object.
    for pair in (i for i in images if len(i["objects"]) == 2):
        named, other = (cells_overlapping(object_box(o, size), side, cell) for o in pair["objects"])
        only_other, neither = other & ~named, ~(named | other)
        if only_other.any() and neither.any():
            break
    words = ["a", pair["objects"][0]["color"], pair["objects"][0]["shape"], "<end>"]
    for cells, expected in ((only_other, 1.0), (neither, 0.0)):
        peak = int(cells.flatten().nonzero()[0][0])
        seen = attention_on_objects({pair["id"]: (words, peaked_at(peak))}, annotations)
        assert seen["on_object"] == 0.0 and seen["on_another_object"] == expected


def test_caption_command_draws_each_words_attention(demo_root, tmp_path):
    train(tiny_config(demo_root, tmp_path / "run", decoder="attention", epochs=1))
    checkpoint = tmp_path / "run" / "best.pt"
    paths = read_split(demo_root, "test").image_paths[:2]
    maps = attention_maps(checkpoint, paths, max_len=6)
    model, vocab, _ = load_trained(checkpoint)
    for path in paths:
        words, weights = maps[path]
        grid = model.encode(make_transform(32)(load_image(path)).unsqueeze(0))
        ids, expected = greedy_alone(model.decoder, grid, max_len=6)
        assert words == [vocab.idx2word[i] for i in ids[1:]]
        assert torch.allclose(weights, expected, atol=1e-6)
    caption_main([str(checkpoint), *paths, "--draw", str(tmp_path / "drawn"), "--attention"])
    for path in paths:
        assert (tmp_path / "drawn" / f"{Path(path).stem}_attention.png").stat().st_size > 1000
    train(tiny_config(demo_root, tmp_path / "showtell", epochs=1))
    with pytest.raises(CheckpointError, match="not 'attention'"):
        attention_maps(tmp_path / "showtell" / "best.pt", paths)


def test_training_minimises_the_weighted_regulariser(demo_root, tmp_path):
    # The same run with the regulariser weighted 0 and 5: only the penalty differs, so the
    # weights differ only if training adds it to the loss it minimises.
    weights = []
    for k, weight in enumerate((0.0, 5.0)):
        train(tiny_config(demo_root, tmp_path / str(k), decoder="attention", epochs=1,
                          attention_weight=weight))  # fmt: skip
        weights.append(load_trained(tmp_path / str(k) / "last.pt")[0].decoder.state_dict())
    assert not torch.equal(
        weights[0]["attention_score.weight"], weights[1]["attention_score.weight"]
    )
