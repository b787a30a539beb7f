"""Self-critical sequence training (Rennie et al., 2017): captions sampled from the model are
rewarded by their CIDEr-D against the image's references, minus a baseline, and the model
follows the policy gradient of that advantage."""

import contextlib
import math
from typing import NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from captioning import distributed
from captioning.command import progress_disabled
from captioning.data.training_data import to_device
from captioning.decoding import greedy_decode, sample_decode, sampling_log_probs
from captioning.evaluation.cider_d import (
    END_TOKEN,
    TokenMap,
    concatenated_ranges,
    ptb_tokens,
    select_sentences,
    training_scorer,
)
from captioning.training.loss_log import LossLog
from model import scored_positions, select_outputs


class CaptionReward:
    """CIDEr-D of caption ids against a split's references, with the split's document
    frequencies (cached on disk), the end of a caption counted as a word: the self-critical
    reward."""

    def __init__(self, split, vocab, cache_dir=None):
        self.scorer, (self.ref_ids, self.ref_offsets) = training_scorer(split, cache_dir)
        owners = np.asarray(split.caption_image, np.int64)
        self.captions_by_image = np.argsort(owners, kind="stable")  # (captions,)
        self.first_caption = np.searchsorted(
            owners[self.captions_by_image], np.arange(len(split.image_ids) + 1)
        )  # (images + 1,)
        # Other special tokens are no words: `vocab.decode` drops them from a caption too.
        special = {vocab.start_id, vocab.pad_id, vocab.unk_id}
        end = self.scorer.words.add(END_TOKEN)  # the references' end
        words = [vocab.idx2word[i] for i in range(len(vocab))]
        self.vocab_words = TokenMap(
            [[end] if i == vocab.end_id else [] if i in special
             else [self.scorer.words.add(t) for t in tokens]
             for i, tokens in enumerate(ptb_tokens(words))]
        )  # fmt: skip
        self.end_id = vocab.end_id

    def __call__(self, ids, images):
        """CIDEr-D (rows,) of caption ids (rows, steps), `<start>` first, as the decoders give
        them; row k describes image `images[k]` (an index into the split's images)."""
        ids = ids.cpu().numpy()
        is_end = ids == self.end_id
        # The words through the first `<end>`, which counts once, as each reference ends once:
        # an end per padding step would add n-grams no reference has ("<END> <END>") and make
        # the length hang on the batch's longest caption. A caption cut at the maximum length
        # has no `<end>`, and gets none: it did not end.
        keep = np.cumsum(is_end, axis=1) - is_end == 0  # (rows, steps)
        keep[:, 0] = False  # `<start>`
        hyp_offsets = np.concatenate(([0], np.cumsum(keep.sum(axis=1))))
        hyp_ids, hyp_offsets = self.vocab_words(ids[keep], hyp_offsets)
        distinct, hyp_image = np.unique(np.asarray(images, np.int64), return_inverse=True)
        first, last = self.first_caption[distinct], self.first_caption[distinct + 1]
        counts = last - first  # references per image (distinct,)
        captions = self.captions_by_image[concatenated_ranges(first, counts)]
        ref_ids, ref_offsets = select_sentences(self.ref_ids, self.ref_offsets, captions)
        ref_image = np.repeat(np.arange(len(distinct)), counts)
        return self.scorer.score_ids(
            hyp_ids, hyp_offsets, hyp_image, ref_ids, ref_offsets, ref_image
        )


def advantages(rewards, baseline_rewards, samples):
    """Baseline (rows,) and advantage (rows,) per sample, rows image-major.

    `baseline_rewards` (images,) are the greedy captions' rewards; None: each sample's baseline
    is the mean reward of the image's other samples.
    """
    rewards = rewards.reshape(-1, samples)  # (images, samples)
    if baseline_rewards is not None:
        baseline = np.repeat(np.asarray(baseline_rewards)[:, None], samples, axis=1)
    else:
        baseline = (rewards.sum(axis=1, keepdims=True) - rewards) / (samples - 1)
    return baseline.reshape(-1), (rewards - baseline).reshape(-1)


class PolicyBatch(NamedTuple):
    """Sampled captions to follow the policy gradient of, on the device: the images' inputs,
    caption ids (rows, steps), the input row of each caption (rows,), the flat positions (n,)
    of the generated tokens among the (rows, steps - 1) outputs, and each caption's advantage
    (rows,)."""

    inputs: torch.Tensor
    ids: torch.Tensor
    owners: torch.Tensor
    scored: torch.Tensor
    advantage: torch.Tensor


def sample_policy_batch(model, inputs, images, reward, config, pad_id):
    """Sample `config.scst_samples` captions per image and reward them: a `PolicyBatch` and the
    figures (summed rewards, baselines, positive advantages, and the number of samples).

    The reward is computed on the host, so this waits for the device once, for the sampled ids;
    the positions of their tokens are found from that host copy.
    """
    k = config.scst_samples
    with torch.no_grad():
        features = model.encode(inputs, config.reads_features)
        samples = sample_decode(model.decoder, features, k, config.scst_temperature,
                                config.max_caption_len, pad_id)  # fmt: skip
        greedy = None
        if config.scst_baseline == "greedy":
            greedy = greedy_decode(model.decoder, features, config.max_caption_len, pad_id)
    ids = samples.ids.cpu()  # (rows, steps)
    rewards = reward(ids, np.repeat(np.asarray(images), k))  # (rows,)
    greedy_rewards = reward(greedy, images) if greedy is not None else None
    baseline, advantage = advantages(rewards, greedy_rewards, k)
    device = inputs.device
    owners = torch.arange(features.size(0), device=device).repeat_interleave(k)  # (rows,)
    scored = scored_positions(ids != pad_id).to(device, non_blocking=True)
    advantage_rows = torch.as_tensor(advantage, dtype=torch.float32).to(device, non_blocking=True)
    figures = (rewards.sum(), baseline.sum(), (advantage > 0).sum(), len(rewards))
    return PolicyBatch(inputs, samples.ids, owners, scored, advantage_rows), figures


def policy_gradient_loss(model, forward, batch, config, pad_id):
    """The self-critical loss of a `PolicyBatch`: minus the advantage-weighted log-probability
    of each sampled token, per token; and the tokens scored. Nothing in it waits for the device.

    `forward` is the model, or its DistributedDataParallel wrapper, that computes the scores
    to differentiate; `model` itself is only switched to the recurrent layers' training mode.
    """
    with recurrent_layers_training(model):
        output = forward(batch.inputs, batch.ids, batch.owners, batch.scored, config.reads_features)
    log_probs = sampling_log_probs(output.scores, config.scst_temperature, pad_id)  # (scored, V)
    targets = select_outputs(batch.ids[:, 1:], batch.scored)  # (scored,)
    token_log_probs = log_probs.gather(1, targets.unsqueeze(1)).squeeze(1)  # (scored,)
    # Each caption's advantage at each of its tokens: (rows,) -> (rows, steps - 1) -> (scored,)
    weight = select_outputs(batch.advantage.unsqueeze(1).expand(-1, batch.ids.size(1) - 1),
                            batch.scored)  # fmt: skip
    n = len(batch.scored)
    tokens = torch.full((), n, dtype=torch.long, device=targets.device)
    return -(weight * token_log_probs).sum() / max(n, 1), tokens


def self_critical_loss(model, forward, inputs, images, reward, config, pad_id):
    """Policy-gradient loss of one batch of images, the tokens it scores, and its figures
    (`sample_policy_batch`, then `policy_gradient_loss`)."""
    batch, figures = sample_policy_batch(model, inputs, images, reward, config, pad_id)
    loss, tokens = policy_gradient_loss(model, forward, batch, config, pad_id)
    return loss, tokens, figures


@contextlib.contextmanager
def recurrent_layers_training(model):
    """Every `nn.LSTM` (any `nn.RNNBase`) of `model` in training mode with its dropout off.

    cuDNN takes an RNN's gradient only from a forward pass made in training mode ("cudnn RNN
    backward can only be called in training mode"); with dropout zeroed, that pass computes
    what the model computes in eval mode, so the gradient is still the test-time model's.
    """
    layers = [m for m in model.modules() if isinstance(m, torch.nn.RNNBase)]
    saved = [(m.training, m.dropout) for m in layers]
    for m in layers:
        m.train(True)
        m.dropout = 0.0
    try:
        yield
    finally:
        for m, (training, dropout) in zip(layers, saved):
            m.train(training)
            m.dropout = dropout


def run_self_critical_epoch(model, forward, loader, reward, vocab, config, device, step,
                            autocast=None, desc="", forecast=False):  # fmt: skip
    """One self-critical pass over the training images; `step(loss, tokens)` updates the model.

    Returns each step's loss and the epoch's mean reward, mean baseline and share of positive
    advantages over all processes.
    """
    # No dropout and fixed batch-norm statistics: the captions are sampled from, and the
    # gradient taken of, the very model that captions at test time.
    model.train(False)
    sums = np.zeros(4)
    bar = tqdm(
        loader, desc=desc, unit="batch", disable=progress_disabled(config.progress), leave=False
    )
    # Read every step: each step waits for the device anyway (the reward is computed on the host
    # from the sampled captions), and a non-finite update must stop the run before the next
    # sampling draws from NaN probabilities (a device-side assert on CUDA).
    losses = LossLog(1, bar, desc, "lower scst_lr", show_perplexity=False,
                     forecast=len(loader) if forecast else None)  # fmt: skip
    for inputs, images in bar:
        (inputs,) = to_device([inputs], device)
        with autocast or contextlib.nullcontext():
            loss, tokens, figures = self_critical_loss(
                model, forward, inputs, images.numpy(), reward, config, vocab.pad_id
            )
        step(loss, tokens)
        losses.add(loss)
        sums += figures  # host figures: the rewards were computed on the host
        bar.set_postfix(reward=f"{figures[0] / figures[3]:.3f}")
    step_losses = losses.close()
    sums = np.asarray(distributed.sum_values(sums))
    samples = max(sums[3], 1)
    means = {"reward": sums[0] / samples, "baseline": sums[1] / samples,
             "positive_advantage": sums[2] / samples}  # fmt: skip
    return step_losses, {k: float(v) if math.isfinite(v) else None for k, v in means.items()}
