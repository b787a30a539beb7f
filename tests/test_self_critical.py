"""Self-critical training: sampling, reward, baselines, loss, the training stage, resume and DDP."""

import contextlib
import subprocess

import numpy as np
import pytest
import torch
from pycocoevalcap.cider.cider import Cider

from captioning.checkpoint import CheckpointError, build_model, load_checkpoint, load_trained
from captioning.config import ConfigError
from captioning.data.annotations import CaptionSplit, read_split
from captioning.data.vocabulary import Vocabulary
from captioning.decoding import greedy_decode, sample_decode, sampling_log_probs
from captioning.evaluation.cider_d import END_TOKEN, CiderD, training_scorer
from captioning.evaluation.coco_metrics import _tokenize_like_ptb
from captioning.training import self_critical
from captioning.training import train as train_module
from captioning.training.self_critical import CaptionReward, advantages, self_critical_loss
from captioning.training.train import train
from model import AttentionDecoder, DecoderRNN, scored_positions
from tests.helpers import tiny_config

EMBED, HIDDEN, VOCAB, PAD, END = 8, 16, 10, 3, 1


def random_decoder(kind, seed=0):
    """A decoder with random weights, scaled up so that its word scores differ, and inputs for
    it (4 images)."""
    torch.manual_seed(seed)
    if kind == "showtell":
        decoder, inputs = DecoderRNN(EMBED, HIDDEN, VOCAB).eval(), torch.randn(4, EMBED)
    else:
        decoder, inputs = AttentionDecoder(12, EMBED, HIDDEN, VOCAB).eval(), torch.randn(4, 5, 12)
    with torch.no_grad():
        for p in decoder.parameters():
            p.mul_(3)
    return decoder, inputs


@pytest.mark.parametrize("kind", ["showtell", "attention"])
def test_sampled_log_probs_equal_the_decoders_own_scores(kind):
    decoder, features = random_decoder(kind)
    torch.manual_seed(1)
    samples = sample_decode(decoder, features, samples=6, temperature=0.7, max_len=9)
    ids, mask = samples.ids, samples.mask
    assert ids.shape[0] == 24 and samples.log_probs.shape == mask.shape == (24, ids.shape[1] - 1)
    ended = (ids[:, 1:] == END).cumsum(dim=1)
    # The mask holds the generated words through the first `<end>`, then padding follows.
    assert torch.equal(mask, (ended - (ids[:, 1:] == END).long()) == 0)
    assert torch.equal(ids[:, 1:] == PAD, ~mask)
    assert 0 < int((ended[:, -1] > 0).sum()) < 24  # some rows end early, some run to max_len
    assert len({tuple(r) for r in ids[:6].tolist()}) > 1  # one image's samples differ

    scored = torch.cat([torch.zeros_like(mask[:, :1]), mask], dim=1)
    positions = scored_positions(scored)
    scores = decoder.score(features.repeat_interleave(6, dim=0), ids, positions).scores  # (n, V)
    own = sampling_log_probs(scores, 0.7, PAD).gather(1, ids[scored].unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(samples.log_probs[mask], own, rtol=1e-5, atol=1e-5)
    assert torch.all(samples.log_probs[~mask] == 0)


def test_sampling_follows_the_temperature_and_never_draws_padding():
    decoder, features = random_decoder("showtell")
    torch.manual_seed(0)
    cold = sample_decode(decoder, features, samples=4, temperature=1e-3, max_len=6)
    greedy = greedy_decode(decoder, features, max_len=6)  # (4, steps)
    assert torch.equal(cold.ids.view(4, 4, -1)[:, :, : greedy.shape[1]],
                       greedy.unsqueeze(1).expand(4, 4, -1))  # fmt: skip
    hot = sample_decode(decoder, features, samples=4, temperature=1.0, max_len=6)
    assert len({tuple(r) for r in hot.ids.tolist()}) > 8
    with torch.no_grad():
        decoder.fc.bias[PAD] += 50.0  # padding would be drawn almost always if it could be
    padded = sample_decode(decoder, features, samples=4, max_len=6)
    assert not (padded.ids[:, 1:][padded.mask] == PAD).any()


def test_baselines_mean_of_the_other_samples_and_greedy():
    rewards = np.array([1.0, 2.0, 3.0, 4.0, 4.0, 4.0])  # two images, three samples each
    baseline, advantage = advantages(rewards, None, 3)
    np.testing.assert_allclose(baseline, [2.5, 2.0, 1.5, 4.0, 4.0, 4.0])
    np.testing.assert_allclose(advantage, [-1.5, 0.0, 1.5, 0.0, 0.0, 0.0])
    baseline, advantage = advantages(rewards, np.array([2.0, 5.0]), 3)
    np.testing.assert_allclose(baseline, [2.0, 2.0, 2.0, 5.0, 5.0, 5.0])
    np.testing.assert_allclose(advantage, [-1.0, 0.0, 1.0, -1.0, -1.0, -1.0])


@pytest.fixture(scope="module")
def demo_train(demo_root):
    """The demo test dataset's training split and a vocabulary of it."""
    split = read_split(demo_root, "train")
    vocab = Vocabulary(vocab_threshold=1, vocab_file=None, captions=split.tokenized())
    return split, vocab


def test_reward_of_caption_ids_equals_cider_d_of_their_words(demo_train, tmp_path):
    split, vocab = demo_train
    reward = CaptionReward(split, vocab, tmp_path)
    scorer, (ref_ids, ref_offsets) = training_scorer(split, tmp_path)
    images = np.array([0, 0, 5, 7, 7, 2])
    rng = np.random.default_rng(0)
    rows = []
    for image in images:  # one of the image's captions, of another's, or a jumble of words
        caption = split.captions[rng.choice(np.flatnonzero(split.caption_image == image))]
        ids = vocab.encode(caption)
        if rng.random() < 0.5:
            ids = [ids[0], *rng.permutation(ids[1:-1]).tolist(), vocab.unk_id, ids[-1]]
        rows.append(ids + [vocab.pad_id] * 3 + [vocab("red")])  # nothing after `<end>` counts
    ids = padded(rows, vocab.pad_id)
    # One end token each: `<end>` once, padding not at all.
    words = [_tokenize_like_ptb(vocab.decode(r)).split() + [END_TOKEN] for r in ids.tolist()]
    references = [
        [_tokenize_like_ptb(split.captions[c]).split() + [END_TOKEN]
         for c in np.flatnonzero(split.caption_image == image)]
        for image in sorted(set(images))
    ]  # fmt: skip
    position = {image: k for k, image in enumerate(sorted(set(images)))}
    expected = scorer.score(words, references, [position[i] for i in images])
    np.testing.assert_allclose(reward(ids, images), expected, rtol=0, atol=1e-12)
    assert expected.max() > 2 * expected.min() > 0


def padded(rows, pad_id):
    """Caption ids (rows, steps) of id lists of any lengths, padded as the decoders pad them."""
    width = max(map(len, rows))
    return torch.tensor([r + [pad_id] * (width - len(r)) for r in rows])


def test_reward_equals_pycocoevalcap_cider_with_the_end_token_written_as_a_word(
    demo_train, tmp_path
):
    split, vocab = demo_train
    reward = CaptionReward(split, vocab, tmp_path)
    # One caption for every image with references: pycocoevalcap's documents are the images
    # scored, the reward's those of the whole split.
    images = np.unique(split.caption_image)
    rng = np.random.default_rng(1)
    rows = []
    for image in images:  # an image's caption, its words shuffled, or cut without `<end>`
        ids = vocab.encode(split.captions[rng.choice(np.flatnonzero(split.caption_image == image))])
        kind = rng.integers(3)
        if kind == 1:
            ids = [ids[0], *rng.permutation(ids[1:-1]).tolist(), ids[-1]]
        elif kind == 2:  # run to the maximum length: it did not end
            ids = ids[: rng.integers(2, len(ids) - 1)]
        rows.append(ids)
    assert 10 < sum(vocab.end_id not in r for r in rows) < len(rows) - 10
    hypotheses = {
        int(i): [_tokenize_like_ptb(vocab.decode(r)) + f" {END_TOKEN}" * (vocab.end_id in r)]
        for i, r in zip(images, rows)
    }
    references = {
        int(i): [_tokenize_like_ptb(split.captions[c]) + f" {END_TOKEN}"
                 for c in np.flatnonzero(split.caption_image == i)]
        for i in images
    }  # fmt: skip
    _, theirs = Cider().compute_score(references, hypotheses)
    np.testing.assert_allclose(
        reward(padded(rows, vocab.pad_id), images), theirs, rtol=0, atol=1e-9
    )
    assert len(set(np.round(theirs, 6))) > len(images) // 2


# The first image's references name the horse's colour, as annotators often do: the words up to
# the noun are the part every reference shares.
HORSES = [
    ["a man riding a brown horse", "a man riding a white horse", "a man riding a black horse"],
    ["a dog lying on a couch", "a brown dog on a sofa"],
    ["a plate of food on a table", "a pizza on a plate"],
    ["a man riding a wave on a surfboard", "a surfer riding a wave"],
    ["a woman riding a bike down a street", "a person riding a bicycle"],
    ["a horse standing in a field", "two horses eating grass"],
]


@pytest.fixture
def horse_reward(tmp_path):
    """The reward of a split with the `HORSES` captions, and its vocabulary."""
    split = CaptionSplit(
        "train", "csv", tmp_path / "captions.csv", list(range(len(HORSES))),
        [f"{i}.jpg" for i in range(len(HORSES))], [c for refs in HORSES for c in refs],
        np.repeat(np.arange(len(HORSES)), [len(refs) for refs in HORSES]),
    )  # fmt: skip
    vocab = Vocabulary(vocab_threshold=1, vocab_file=None, captions=split.tokenized(tmp_path))
    return CaptionReward(split, vocab, tmp_path), vocab


def test_the_end_token_puts_a_fragment_below_the_whole_sentence(horse_reward):
    reward, vocab = horse_reward
    fragment, whole = "a man riding a", "a man riding a horse"
    ended = reward(padded([vocab.encode(fragment), vocab.encode(whole)], vocab.pad_id), [0, 0])
    assert ended[0] < ended[1] - 0.5, ended
    # Scored without the end token, as the reward was before, the fragment wins.
    references = [[r.split() for r in refs] for refs in HORSES]
    hypotheses = [fragment.split(), whole.split()]
    without = CiderD.from_references(references).score(hypotheses, references, [0, 0])
    assert without[0] > without[1] + 0.5, without


def test_a_caption_cut_at_the_maximum_length_gets_no_end_token(horse_reward):
    reward, vocab = horse_reward
    words = ["a", "man", "riding", "a", "horse"]
    ended = vocab.encode(words)
    cut = ended[:-1]  # the same words, the last at the maximum length
    references = [[r.split() + [END_TOKEN] for r in HORSES[0]]]
    expected = reward.scorer.score([words + [END_TOKEN], words], references, [0, 0])
    np.testing.assert_allclose(reward(padded([ended, cut], vocab.pad_id), [0, 0]), expected,
                               rtol=0, atol=1e-12)  # fmt: skip
    assert expected[0] > expected[1] + 0.5


def tiny_model(demo_root, tmp_path, **changes):
    """A tiny model and the config it was built from (random weights)."""
    config = tiny_config(demo_root, tmp_path, **changes)
    split = read_split(demo_root, "train")
    vocab = Vocabulary(vocab_threshold=1, vocab_file=None, captions=split.tokenized())
    torch.manual_seed(0)
    return build_model(config, vocab).eval(), vocab, config, split


@pytest.mark.parametrize("baseline,samples", [("mean", 2), ("greedy", 3)])
def test_loss_is_zero_when_every_sample_equals_its_baseline(demo_root, tmp_path, baseline, samples):
    model, vocab, config, split = tiny_model(
        demo_root, tmp_path, scst_epochs=1, scst_baseline=baseline, scst_samples=samples,
        scst_temperature=1e-6,
    )  # fmt: skip
    reward = CaptionReward(split, vocab, tmp_path)
    images = np.arange(6)
    inputs = torch.randn(6, 3, 32, 32)
    # Nearly zero temperature: every sample is the greedy caption, so no advantage anywhere.
    loss, tokens, figures = self_critical_loss(model, model, inputs, images, reward, config, 3)
    loss.backward()
    assert loss.item() == 0.0 and figures[2] == 0 and int(tokens) > 0
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
    model.zero_grad()
    hot = tiny_config(demo_root, tmp_path, scst_epochs=1, scst_baseline=baseline,
                      scst_samples=samples)  # fmt: skip
    loss, _, figures = self_critical_loss(model, model, inputs, images, reward, hot, 3)
    loss.backward()
    assert loss.item() != 0.0 and figures[2] > 0
    assert model.decoder.fc.weight.grad.abs().sum() > 0


def test_gradient_pass_runs_every_lstm_in_training_mode_with_dropout_off(
    demo_root, tmp_path, monkeypatch
):
    # cuDNN refuses an RNN's backward after an eval-mode forward; CPU does not, so a hook looks.
    model, vocab, config, split = tiny_model(demo_root, tmp_path, scst_epochs=1, num_layers=2,
                                             dropout=0.5)  # fmt: skip
    assert model.decoder.lstm.dropout == 0.5  # between the two layers, in training mode
    seen = []
    model.decoder.lstm.register_forward_hook(
        lambda m, args, out: seen.append((m.training, torch.is_grad_enabled(), m.dropout))
    )
    reward = CaptionReward(split, vocab, tmp_path)
    inputs, images = torch.randn(6, 3, 32, 32), np.arange(6)
    torch.manual_seed(1)
    loss, _, _ = self_critical_loss(model, model, inputs, images, reward, config, vocab.pad_id)
    loss.backward()
    assert seen and all(training and dropout == 0 for training, grad, dropout in seen if grad)
    assert any(grad for _, grad, _ in seen) and not model.decoder.lstm.training
    assert model.decoder.lstm.dropout == 0.5  # restored
    # Dropout truly off: the same loss as the model wholly in eval mode.
    monkeypatch.setattr(self_critical, "recurrent_layers_training", contextlib.nullcontext)
    torch.manual_seed(1)
    eval_loss, _, _ = self_critical_loss(model, model, inputs, images, reward, config,
                                         vocab.pad_id)  # fmt: skip
    assert torch.allclose(loss, eval_loss, rtol=1e-5, atol=1e-7) and loss.item() != 0


def test_a_non_finite_self_critical_loss_stops_the_run(demo_root, tmp_path, monkeypatch):
    real = self_critical.self_critical_loss

    def nan_loss(*args, **kwargs):
        loss, tokens, figures = real(*args, **kwargs)
        return loss * float("nan"), tokens, figures

    monkeypatch.setattr(self_critical, "self_critical_loss", nan_loss)
    with pytest.raises(
        FloatingPointError, match=r"self-critical.*loss became nan at step 0.*scst_lr"
    ):
        train(tiny_config(demo_root, tmp_path, epochs=1, scst_epochs=1))


def training_reward(checkpoint, demo_root, samples=8):
    """Mean CIDEr-D of captions sampled from a checkpoint for every training image (seeded): the
    training-set CIDEr that the self-critical stage maximises."""
    from captioning.data.loading import ImageDataset, make_transform

    model, vocab, config = load_trained(checkpoint)
    split = read_split(demo_root, "train")
    images = ImageDataset(split, make_transform(config.image_size))
    inputs = torch.stack([images[i][0] for i in range(len(images))])
    torch.manual_seed(0)
    with torch.no_grad():
        ids = sample_decode(model.decoder, model.encode(inputs), samples,
                            max_len=config.max_caption_len).ids  # fmt: skip
    rewards = CaptionReward(split, vocab)(ids, np.repeat(np.arange(len(images)), samples))
    return float(rewards.mean())


def test_tiny_self_critical_run_raises_training_cider_without_java(
    demo_root, tmp_path, monkeypatch
):
    def no_subprocess(*args, **kwargs):
        raise AssertionError("the self-critical stage started a subprocess (Java?)")

    monkeypatch.setattr(subprocess.Popen, "__init__", no_subprocess)
    config = tiny_config(demo_root, tmp_path, epochs=6, lr=1e-2, scst_epochs=4, scst_lr=3e-3,
                         dropout=0.0)  # fmt: skip
    history = train(config)
    assert history["stage"] == ["xe"] * 6 + ["scst"] * 4
    assert history["reward"][:6] == [None] * 6 and None not in history["reward"][6:]
    assert history["train_loss"][6:] == [None] * 4
    before = training_reward(tmp_path / "best_cross_entropy.pt", demo_root)
    after = training_reward(tmp_path / "last.pt", demo_root)
    assert after > before * 1.1, (before, after)
    assert history["reward"][-1] > history["reward"][6]


def interrupt_self_critical_at_epoch(monkeypatch, epoch):
    """Make the `epoch`-th self-critical pass raise, as a kill between epochs would end the run."""
    real, calls = train_module.run_self_critical_epoch, []

    def run(*args, **kwargs):
        calls.append(1)
        if len(calls) == epoch:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "run_self_critical_epoch", run)


def test_resume_in_the_self_critical_stage_equals_an_uninterrupted_run(
    demo_root, tmp_path, monkeypatch
):
    changes = dict(epochs=1, scst_epochs=2, scst_lr=1e-3)
    full = train(tiny_config(demo_root, tmp_path / "full", **changes))
    with monkeypatch.context() as m:
        interrupt_self_critical_at_epoch(m, 2)
        with pytest.raises(KeyboardInterrupt):
            train(tiny_config(demo_root, tmp_path / "cut", **changes))
    assert load_checkpoint(tmp_path / "cut" / "last.pt")["epoch"] == 1  # one self-critical epoch
    resumed = train(tiny_config(demo_root, tmp_path / "cut", resume=True, **changes))
    assert resumed["stage"] == ["xe", "scst", "scst"]
    assert resumed["step_loss"] == full["step_loss"] and len(full["step_loss"]) > 8
    assert resumed["reward"] == full["reward"] and resumed["val_loss"] == full["val_loss"]
    a = load_checkpoint(tmp_path / "full" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "cut" / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_init_from_starts_the_self_critical_stage_from_a_checkpoint(demo_root, tmp_path):
    train(tiny_config(demo_root, tmp_path / "xe", epochs=1, vocab_threshold=2))
    source = load_checkpoint(tmp_path / "xe" / "best.pt")
    history = train(tiny_config(demo_root, tmp_path / "scst", init_from=str(tmp_path / "xe" /
                                "best.pt"), scst_epochs=1, scst_lr=1e-9))  # fmt: skip
    assert history["stage"] == ["scst"]
    state = load_checkpoint(tmp_path / "scst" / "last.pt")
    assert state["vocab"] == source["vocab"]  # not rebuilt with this config's threshold
    assert all(torch.allclose(state["model"][k].float(), source["model"][k].float(), atol=1e-6)
               for k in source["model"])  # fmt: skip
    with pytest.raises(CheckpointError, match="best.pt"):
        train(tiny_config(demo_root, tmp_path / "other", decoder="attention", scst_epochs=1,
                          init_from=str(tmp_path / "xe" / "best.pt")))  # fmt: skip


def test_config_refuses_a_stage_it_cannot_run(demo_root, tmp_path):
    with pytest.raises(ConfigError, match="scst_samples"):
        tiny_config(demo_root, tmp_path, scst_epochs=1, scst_samples=1)
    tiny_config(demo_root, tmp_path, scst_epochs=1, scst_samples=1, scst_baseline="greedy")
    with pytest.raises(ConfigError, match="init_from"):
        tiny_config(demo_root, tmp_path, init_from="x.pt")


def test_learning_curves_show_the_self_critical_stage():
    from captioning.plots import plot_learning_curves

    history = {
        "epoch": [1, 2, 3], "train_loss": [2.0, 1.5, None], "train_perplexity": [7.4, 4.5, None],
        "val_loss": [2.1, 1.7, 1.8], "val_perplexity": [8.2, 5.5, 6.0], "val_cider": [0.2, 0.4, 0.6],
        "reward": [None, None, 0.7], "baseline": [None, None, 0.65],
        "positive_advantage": [None, None, 0.4],
    }  # fmt: skip
    fig = plot_learning_curves(history)
    reward_axes = [ax for ax in fig.axes if "reward" in ax.get_title()]
    assert len(reward_axes) == 1
    lines = {line.get_label(): list(line.get_ydata()) for line in reward_axes[0].get_lines()}
    assert lines["sampled captions"][2] == 0.7 and lines["baseline"][2] == 0.65
    history.update(reward=[None] * 3, baseline=[None] * 3, positive_advantage=[None] * 3)
    assert not any("reward" in ax.get_title() for ax in plot_learning_curves(history).axes)


def test_the_stage_starts_from_the_best_cross_entropy_epoch(demo_root, tmp_path, monkeypatch):
    # Validation CIDEr 1.0 after epoch 1, then lower: epoch 1 is the best, not the last.
    scores = iter([1.0, 0.5, 0.4])
    monkeypatch.setattr(train_module, "validation_cider", lambda *args: next(scores))
    snapshots = []
    real = train_module.run_self_critical_epoch

    def run(model, *args, **kwargs):
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
        return real(model, *args, **kwargs)

    monkeypatch.setattr(train_module, "run_self_critical_epoch", run)
    history = train(tiny_config(demo_root, tmp_path, epochs=2, scst_epochs=1, lr=1e-2))
    assert history["val_cider"] == [1.0, 0.5, 0.4]
    best = load_checkpoint(tmp_path / "best_cross_entropy.pt")
    assert best["epoch"] == 0 and load_checkpoint(tmp_path / "best.pt")["epoch"] == 0
    assert all(torch.equal(snapshots[0][k], best["model"][k]) for k in best["model"])
