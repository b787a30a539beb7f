"""The Udacity CVND project's training loop, run as its 2_Training.ipynb writes it."""

import itertools
import math

import numpy as np
import torch
import torch.nn as nn
import torch.utils.data as data

from captioning.demo.small_cnn import SmallCNN
from data_loader import get_loader, make_transform
from model import DecoderRNN, EncoderCNN

EMBED_SIZE, HIDDEN_SIZE, BATCH_SIZE, STEPS = 32, 64, 16, 40


def held_out_loss(encoder, decoder, batches, criterion, vocab_size):
    """Mean CVND loss over batches the loop never trains on."""
    encoder.eval(), decoder.eval()
    with torch.no_grad():
        losses = [
            criterion(decoder(encoder(images), captions).view(-1, vocab_size), captions.view(-1))
            for images, captions in batches
        ]
    encoder.train(), decoder.train()
    return float(torch.stack(losses).mean())


def assert_batch_is_drawn(dataset, indices, images, captions):
    """Every row of the batch is the (image, caption) of one drawn index, each index used once."""
    unused = list(indices)
    for image, caption in zip(images, captions):
        match = next(
            i for i in unused
            if torch.equal(dataset[i][1], caption) and torch.equal(dataset[i][0], image)
        )  # fmt: skip
        unused.remove(match)
    assert not unused


def test_cvnd_training_loop_trains_on_the_batches_it_draws(demo_root, tmp_path):
    torch.manual_seed(0)
    np.random.seed(0)
    # A transform without random crops, so that the images can be compared with the dataset's.
    transform_train = make_transform(32)
    vocab_file = str(tmp_path / "vocab.json")
    data_loader = get_loader(
        transform=transform_train, mode="train", batch_size=BATCH_SIZE, vocab_threshold=1,
        vocab_file=vocab_file, vocab_from_file=False, data_dir=demo_root,
    )  # fmt: skip
    vocab_size = len(data_loader.dataset.vocab)
    total_step = math.ceil(
        len(data_loader.dataset.caption_lengths) / data_loader.batch_sampler.batch_size
    )
    assert total_step == math.ceil(len(data_loader.dataset) / BATCH_SIZE)
    val_loader = get_loader(
        transform=transform_train, mode="train", split="val", batch_size=BATCH_SIZE,
        vocab_file=vocab_file, vocab_from_file=True, data_dir=demo_root,
    )  # fmt: skip
    held_out = list(itertools.islice(val_loader, 6))

    encoder = EncoderCNN(
        EMBED_SIZE, backbone=SmallCNN()
    )  # a module: model.py builds ResNets by name
    decoder = DecoderRNN(EMBED_SIZE, HIDDEN_SIZE, vocab_size)
    criterion = nn.CrossEntropyLoss()
    params = list(decoder.parameters()) + list(encoder.embed.parameters())
    optimizer = torch.optim.Adam(params, lr=0.003)
    before = held_out_loss(encoder, decoder, held_out, criterion, vocab_size)

    drawn = []
    for _ in range(STEPS):
        # As in CVND's 2_Training.ipynb, line for line.
        indices = data_loader.dataset.get_train_indices()
        new_sampler = data.sampler.SubsetRandomSampler(indices=indices)
        data_loader.batch_sampler.sampler = new_sampler
        images, captions = next(iter(data_loader))

        assert len(indices) == BATCH_SIZE
        assert_batch_is_drawn(data_loader.dataset, indices, images, captions)
        drawn.append(tuple(sorted(indices)))

        decoder.zero_grad()
        encoder.zero_grad()
        features = encoder(images)
        outputs = decoder(features, captions)
        loss = criterion(outputs.view(-1, vocab_size), captions.view(-1))
        loss.backward()
        optimizer.step()

    assert len(set(drawn)) == STEPS  # a new batch every step
    after = held_out_loss(encoder, decoder, held_out, criterion, vocab_size)
    assert after < 0.8 * before, (before, after)


def test_assigned_sampler_sets_the_loader_length(demo_root, tmp_path):
    data_loader = get_loader(
        transform=make_transform(32), mode="train", batch_size=4, vocab_threshold=1,
        vocab_file=str(tmp_path / "vocab.json"), vocab_from_file=False, data_dir=demo_root,
    )  # fmt: skip
    epoch_batches = len(data_loader)
    assert sum(len(b) for b in data_loader.batch_sampler) == len(data_loader.dataset)
    data_loader.batch_sampler.sampler = data.sampler.SubsetRandomSampler(indices=list(range(10)))
    assert len(data_loader) == 3 and [len(b) for b in data_loader.batch_sampler] == [4, 4, 2]
    data_loader.batch_sampler.sampler = None  # back to whole epochs
    assert len(data_loader) == epoch_batches


def test_cvnd_inference_steps_with_encoder_and_decoder_loaded_from_a_checkpoint(
    demo_root, tmp_path, capsys
):
    # CVND's 3_Inference, as 3_Inference.ipynb walks it: a test-mode loader, the encoder and
    # decoder built by hand and loaded from the trained weights, sample, clean_sentence and
    # get_prediction; the caption is the one the package's batched greedy decoding gives.
    import matplotlib

    matplotlib.use("Agg")
    from captioning.backbones import build_backbone
    from captioning.caption import caption_images
    from captioning.checkpoint import load_checkpoint, submodule_state
    from captioning.cvnd import clean_sentence, get_prediction
    from captioning.training.train import train
    from tests.helpers import tiny_config

    config = tiny_config(demo_root, tmp_path, epochs=1)
    train(config)
    state = load_checkpoint(tmp_path / "best.pt")
    transform_test = make_transform(config.image_size)
    data_loader = get_loader(transform=transform_test, mode="test", data_dir=demo_root,
                             vocab_file=str(tmp_path / "vocab.json"))  # fmt: skip
    vocab_size = len(data_loader.dataset.vocab)
    encoder = EncoderCNN(config.embed_size, build_backbone(config.backbone, pretrained=False),
                         feature_norm=config.feature_norm)  # fmt: skip
    decoder = DecoderRNN(config.embed_size, config.hidden_size, vocab_size)
    encoder.load_state_dict(submodule_state(state["model"], "encoder"))
    decoder.load_state_dict(submodule_state(state["model"], "decoder"))
    encoder.eval(), decoder.eval()
    orig_image, image = next(iter(data_loader))
    assert orig_image.shape == (1, 64, 64, 3) and image.shape == (1, 3, 32, 32)
    output = decoder.sample(encoder(image).unsqueeze(1))
    sentence = clean_sentence(output, data_loader.dataset.vocab)
    first = data_loader.dataset.split.image_paths[0]
    assert sentence == caption_images(tmp_path / "best.pt", [first])[first]
    assert "<start>" not in sentence and "<end>" not in sentence
    assert get_prediction(data_loader, encoder, decoder) == sentence
    assert capsys.readouterr().out.strip().endswith(sentence)
