"""Self-critical sequence training (Rennie et al., 2017): captions sampled from the model are
rewarded by their CIDEr-D against the image's references, minus a baseline, and the model
follows the policy gradient of that advantage."""

import contextlib
import math

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


def self_critical_loss(model, forward, inputs, images, reward, config, pad_id):
    """Policy-gradient loss of one batch of images, the tokens it scores, and its figures
    (summed rewards, baselines, positive advantages, and the number of samples).

    `forward` is the model, or its DistributedDataParallel wrapper, that computes the scores
    to differentiate; `model` itself only samples.
    """
    k = config.scst_samples
    with torch.no_grad():
        features = model.encode(inputs, config.reads_features)
        samples = sample_decode(model.decoder, features, k, config.scst_temperature,
                                config.max_caption_len, pad_id)  # fmt: skip
        greedy = None
        if config.scst_baseline == "greedy":
            greedy = greedy_decode(model.decoder, features, config.max_caption_len, pad_id)
    rewards = reward(samples.ids, np.repeat(np.asarray(images), k))  # (rows,)
    greedy_rewards = reward(greedy, images) if greedy is not None else None
    baseline, advantage = advantages(rewards, greedy_rewards, k)
    scored = torch.cat([torch.zeros_like(samples.mask[:, :1]), samples.mask], dim=1)
    owners = torch.arange(features.size(0), device=inputs.device).repeat_interleave(k)
    with recurrent_layers_training(model):
        scores = forward(inputs, samples.ids, owners, scored, config.reads_features).scores
    log_probs = sampling_log_probs(scores, config.scst_temperature, pad_id)  # (scored, vocab)
    token_log_probs = log_probs.gather(1, samples.ids[scored].unsqueeze(1)).squeeze(1)
    weight = torch.as_tensor(advantage, dtype=torch.float32, device=inputs.device)  # (rows,)
    weight = weight.unsqueeze(1).expand_as(scored)[scored]  # (scored,) per token
    tokens = scored.sum()
    loss = -(weight * token_log_probs).sum() / tokens.clamp(min=1)
    figures = (rewards.sum(), baseline.sum(), (advantage > 0).sum(), len(rewards))
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
                            autocast=None, desc=""):  # fmt: skip
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
    losses = LossLog(1, bar, desc, "lower scst_lr", show_perplexity=False)
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
