"""The demo's image network: a small CNN trained from scratch, handed to `model.EncoderCNN` as
its backbone (`EncoderCNN(embed_size, SmallCNN())`)."""

import torch
import torch.nn as nn


class SmallCNN(nn.Module):
    """Four conv blocks for small images (the demo dataset), trained from scratch; answers
    EncoderCNN's backbone interface (`out_features`, `blocks`, `feature_map`, pooled forward)."""

    def __init__(self, width=16):
        super().__init__()
        layers, channels = [], 3
        # The last block's kernel is 1x1: it joins the colour and the shape seen at one place
        # into colour-shape units without widening the view to the neighbouring shapes, which
        # would let one shape's colour pair with another's outline.
        for k, kernel in enumerate((3, 3, 3, 1)):
            out = width * 2**k
            layers += [
                nn.Conv2d(channels, out, kernel, padding=kernel // 2, bias=False),
                nn.BatchNorm2d(out),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            channels = out
        # Global max pooling: each channel says whether its pattern is anywhere in the image,
        # the presence signal a caption needs and a clean gradient path to where it was seen.
        layers += [nn.AdaptiveMaxPool2d(1), nn.Flatten()]
        self.net = nn.Sequential(*layers)
        self.out_features = channels
        self.blocks = [self.net[4 * k : 4 * k + 4] for k in range(4)]
        # Channels-last convolutions and pooling run faster on CPU (oneDNN).
        self.to(memory_format=torch.channels_last)

    def feature_map(self, images):
        """The last block's map, before the global pooling: (batch, out_features, h, w)."""
        return self.net[:-2](images.contiguous(memory_format=torch.channels_last))

    def forward(self, images):
        """The globally max-pooled map: (batch, out_features)."""
        return self.net(images.contiguous(memory_format=torch.channels_last))
