"""The transformer decoder (captioning/transformer.py): its layers, masks and cache, decoding with
it, training, checkpoints, presets and attention maps."""

import dataclasses
from pathlib import Path

import pytest
import torch

from captioning.caption import attention_maps
from captioning.caption import main as caption_main
from captioning.checkpoint import CheckpointError, build_model, load_trained
from captioning.config import ConfigError, TrainConfig
from captioning.data.annotations import read_split
from captioning.data.loading import load_image, make_transform
from captioning.data.vocabulary import Vocabulary
from captioning.decoding import beam_search, decode_captions, greedy_decode, sample_decode
from captioning.demo.scoring import attention_on_objects
from captioning.presets import (
    coco_config,
    preset_config,
)
from captioning.training.train import train
from captioning.transformer import PrefixDecoder, TransformerDecoder, grid_positions, sinusoids
from model import scored_positions
from tests.helpers import (
    ROOT,
    greedy_alone,
    tiny_config,
    train_cut_and_resumed,
)
from tests.test_self_critical import training_reward

FEATURES, VOCAB, WIDTH, HEADS, PAD, END = 12, 10, 16, 4, 3, 1
# A transformer small enough for the test data: 1 encoder and 1 decoder layer 32 wide.
TINY = dict(decoder="transformer", embed_size=32, heads=4, encoder_layers=1, decoder_layers=1,
            feed_forward=64, dropout=0.1)  # fmt: skip


# Single-threaded torch: these tiny ops only lose time to thread hand-offs on a busy CPU.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def random_transformer(seed=0, end_bias=0.0, layers=2, **kwargs):
    """A small transformer in eval mode with random weights, scaled so that its choices vary
    (with Glorot's weights and the word embedding in the residual stream, a random transformer
    mostly repeats the word it read); `<end>` raised by `end_bias`."""
    torch.manual_seed(seed)
    decoder = TransformerDecoder(FEATURES, VOCAB, WIDTH, HEADS, layers, layers, 32, **kwargs)
    with torch.no_grad():
        for p in decoder.parameters():
            if p.dim() > 1:
                p.mul_(3)
        decoder.embed.weight.div_(18)
        decoder.fc.bias[END] += end_bias
    return decoder.eval()


def captions_with_padding():
    """Two captions, `<start>` first; the second is two words shorter and padded."""
    return torch.tensor([[0, 4, 5, 6, 7, END], [0, 8, 9, END, PAD, PAD]])


def test_shapes_and_the_state_grows_one_word_a_step():
    decoder = random_transformer()
    grid = torch.randn(2, 9, FEATURES)
    output = decoder(grid, captions_with_padding())
    assert output.scores.shape == (2, 5, VOCAB) and output.weights.shape == (2, 5, 9)
    assert torch.allclose(output.weights.sum(dim=2), torch.ones(2, 5))
    cross, cache = decoder.init_state(grid)
    assert cross.shape == (2, 2, 2, 9, WIDTH)  # (batch, layers, keys and values, positions, width)
    assert cache.shape == (2, 2, 2, 0, WIDTH)  # no word read yet
    state = (cross, cache)
    for t in range(1, 4):
        scores, state, weights = decoder.step(torch.tensor([0, 4]), state)
        assert scores.shape == (2, VOCAB) and weights.shape == (2, 9)
        assert state[0] is cross and state[1].shape == (2, 2, 2, t, WIDTH)
    assert decoder.regulariser(output) == 0.0  # nothing is added to the loss


def test_the_layers_compute_what_torchs_layers_compute():
    decoder = random_transformer()
    layer = decoder.layers[0]
    words, memory = torch.randn(3, 6, WIDTH), torch.randn(3, 9, WIDTH)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(6)
    with torch.no_grad():
        expected = layer(words, memory, tgt_mask=causal, tgt_is_causal=True)
        cross = decoder._keys_values(layer.multihead_attn, memory)
        ours, keys_values, _ = decoder._run_layer(layer, words, words.new_zeros(3, 2, 0, WIDTH),
                                                  cross)  # fmt: skip
        # One word at a time after the cache of the earlier ones: the same outputs.
        past, steps = words.new_zeros(3, 2, 0, WIDTH), []
        for t in range(6):
            out, past, _ = decoder._run_layer(layer, words[:, t : t + 1], past, cross)
            steps.append(out)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat(steps, dim=1), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(past, keys_values)
    # The encoder is torch's, pre-norm, after the projection and the position code.
    grid = torch.randn(3, 9, FEATURES)
    code = grid_positions(9, WIDTH)
    expected = decoder.encoder.norm(
        decoder.encoder.layers[1](decoder.encoder.layers[0](decoder.grid_embed(grid) + code))
    )
    torch.testing.assert_close(decoder.encode(grid), expected, rtol=1e-5, atol=1e-5)
    assert all(layer.norm_first for layer in [*decoder.layers, *decoder.encoder.layers])


def test_a_later_word_changes_no_earlier_output():
    decoder = random_transformer()
    grid = torch.randn(1, 9, FEATURES)
    captions = torch.tensor([[0, 4, 5, 6, 7, 8]])
    with torch.no_grad():
        scores, weights = decoder(grid, captions)
        for k in range(1, 5):  # change word k: outputs 0 to k - 1 read words 0 to k - 1 only
            changed = captions.clone()
            changed[0, k] = 9
            other, other_weights = decoder(grid, changed)
            torch.testing.assert_close(other[:, :k], scores[:, :k], rtol=0, atol=1e-6)
            torch.testing.assert_close(other_weights[:, :k], weights[:, :k], rtol=0, atol=1e-7)
            assert not torch.allclose(other[:, k], scores[:, k], atol=1e-3)


def test_padding_changes_no_real_words_scores_and_the_scored_mask_selects():
    decoder = random_transformer()
    grid = torch.randn(2, 9, FEATURES)
    captions = captions_with_padding()
    with torch.no_grad():
        batched, batched_weights = decoder(grid, captions)
        alone, alone_weights = decoder(grid[1:], captions[1:, :4])  # the second without its pads
        scored = captions != PAD
        scored[:, 0] = False
        selected, weights = decoder(grid, captions, scored_positions(scored))
    torch.testing.assert_close(batched[1, :3], alone[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(batched_weights[1, :3], alone_weights[0], rtol=1e-5, atol=1e-7)
    assert selected.shape == (8, VOCAB)  # 5 + 3 words predicted
    torch.testing.assert_close(selected, batched[scored[:, 1:]], rtol=1e-5, atol=1e-6)
    assert torch.equal(weights[0], batched_weights[0]) and not weights[1, 3:].any()


def test_the_grid_has_a_2d_position_code():
    code = grid_positions(16, 8)  # a 4 x 4 grid, flattened row by row
    rows, cols = code[:, :4], code[:, 4:]
    assert torch.equal(rows[0], rows[3]) and not torch.equal(rows[0], rows[4])  # same row
    assert torch.equal(cols[1], cols[5]) and not torch.equal(cols[1], cols[2])  # same column
    assert torch.equal(rows[4], sinusoids(torch.tensor([1]), 4)[0])
    assert grid_positions(6, 8).shape == (6, 8)  # not square: the flattened index's code
    assert torch.equal(grid_positions(6, 7), sinusoids(torch.arange(6), 7))
    # The code tells the cells apart: shuffling the grid changes the captioner's scores.
    decoder = random_transformer()
    grid = torch.randn(1, 9, FEATURES)
    words = torch.tensor([[0, 4, 5]])
    with torch.no_grad():
        shuffled = decoder(grid[:, torch.randperm(9, generator=torch.Generator().manual_seed(1))],
                           words).scores  # fmt: skip
        assert not torch.allclose(decoder(grid, words).scores, shuffled, atol=1e-4)


def unpadded(ids, weights, row):
    """Row `row` of batched ids (through `<end>`) and its words' weights."""
    tokens = ids[row].tolist()
    n = tokens.index(END) + 1 if END in tokens else len(tokens)
    return tokens, weights[row, : n - 1]


def trimmed(ids, weights, row):
    """`unpadded` with the ids cut after `<end>`."""
    tokens, row_weights = unpadded(ids, weights, row)
    return tokens[: len(row_weights) + 1], row_weights


@pytest.mark.parametrize("seed", [1, 2])
def test_batched_greedy_equals_greedy_per_image(seed):
    decoder = random_transformer(seed, end_bias=2.0)
    grids = torch.randn(6, 9, FEATURES)
    ids, weights = greedy_decode(decoder, grids, max_len=8, with_attention=True)
    lengths = set()
    for row in range(6):
        expected_ids, expected_weights = greedy_alone(decoder, grids[row : row + 1], max_len=8)
        tokens, row_weights = trimmed(ids, weights, row)
        assert tokens == expected_ids
        torch.testing.assert_close(row_weights, expected_weights, rtol=1e-5, atol=1e-6)
        assert not weights[row, len(tokens) - 1 :].any()  # nothing after `<end>`
        lengths.add(len(tokens))
    assert len(lengths) > 1  # rows end at different steps, so the padding is exercised


@pytest.mark.parametrize("seed", [1, 5])
def test_beam_one_equals_greedy(seed):
    decoder = random_transformer(seed, end_bias=2.0)
    grids = torch.randn(5, 9, FEATURES)
    greedy_ids, greedy_weights = greedy_decode(decoder, grids, max_len=8, with_attention=True)
    beam_ids, beam_weights = beam_search(decoder, grids, 1, max_len=8, with_attention=True)
    assert torch.equal(beam_ids, greedy_ids)
    torch.testing.assert_close(beam_weights, greedy_weights, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", [2, 4])
def test_cached_greedy_equals_rerunning_the_prefix(seed):
    decoder = random_transformer(seed, end_bias=2.0)
    grids = torch.randn(6, 9, FEATURES)
    ids, weights = greedy_decode(decoder, grids, max_len=10, with_attention=True)
    slow_ids, slow_weights = greedy_decode(PrefixDecoder(decoder), grids, max_len=10,
                                           with_attention=True)  # fmt: skip
    assert torch.equal(ids, slow_ids)
    torch.testing.assert_close(weights, slow_weights, rtol=1e-5, atol=1e-6)
    # And step by step, the cached scores are those of the prefix re-run.
    state, slow, word = decoder.init_state(grids), PrefixDecoder(decoder), ids[:, 0]
    slow_state = slow.init_state(grids)
    for t in range(ids.size(1) - 1):
        scores, state, _ = decoder.step(word, state)
        expected, slow_state, _ = slow.step(word, slow_state)
        torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-5)
        word = ids[:, t + 1]


@pytest.mark.parametrize("beam_size, penalty", [(2, 1.0), (3, 0.0), (4, 2.0)])
def test_cached_beam_search_equals_rerunning_the_prefix(beam_size, penalty):
    decoder = random_transformer(2, end_bias=2.0)
    grids = torch.randn(6, 9, FEATURES) * 3  # varied images: beams overtake each other
    options = dict(beam_size=beam_size, max_len=8, length_penalty=penalty, with_attention=True)
    ids, weights = beam_search(decoder, grids, **options)
    slow_ids, slow_weights = beam_search(PrefixDecoder(decoder), grids, **options)
    assert torch.equal(ids, slow_ids)
    torch.testing.assert_close(weights, slow_weights, rtol=1e-5, atol=1e-6)
    for row in range(6):
        tokens, row_weights = trimmed(ids, weights, row)
        alone_ids, alone_weights = beam_search(decoder, grids[row : row + 1], **options)
        assert trimmed(alone_ids, alone_weights, 0)[0] == tokens  # batch invariant
        # Teacher-forcing the returned caption gives its weights, word by word.
        forced = decoder(grids[row : row + 1], torch.tensor([tokens])).weights
        torch.testing.assert_close(forced[0], row_weights, rtol=1e-5, atol=1e-5)


def test_the_attention_layer_is_a_choice():
    decoder = random_transformer(layers=3)
    grid = torch.randn(2, 9, FEATURES)
    captions = captions_with_padding()
    last = decoder(grid, captions).weights
    assert decoder.attention_layer == 2  # -1: the last
    decoder.attention_layer = 0
    first = decoder(grid, captions).weights
    assert not torch.allclose(first, last, atol=1e-3)
    assert torch.allclose(first.sum(dim=2), torch.ones(2, 5))
    # By hand: layer 0's cross-attention, softmax per head, then the mean over the heads.
    layer = decoder.layers[0]
    words = decoder.embed(captions[:, :-1]) * WIDTH**0.5 + sinusoids(torch.arange(5), WIDTH)
    h, causal = layer.norm1(words), torch.ones(5, 5).triu(1).bool()
    words = words + layer.self_attn(h, h, h, attn_mask=causal)[0]
    memory = decoder.encode(grid)
    _, heads = layer.multihead_attn(
        layer.norm2(words), memory, memory, average_attn_weights=False
    )  # (batch, heads, words, positions)
    torch.testing.assert_close(first, heads.mean(dim=1), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="attention_layer 3: the decoder has 3 layers"):
        decoder.attention_layer = 3
    # One head instead of their average.
    for head in range(HEADS):
        decoder.attention_head = head
        torch.testing.assert_close(decoder(grid, captions).weights, heads[:, head])
    with pytest.raises(ValueError, match=f"attention_head {HEADS}: the decoder has {HEADS} heads"):
        decoder.attention_head = HEADS


def test_decode_captions_and_sampling_work_for_the_transformer():
    decoder = random_transformer(1)
    vocab = Vocabulary.from_dict({"words": ["<start>", "<end>", "<unk>", "<pad>", *"abcdef"]})
    ids, texts = decode_captions(decoder, torch.randn(3, 9, FEATURES), vocab, beam_size=2)
    assert len(ids) == len(texts) == 3 and all(i[0] == 0 for i in ids)
    samples = sample_decode(decoder, torch.randn(2, 9, FEATURES), samples=3, max_len=6)
    assert samples.ids.shape[0] == 6 and samples.log_probs.shape == samples.mask.shape


def test_config_builds_the_transformer_on_the_grid_and_checks_the_heads(demo_root, tmp_path):
    config = tiny_config(demo_root, tmp_path, **TINY)
    vocab = Vocabulary.from_dict({"words": ["<start>", "<end>", "<unk>", "<pad>", *"abcdef"]})
    model = build_model(config, vocab)
    decoder = model.decoder
    assert isinstance(decoder, TransformerDecoder) and model.encoder.grid
    assert (decoder.width, decoder.heads, len(decoder.encoder.layers), len(decoder.layers)) == (
        32, 4, 1, 1,
    )  # fmt: skip
    assert decoder.layers[0].linear1.out_features == 64 and decoder.dropout.p == 0.1
    with pytest.raises(ConfigError, match="TrainConfig.heads: 5 does not divide embed_size 32"):
        tiny_config(demo_root, tmp_path, **{**TINY, "heads": 5})
    tiny_config(demo_root, tmp_path, heads=5)  # other decoders have no heads to check


def test_training_resumes_exactly_like_an_uninterrupted_run(demo_root, tmp_path, monkeypatch):
    full, resumed = train_cut_and_resumed(demo_root, tmp_path, monkeypatch, **TINY)
    assert full["train_loss"][-1] < full["train_loss"][0]
    assert resumed["step_loss"] == full["step_loss"] and resumed["val_loss"] == full["val_loss"]
    model, _, loaded = load_trained(tmp_path / "full" / "best.pt", decoder="transformer")
    assert isinstance(model.decoder, TransformerDecoder) and loaded.decoder == "transformer"
    for other in ("attention", "showtell"):
        with pytest.raises(
            CheckpointError, match=f"a checkpoint of a 'transformer' decoder, not '{other}'"
        ):
            load_trained(tmp_path / "full" / "best.pt", decoder=other)
    with pytest.raises(
        CheckpointError, match="decoder: checkpoint 'transformer' vs config 'attention'"
    ):
        train(tiny_config(demo_root, tmp_path / "full", decoder="attention", epochs=4,
                          resume=True))  # fmt: skip


def test_self_critical_stage_raises_training_reward_on_the_grid_feature_cache(demo_root, tmp_path):
    # A frozen CNN: both stages read the grid from the feature cache.
    config = tiny_config(demo_root, tmp_path, **{**TINY, "dropout": 0.0}, trainable_blocks=0,
                         epochs=4, lr=3e-3, scst_epochs=3, scst_lr=1e-3)  # fmt: skip
    history = train(config)
    assert history["stage"] == ["xe"] * 4 + ["scst"] * 3
    before = training_reward(tmp_path / "best_cross_entropy.pt", demo_root)
    after = training_reward(tmp_path / "last.pt", demo_root)
    assert after > before * 1.05, (before, after)  # measured: 0.244 to 0.280
    assert history["reward"][-1] > history["reward"][4]
    assert isinstance(load_trained(tmp_path / "last.pt")[0].decoder, TransformerDecoder)


def test_blind_transformer_sees_a_zero_grid(demo_root, tmp_path):
    train(tiny_config(demo_root, tmp_path, **TINY, blind=True, epochs=1))
    model, _, _ = load_trained(tmp_path / "best.pt")
    grid = model.encode(torch.randn(2, 3, 32, 32))
    assert torch.equal(grid, torch.zeros(2, 1, 128))
    with torch.no_grad():
        assert greedy_decode(model.decoder, grid, max_len=5).shape[0] == 2


def test_caption_command_draws_the_transformers_cross_attention(demo_root, tmp_path, monkeypatch):
    train(tiny_config(demo_root, tmp_path / "run", **{**TINY, "decoder_layers": 2}, epochs=1))
    checkpoint = tmp_path / "run" / "best.pt"
    split = read_split(demo_root, "test")
    paths = split.image_paths[:3]
    maps = attention_maps(checkpoint, paths, max_len=6)
    model, vocab, _ = load_trained(checkpoint)
    for path in paths:
        words, weights = maps[path]
        grid = model.encode(make_transform(32)(load_image(path)).unsqueeze(0))
        with torch.no_grad():
            ids, expected = greedy_alone(model.decoder, grid, max_len=6)
        assert words == [vocab.idx2word[i] for i in ids[1:]]
        torch.testing.assert_close(weights, expected, rtol=1e-5, atol=1e-6)
        assert weights.shape[1] == 4  # the small CNN's 2 x 2 grid at 32 px
    first = attention_maps(checkpoint, paths, max_len=6, layer=0)
    assert any(not torch.allclose(first[p][1], maps[p][1]) for p in paths)
    with pytest.raises(ValueError, match="attention_layer 2: the decoder has 2 layers"):
        attention_maps(checkpoint, paths, max_len=6, layer=2)
    # One head's maps; the four heads' average is the default map.
    heads = [attention_maps(checkpoint, paths, max_len=6, head=h) for h in range(4)]
    for path in paths:
        each = torch.stack([h[path][1] for h in heads])  # (heads, words, positions)
        assert not torch.allclose(each[0], each[1])
        torch.testing.assert_close(each.mean(dim=0), maps[path][1])
    # The demo's check of where object words look reads these maps as it reads attention's.
    annotations = demo_root / "annotations" / "captions_test2017.json"
    by_id = {i: maps[p] for i, p in zip(split.image_ids, paths)}
    assert set(attention_on_objects(by_id, annotations)) == {
        "on_object", "on_another_object", "chance", "words"
    }  # fmt: skip
    caption_main([str(checkpoint), *paths[:2], "--draw", str(tmp_path / "drawn"), "--attention"])
    for path in paths[:2]:
        assert (tmp_path / "drawn" / f"{Path(path).stem}_attention.png").stat().st_size > 1000
    # --attention-layer K draws layer K's maps, counted from 1.
    import captioning.caption

    drawn = {}
    monkeypatch.setattr(captioning.caption, "draw_attention", lambda maps, _: drawn.update(maps))
    caption_main([str(checkpoint), *paths[:2], "--draw", str(tmp_path / "drawn"), "--attention",
                  "--attention-layer", "1", "--max-len", "6"])  # fmt: skip
    for path in paths[:2]:
        torch.testing.assert_close(drawn[path][1], first[path][1])
    with pytest.raises(SystemExit):
        caption_main([str(checkpoint), paths[0], "--draw", str(tmp_path), "--attention-layer", "1"])
    train(tiny_config(demo_root, tmp_path / "showtell", epochs=1))
    with pytest.raises(CheckpointError, match="not 'attention' or 'transformer'"):
        attention_maps(tmp_path / "showtell" / "best.pt", paths)


# ruotianluo/ImageCaptioning.pytorch configs/transformer/transformer.yml (docs/coco_recipes.md).
RUOTIANLUO = dict(decoder="transformer", encoder_layers=6, decoder_layers=6, embed_size=512,
                  heads=8, feed_forward=2048, dropout=0.1, epochs=15, batch_size=10,
                  captions_per_image=5, warmup_steps=20000, lr=3.125e-4)  # fmt: skip


def test_coco_preset_is_ruotianluos_transformer_and_the_table_names_its_fields():
    config = coco_config("transformer")
    assert {k: getattr(config, k) for k in RUOTIANLUO} == RUOTIANLUO
    assert config.grid_size == 14 and config.scst_lr == 1e-5  # attention's grid; transformer_nsc
    assert pytest.approx(512**-0.5 * 20000**-0.5) == config.lr  # Noam's peak
    assert preset_config("coco", decoder="transformer") == config
    table = (ROOT / "docs" / "coco_recipes.md").read_text()
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        if getattr(config, f.name) != getattr(defaults, f.name) or f.name in RUOTIANLUO:
            assert f"`{f.name}`" in table, f.name
