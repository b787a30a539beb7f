"""The decoder protocol every decoder speaks (`model`): one alignment for teacher-forced scores
and step-by-step decoding, a batch-first state, and the regulariser as a method."""

from dataclasses import asdict, replace

import pytest
import torch

from captioning.checkpoint import GRID_DECODERS, build_model, load_trained, save_checkpoint
from captioning.config import resume_conflicts
from captioning.data.vocabulary import Vocabulary
from captioning.transformer import TransformerDecoder
from model import AttentionDecoder, DecoderOutput, DecoderRNN, scored_positions
from tests.helpers import tiny_config

FEATURES, EMBED, HIDDEN, VOCAB = 12, 8, 16, 10
DECODERS = {
    "showtell": lambda: (DecoderRNN(EMBED, HIDDEN, VOCAB), torch.randn(3, EMBED)),
    "showtell-2-layers": lambda: (DecoderRNN(EMBED, HIDDEN, VOCAB, 2), torch.randn(3, EMBED)),
    "attention": lambda: (AttentionDecoder(FEATURES, EMBED, HIDDEN, VOCAB), torch.randn(3, 5, FEATURES)),
    "attention-options": lambda: (
        AttentionDecoder(FEATURES, EMBED, HIDDEN, VOCAB, word_in_query=True, coverage=True),
        torch.randn(3, 5, FEATURES),
    ),
    "transformer": lambda: (
        TransformerDecoder(FEATURES, VOCAB, EMBED, 2, 2, 2, HIDDEN), torch.randn(3, 4, FEATURES)
    ),
    "transformer-first-layer-attention": lambda: (
        TransformerDecoder(FEATURES, VOCAB, EMBED, 4, 1, 3, HIDDEN, attention_layer=0),
        torch.randn(3, 5, FEATURES),
    ),
}  # fmt: skip


def make(kind):
    """A decoder of `kind` in eval mode with random weights, and features for 3 images."""
    torch.manual_seed(0)
    decoder, features = DECODERS[kind]()
    return decoder.eval(), features


@pytest.mark.parametrize("kind", DECODERS)
def test_teacher_forced_output_t_is_the_step_that_reads_word_t(kind):
    decoder, features = make(kind)
    captions = torch.tensor([[0, 4, 5, 6, 1], [0, 7, 1, 3, 3], [0, 8, 8, 9, 2]])
    with torch.no_grad():
        output = decoder.score(features, captions)
        assert isinstance(output, DecoderOutput)
        assert output.scores.shape == (3, 4, VOCAB)  # output t predicts captions[:, t + 1]
        state, steps, weights = decoder.init_state(features), [], []
        for t in range(4):
            scores, state, alpha = decoder.step(captions[:, t], state)
            steps.append(scores)
            weights.append(alpha)
    torch.testing.assert_close(output.scores, torch.stack(steps, dim=1), rtol=1e-5, atol=1e-5)
    if kind.startswith(GRID_DECODERS):
        assert output.weights.shape == (3, 4, features.size(1))
        torch.testing.assert_close(output.weights, torch.stack(weights, dim=1))
    else:
        assert output.weights is None and weights == [None] * 4


@pytest.mark.parametrize("kind", DECODERS)
def test_the_state_is_batch_first(kind):
    decoder, features = make(kind)
    rows = torch.tensor([2, 0, 0])
    words = torch.tensor([4, 5, 6])
    with torch.no_grad():
        state = decoder.init_state(features)
        assert all(s.shape[0] == 3 for s in state)
        reordered = tuple(s.index_select(0, rows) for s in state)
        scores, _, _ = decoder.step(words[rows], reordered)
        expected, _, _ = decoder.step(words[rows], decoder.init_state(features[rows]))
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", DECODERS)
def test_scored_mask_keeps_only_the_words_to_predict(kind):
    decoder, features = make(kind)
    captions = torch.tensor([[0, 4, 5, 6, 1], [0, 7, 1, 3, 3], [0, 8, 8, 9, 2]])
    scored = captions != 3
    scored[:, 0] = False
    with torch.no_grad():
        full = decoder.score(features, captions).scores  # (3, 4, VOCAB)
        only = decoder.score(features, captions, scored_positions(scored)).scores  # (n, VOCAB)
    torch.testing.assert_close(only, full[scored[:, 1:]], rtol=1e-5, atol=1e-6)


def test_show_and_tell_adds_nothing_to_its_loss():
    decoder, features = make("showtell")
    output = decoder.score(features, torch.tensor([[0, 4, 1]] * 3))
    assert decoder.regulariser(output) == 0.0


def test_attention_checkpoints_from_before_the_options_load_with_both_on(demo_root, tmp_path):
    # Before `word_in_query` and `coverage` were options, the attention decoder had both built in:
    # its checkpoints' configs lack the fields, and their weights need both.
    config = tiny_config(demo_root, tmp_path, decoder="attention", word_in_query=True,
                         coverage=True)  # fmt: skip
    vocab = Vocabulary.from_dict({"words": ["<start>", "<end>", "<unk>", "<pad>", *"abcdef"]})
    torch.manual_seed(0)
    model = build_model(config, vocab)
    old = {k: v for k, v in asdict(config).items() if k not in ("word_in_query", "coverage")}
    state = {"config": old, "vocab": vocab.to_dict(), "model": model.state_dict()}
    save_checkpoint(state, tmp_path / "old.pt")
    loaded, _, loaded_config = load_trained(tmp_path / "old.pt")
    assert loaded_config.word_in_query and loaded_config.coverage
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert resume_conflicts(old, config) == []  # resuming it with both on changes nothing
    assert resume_conflicts(old, replace(config, coverage=False)) == [
        "coverage: checkpoint True vs config False"
    ]
