"""With CUDA (skipped elsewhere; `make gpu-check` runs it): autocast training, GPU captions = CPU's."""

import copy

import pytest
import torch

from captioning.checkpoint import load_trained
from captioning.decoding import PAD_ID, beam_search, greedy_decode
from captioning.training.train import train
from model import DecoderRNN
from tests.helpers import tiny_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

# Share of captions that must be equal on the GPU and the CPU. On the CPU, scaling a trained
# tiny attention model's features by 1 + 1e-3 noise (about the error of cuDNN's default TF32
# convolutions) changed none of 200 greedy and beam captions, and 1e-2 noise changed 3% of
# them; a wrong GPU path (weights, layout, masking) changes nearly all. 90% of 32 images
# tolerates the few near ties that float differences may flip, nothing more.
SHARE_EQUAL = 0.9


def share_equal(a, b):
    """The share of rows of two id tensors that are equal, the narrower padded to the wider."""
    width = max(a.shape[1], b.shape[1])
    a, b = (torch.nn.functional.pad(x, (0, width - x.shape[1]), value=PAD_ID) for x in (a, b))
    return (a == b).all(dim=1).float().mean().item()


def native_bf16():
    """Whether this GPU computes in bf16 itself (Ampere and later), not by emulation."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


# The transformer small enough for the tiny data (the default is 6 + 6 layers).
SIZES = {"transformer": dict(encoder_layers=1, decoder_layers=2, heads=4, feed_forward=64)}


@pytest.mark.parametrize("decoder", ["showtell", "attention", "transformer"])
@pytest.mark.parametrize(
    "amp",
    [
        # fp16 runs the gradient scaler, the path amp="auto" takes on GPUs without native bf16.
        "fp16",
        pytest.param(
            "bf16",
            marks=pytest.mark.skipif(not native_bf16(), reason="needs a GPU with native bf16"),
        ),
    ],
)
def test_training_on_cuda_with_autocast_and_captions_equal_to_the_cpus(
    demo_root, tmp_path, decoder, amp
):
    # device="cuda", as users type it: the GPU of this process's LOCAL_RANK.
    history = train(tiny_config(demo_root, tmp_path, device="cuda", amp=amp, epochs=1,
                                scst_epochs=1, decoder=decoder, **SIZES.get(decoder, {})))  # fmt: skip
    assert all(v == v for v in history["val_loss"])  # finite, not NaN
    model, _, config = load_trained(tmp_path / "last.pt", "cpu")
    gpu = copy.deepcopy(model).cuda()
    images = torch.randn(32, 3, config.image_size, config.image_size)
    with torch.no_grad():
        cpu_features, gpu_features = model.encode(images), gpu.encode(images.cuda())
        # cuDNN convolutions default to TF32 on Ampere and later: close, not bit-equal.
        torch.testing.assert_close(gpu_features.cpu(), cpu_features, rtol=1e-2, atol=1e-2)
        for decode in (greedy_decode, lambda d, f: beam_search(d, f, beam_size=3)):
            # Caption ids are integers, but each is an argmax over float scores whose last bits
            # differ between the devices: a near tie can flip a word, and the rest of that
            # caption with it. So most captions, not all, must be equal.
            cpu_ids = decode(model.decoder, cpu_features)
            equal = share_equal(cpu_ids, decode(gpu.decoder, gpu_features).cpu())
            assert equal >= SHARE_EQUAL, f"{equal:.0%} of captions equal on GPU and CPU"


@pytest.mark.skipif(not native_bf16(), reason="needs a GPU with native bf16")
def test_the_cudnn_lstm_runs_in_float32_under_bfloat16_autocast():
    # cuDNN's autocast would run it in float16, which bfloat16 training gives no scaler.
    torch.manual_seed(0)
    decoder = DecoderRNN(16, 32, 30).cuda()
    seen = []
    decoder.lstm.register_forward_hook(lambda m, args, out: seen.append(out[0].dtype))
    features, captions = torch.randn(4, 16, device="cuda"), torch.randint(0, 30, (4, 7)).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        scores = decoder.score(features, captions).scores
    scores.float().sum().backward()
    assert seen == [torch.float32] and decoder.lstm.weight_hh_l0.grad.dtype == torch.float32
