"""The functions the CVND inference notebook has its student write, written once: `clean_sentence`
and `get_prediction`, for an `EncoderCNN` and `DecoderRNN` loaded by hand (3_Inference.ipynb)."""

import matplotlib.pyplot as plt
import numpy as np
import torch


def clean_sentence(output, vocab):
    """The sentence of `decoder.sample`'s ids: its words, without `<start>`, and up to `<end>`."""
    return vocab.decode(output)


@torch.no_grad()
def get_prediction(data_loader, encoder, decoder, device="cpu", max_len=20):
    """CVND's get_prediction: the next image of a test-mode `get_loader` shown, and its greedy
    caption (`decoder.sample`) printed and returned."""
    orig_image, image = next(iter(data_loader))
    plt.imshow(np.squeeze(np.asarray(orig_image)))  # (1, H, W, 3) -> (H, W, 3)
    plt.title("Sample Image")
    plt.axis("off")
    plt.show()
    features = encoder(image.to(device)).unsqueeze(1)  # (1, embed) -> (1, 1, embed)
    sentence = clean_sentence(decoder.sample(features, max_len=max_len), data_loader.dataset.vocab)
    print(sentence)
    return sentence
