"""On a machine with CUDA (skipped elsewhere): training with bf16 autocast, and captions on the GPU
equal to the CPU's for the same weights. `python gpu_check.py` runs these."""

import copy

import pytest
import torch

from checkpoint import load_trained
from decoding import beam_search, greedy_decode
from tests.helpers import tiny_config
from train import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("decoder", ["showtell", "attention"])
def test_training_on_cuda_with_bf16_and_captions_equal_to_the_cpus(demo_root, tmp_path, decoder):
    history = train(tiny_config(demo_root, tmp_path, device="cuda", amp="bf16", epochs=1,
                                scst_epochs=1, decoder=decoder))  # fmt: skip
    assert all(v == v for v in history["val_loss"])  # finite, not NaN
    model, _, config = load_trained(tmp_path / "last.pt", "cpu")
    gpu = copy.deepcopy(model).cuda()
    images = torch.randn(6, 3, config.image_size, config.image_size)
    with torch.no_grad():
        cpu_features, gpu_features = model.encode(images), gpu.encode(images.cuda())
        for decode in (greedy_decode, lambda d, f: beam_search(d, f, beam_size=3)):
            assert torch.equal(decode(model.decoder, cpu_features),
                               decode(gpu.decoder, gpu_features).cpu())  # fmt: skip
