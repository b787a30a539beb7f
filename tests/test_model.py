"""Model: output shapes, the CVND `sample` contract, freezing, weight loading, download errors."""

import sys
import urllib.error

import pytest
import torch
import torchvision

from captioning.backbones import build_backbone
from captioning.demo.small_cnn import SmallCNN
from model import CaptionModel, DecoderRNN, EncoderCNN, scored_positions

EMBED, HIDDEN, VOCAB = 32, 48, 40


@pytest.fixture(scope="module")
def resnet_encoder():
    torch.manual_seed(0)
    return EncoderCNN(EMBED, backbone="resnet18", pretrained=False).eval()


def test_encoder_output_shape_cvnd_call():
    encoder = EncoderCNN(EMBED, pretrained=False).eval()  # ResNet-50 by default
    assert encoder.feature_size == 2048
    assert encoder(torch.randn(2, 3, 224, 224)).shape == (2, EMBED)


def test_frozen_by_default_only_projection_trains(resnet_encoder):
    trainable = {n for n, p in resnet_encoder.named_parameters() if p.requires_grad}
    assert trainable == {"embed.weight", "embed.bias", "norm.weight", "norm.bias"}
    resnet_encoder.train()
    assert not resnet_encoder.backbone.training and resnet_encoder.norm.training
    resnet_encoder.eval()


def test_trainable_blocks_unfreezes_last_blocks():
    encoder = EncoderCNN(EMBED, backbone="resnet18", pretrained=False, trainable_blocks=1)
    grads = {
        n.split(".")[1] for n, p in encoder.backbone.named_parameters(prefix="b") if p.requires_grad
    }
    assert grads == {"layer4"}
    images = torch.randn(2, 3, 64, 64)
    encoder.train()(images).sum().backward()
    assert encoder.backbone.layer4[0].conv1.weight.grad is not None
    assert encoder.backbone.layer3[0].conv1.weight.grad is None


def test_smallcnn_backbone_for_small_images():
    encoder = EncoderCNN(EMBED, backbone=SmallCNN(), trainable_blocks=-1)
    assert all(p.requires_grad for p in encoder.parameters())
    assert encoder(torch.randn(3, 3, 64, 64)).shape == (3, EMBED)


def test_decoder_forward_shape():
    decoder = DecoderRNN(EMBED, HIDDEN, VOCAB)
    captions = torch.randint(0, VOCAB, (4, 11))
    assert decoder(torch.randn(4, EMBED), captions).shape == (4, 11, VOCAB)
    assert DecoderRNN(EMBED, HIDDEN, VOCAB, num_layers=2)(
        torch.randn(4, EMBED), captions
    ).shape == (4, 11, VOCAB)


def test_decoder_output_t_sees_only_tokens_before_t():
    torch.manual_seed(0)
    decoder = DecoderRNN(EMBED, HIDDEN, VOCAB).eval()
    features = torch.randn(1, EMBED)
    a = torch.randint(0, VOCAB, (1, 8))
    b = a.clone()
    b[0, 5] = (a[0, 5] + 1) % VOCAB
    out_a, out_b = decoder(features, a), decoder(features, b)
    assert torch.allclose(out_a[:, :6], out_b[:, :6], rtol=1e-5, atol=1e-6)
    assert (out_a[:, 6:] - out_b[:, 6:]).abs().amax() > 1e-3


def test_sample_contract(resnet_encoder):
    torch.manual_seed(1)
    decoder = DecoderRNN(EMBED, HIDDEN, VOCAB).eval()
    features = resnet_encoder(torch.randn(1, 3, 64, 64)).unsqueeze(1)  # (1, 1, embed)
    ids = decoder.sample(features)
    assert isinstance(ids, list) and all(type(i) is int for i in ids) and 0 < len(ids) <= 20
    assert len(decoder.sample(features, max_len=5)) <= 5
    with torch.no_grad():
        decoder.fc.bias[1] = 1e4  # <end> always wins: stops right after emitting it
    assert decoder.sample(features) == [0, 1]  # <start> is given, then <end>


def test_sample_matches_teacher_forced_argmax():
    torch.manual_seed(2)
    decoder = DecoderRNN(EMBED, HIDDEN, VOCAB).eval()
    features = torch.randn(1, EMBED)
    ids = decoder.sample(features.unsqueeze(1), max_len=12)
    assert ids[0] == decoder.start_id == 0 and len(ids) == 12  # no <end> with random weights
    with torch.no_grad():
        scores = decoder(features, torch.tensor([ids + [0]]))
    # Output 0 (the image step) is not trained: <start> is given, every later word predicted.
    assert scores[0, 1 : len(ids)].argmax(-1).tolist() == ids[1:]


def test_caption_model_takes_images_or_cached_features_as_told(resnet_encoder):
    model = CaptionModel(resnet_encoder, DecoderRNN(EMBED, HIDDEN, VOCAB)).eval()
    images = torch.randn(2, 3, 64, 64)
    captions = torch.randint(0, VOCAB, (2, 6))
    features = resnet_encoder.extract(images)
    from_images = model(images, captions).scores  # (2, 5, VOCAB)
    assert from_images.shape == (2, 5, VOCAB)
    assert torch.allclose(from_images, model(features, captions, cached=True).scores, atol=1e-5)
    with pytest.raises(RuntimeError):  # features are not images: nothing is guessed
        model(features, captions)


def test_local_weights_file(tmp_path):
    reference = torchvision.models.resnet18(weights=None)
    torch.save(reference.state_dict(), tmp_path / "r18.pth")
    encoder = EncoderCNN(EMBED, backbone="resnet18", weights_path=tmp_path / "r18.pth")
    assert torch.equal(encoder.backbone.conv1.weight, reference.conv1.weight)


def test_weights_download_failure_says_how_to_proceed(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(
        RuntimeError,
        match=r"Could not download the ImageNet weights for resnet18.*"
        r"weights_path=.*pretrained=False",
    ):
        EncoderCNN(EMBED, backbone="resnet18")


def test_unknown_backbone():
    # A torchvision network without a feature map to take (auxiliary heads), and no network.
    for name in ("googlenet", "vgg17"):
        with pytest.raises(ValueError, match=f"'{name}' is not one this project can use"):
            build_backbone(name, pretrained=False)


def test_model_py_alone_builds_resnets_and_names_what_other_backbones_need(monkeypatch):
    monkeypatch.setitem(sys.modules, "captioning", None)  # model.py copied without the project
    monkeypatch.setitem(sys.modules, "captioning.backbones", None)
    EncoderCNN(EMBED, "resnet18", pretrained=False)
    with pytest.raises(ValueError, match=r"'squeezenet1_0' is not a ResNet.*build_backbone"):
        EncoderCNN(EMBED, "squeezenet1_0", pretrained=False)
    # The package hands it any other network as a module.
    monkeypatch.undo()
    backbone = build_backbone("squeezenet1_0", pretrained=False)
    assert EncoderCNN(EMBED, backbone).backbone is backbone


def test_forget_gate_bias_initialised():
    decoder = DecoderRNN(EMBED, HIDDEN, VOCAB, num_layers=2, forget_bias=5.0)
    for layer in range(2):
        ih = getattr(decoder.lstm, f"bias_ih_l{layer}")
        hh = getattr(decoder.lstm, f"bias_hh_l{layer}")
        total = (ih + hh).detach()  # gates ordered input, forget, cell, output
        assert torch.equal(total[HIDDEN : 2 * HIDDEN], torch.full((HIDDEN,), 5.0))
        assert total[:HIDDEN].abs().max() < 1 and total[2 * HIDDEN :].abs().max() < 1


def test_decoder_scores_only_the_masked_outputs():
    torch.manual_seed(0)
    decoder = DecoderRNN(EMBED, HIDDEN, VOCAB).eval()
    features, captions = torch.randn(3, EMBED), torch.randint(0, VOCAB, (3, 7))
    scored = torch.rand(3, 7) > 0.4
    full = decoder(features, captions)  # (3, 7, VOCAB), CVND's: output t predicts captions[:, t]
    assert torch.allclose(decoder.score(features, captions).scores, full[:, 1:], atol=1e-6)
    only = decoder.score(features, captions, scored_positions(scored)).scores  # (scored, V)
    assert torch.allclose(only, full[:, 1:][scored[:, 1:]], atol=1e-6)


def test_the_lstm_runs_in_float32_under_any_autocast():
    # cuDNN's autocast runs nn.LSTM in float16 even under bfloat16, which has no gradient
    # scaler: the LSTM leaves autocast and reads float32, in every call of the protocol.
    torch.manual_seed(0)
    decoder = DecoderRNN(EMBED, HIDDEN, VOCAB)
    seen = []
    decoder.lstm.register_forward_pre_hook(
        lambda module, args: seen.append((torch.is_autocast_enabled("cpu"), args[0].dtype))
    )
    features = torch.randn(3, EMBED).bfloat16()  # as a projection under autocast gives it
    captions = torch.randint(0, VOCAB, (3, 6))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores = decoder.score(features, captions).scores
        state = decoder.init_state(features)
        decoder.step(captions[:, 1], state)
        decoder.sample(features[:1].unsqueeze(1), max_len=3)
    assert len(seen) >= 4 and set(seen) == {(False, torch.float32)}
    scores.float().sum().backward()
    assert decoder.lstm.weight_hh_l0.grad.dtype == torch.float32
