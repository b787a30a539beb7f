"""The training step never makes the host wait for the device, for every decoder and both stages:
checked on the CPU by watching every op one step dispatches (forward, loss, backward, clipping,
optimizer and schedule) for those that need a value from the device: `nonzero`, `item` and
`_local_scalar_dense` (`.item()`, `float(t)`, `if t:`), and indexing by a boolean mask (which
calls `nonzero`)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from captioning.checkpoint import build_model
from captioning.data.vocabulary import Vocabulary
from captioning.decoding import sample_decode
from captioning.training.self_critical import PolicyBatch, policy_gradient_loss
from captioning.training.train import (
    caption_batch,
    caption_loss,
    make_optimizer,
    make_scheduler,
    make_step,
)
from model import scored_positions
from tests.helpers import tiny_config

aten = torch.ops.aten
# Ops whose result the host must read from the device before it can go on.
SYNCING = {aten.nonzero, aten._local_scalar_dense, aten.item, aten.is_nonzero, aten.masked_select,
           aten.equal, aten.unique_consecutive, aten._unique2}  # fmt: skip
DECODERS = {
    "showtell": {},
    "attention": dict(decoder="attention"),
    "transformer": dict(
        decoder="transformer", encoder_layers=1, decoder_layers=1, heads=2, feed_forward=32
    ),  # fmt: skip
}


class HostSyncs(TorchDispatchMode):
    """Records each dispatched op that makes the host wait for the device's result."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket in SYNCING:
            self.seen.append(str(func))
        elif func.overloadpacket in (aten.index, aten.index_put, aten.index_put_):
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in indices):
                self.seen.append(f"{func} by a boolean mask")
        elif func.overloadpacket is aten.repeat_interleave and kwargs.get("output_size") is None:
            # Repeats given as a tensor: the output's length must be read from the device.
            self.seen += [] if func is aten.repeat_interleave.self_int else [str(func)]
        return func(*args, **kwargs)


def make_run(demo_root, tmp_path, decoder):
    """(config, vocabulary, model, one-step updater) for a tiny model of `decoder`."""
    config = tiny_config(demo_root, tmp_path, trainable_blocks=0, **DECODERS[decoder])
    vocab = Vocabulary(1, None, captions=[["a", "red", "circle"], ["a", "blue", "star"]])
    torch.manual_seed(0)
    model = build_model(config, vocab)
    optimizer = make_optimizer(config, model)
    step = make_step(model, optimizer, make_scheduler(config, optimizer, 10), None, 1.0)
    return config, vocab, model, step


def cached_inputs(model, images):
    """What the feature cache would hold for `images` pictures: pooled features or grids."""
    encoder = model.encoder
    shape = (4, encoder.feature_size) if encoder.grid else (encoder.feature_size,)
    return torch.randn(images, *shape)


@pytest.mark.parametrize("decoder", DECODERS)
def test_a_cross_entropy_step_never_waits_for_the_device(demo_root, tmp_path, decoder):
    config, vocab, model, step = make_run(demo_root, tmp_path, decoder)
    pad = vocab.pad_id
    captions = torch.tensor([[0, 4, 5, 6, 1], [0, 7, 1, pad, pad], [0, 5, 6, 1, pad]])
    owners = torch.tensor([0, 0, 1])  # grouped batches: two images, three captions
    batch = caption_batch((cached_inputs(model, 2), captions, owners), pad, "cpu")
    model.train()
    with HostSyncs() as syncs:
        loss, tokens, penalty, correct = caption_loss(model, batch, cached=True)
        step(loss, tokens, penalty)
    assert syncs.seen == []
    assert int(tokens) == 9 and 0 <= int(correct) <= 9  # 4 + 2 + 3 tokens after `<start>`


@pytest.mark.parametrize("decoder", DECODERS)
def test_a_self_critical_step_never_waits_for_the_device(demo_root, tmp_path, decoder):
    config, vocab, model, step = make_run(demo_root, tmp_path, decoder)
    model.eval()
    inputs = cached_inputs(model, 2)
    with torch.no_grad():
        samples = sample_decode(model.decoder, model.encode(inputs, True), 3, max_len=6)
    # Sampling and the reward happen on the host; what follows is the step.
    batch = PolicyBatch(inputs, samples.ids, torch.arange(2).repeat_interleave(3),
                        scored_positions(samples.ids != vocab.pad_id), torch.randn(6))  # fmt: skip
    with HostSyncs() as syncs:
        loss, tokens = policy_gradient_loss(model, model, batch, config, vocab.pad_id)
        step(loss, tokens)
    assert syncs.seen == []
    assert int(tokens) == int(samples.mask.sum())


def test_the_watch_sees_a_mask_index_and_an_item():
    values, mask = torch.randn(4), torch.tensor([True, False, True, False])
    with HostSyncs() as syncs:
        values[mask].sum().item()
    assert (
        any("boolean mask" in s for s in syncs.seen)
        and "aten._local_scalar_dense.default" in syncs.seen
    )
