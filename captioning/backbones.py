"""Torchvision classification networks and timm's image models as captioning backbones, by name.

`build_backbone(name)` gives the module `model.EncoderCNN` uses: for a ResNet, model.py's own;
for any other torchvision family, the network wrapped in `TorchvisionBackbone`; for
"timm:<model name>", timm's model wrapped in `TimmBackbone`; for "smallcnn", the demo's small
CNN. model.py builds ResNets by name and never imports this package (it stays one file that needs
only torch and torchvision); the package passes it the module this builds.
"""

import torch
import torch.nn as nn
import torchvision

from captioning.demo.small_cnn import SmallCNN
from captioning.errors import ConfigError
from captioning.timm_models import check_timm_backbone, create_timm_model, timm_model_name
from model import RESNETS, ResNet, torchvision_net

# Families besides the ResNets whose last feature map (ViT: patch tokens) we know how to take:
# RegNets, every `features` stack, Swin and ViT. Not GoogLeNet, Inception (auxiliary heads),
# MNASNet, ShuffleNet or MaxViT.
FAMILIES = ("regnet", "vgg", "alexnet", "efficientnet", "mobilenet", "convnext", "densenet",
            "squeezenet", "swin", "vit_")  # fmt: skip
TORCHVISION_BACKBONES = tuple(
    name
    for name in torchvision.models.list_models(module=torchvision.models)
    if name in RESNETS or name.startswith(FAMILIES)
)


def check_backbone(name, pretrained=False, weights_path=None, field="backbone"):
    """Raise `ConfigError` (naming `field`) unless `name` is a backbone this project builds:
    smallcnn, one of TORCHVISION_BACKBONES, or "timm:<model name>" (`check_timm_backbone`)."""
    if timm_model_name(name) is not None:
        check_timm_backbone(name, pretrained, weights_path, field)
    elif name != "smallcnn" and name not in TORCHVISION_BACKBONES:
        choices = ", ".join(map(repr, (*TORCHVISION_BACKBONES, "smallcnn")))
        raise ConfigError(
            f"{field}: {name!r} is not allowed; choose one of {choices}, or timm:<model name>"
        )


def build_backbone(name, pretrained=True, weights_path=None):
    """EncoderCNN's backbone module for torchvision's network `name`, without its classifier,
    with ImageNet weights (`pretrained`), a local file's (`weights_path`) or random ones; the
    same for timm's model "timm:<model name>" (its tag's weights); or the demo's small CNN
    ("smallcnn", always trained from scratch)."""
    if name == "smallcnn":
        return SmallCNN()
    if timm_model_name(name) is not None:
        return TimmBackbone(create_timm_model(name, pretrained, weights_path), name)
    if name not in TORCHVISION_BACKBONES:
        raise ValueError(
            f"backbone {name!r} is not one this project can use; choose smallcnn, one of "
            f"torchvision's: {', '.join(TORCHVISION_BACKBONES)}, or timm:<model name>"
        )
    if name in RESNETS:  # model.py's own, so that a ResNet has one set of weight names
        return ResNet(name, pretrained, weights_path)
    return TorchvisionBackbone(torchvision_net(name, pretrained, weights_path))


class TorchvisionBackbone(nn.Module):
    """A torchvision classification network without its classifier, with EncoderCNN's backbone
    interface: `out_features`, `blocks` (its last 4 stages), `feature_map` and pooled `forward`.

    The network stays torchvision's own module, `net`: its weights keep torchvision's names.
    """

    def __init__(self, net):
        super().__init__()
        self.net = net
        if isinstance(net, torchvision.models.VisionTransformer):
            net.heads = nn.Identity()
            layers = list(net.encoder.layers)
            size = -(-len(layers) // 4)  # (the encoder's layers in 4 groups)
            self.blocks = [nn.Sequential(*layers[k * size : (k + 1) * size]) for k in range(4)]
            self.out_features = net.hidden_dim
            return
        if hasattr(net, "trunk_output"):  # RegNet
            self.out_features = net.fc.in_features
            net.fc = nn.Identity()
            self.blocks = list(net.trunk_output.children())[-4:]
            return
        # A `features` stack (VGG, AlexNet, EfficientNet, MobileNet, ConvNeXt, DenseNet,
        # SqueezeNet, Swin): the classifier (VGG's holds 120M of its 138M weights) goes.
        for head in ("classifier", "head"):
            if hasattr(net, head):
                setattr(net, head, nn.Identity())
        stages = list(net.features.children())
        if isinstance(net, (torchvision.models.VGG, torchvision.models.AlexNet)):
            # Flat layers: a block is what lies between two max-pooling layers.
            bounds = [0] + [k + 1 for k, m in enumerate(stages) if isinstance(m, nn.MaxPool2d)]
            stages = [nn.Sequential(*stages[a:b]) for a, b in zip(bounds, bounds[1:])]
        self.blocks = stages[-4:]
        with torch.no_grad():
            self.out_features = self.eval().feature_map(torch.zeros(1, 3, 224, 224)).shape[1]
        self.train()

    def feature_map(self, images):
        """The last feature map (batch, out_features, h, w); a ViT's patch tokens laid out as
        their grid."""
        net = self.net
        if isinstance(net, torchvision.models.VisionTransformer):
            if images.shape[-1] != net.image_size or images.shape[-2] != net.image_size:
                raise ValueError(
                    f"a ViT takes {net.image_size}x{net.image_size} images, not "
                    f"{images.shape[-2]}x{images.shape[-1]}: set image_size={net.image_size}"
                )
            # torchvision has no public call for the patch tokens: its forward keeps only the
            # class token.
            tokens = net._process_input(images)  # (batch, patches, hidden)
            tokens = torch.cat([net.class_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
            patches = net.encoder(tokens)[:, 1:]  # (batch, patches, hidden), class token dropped
            side = net.image_size // net.patch_size
            # (batch, patches, hidden) -> (batch, hidden, side, side)
            return patches.transpose(1, 2).reshape(patches.shape[0], -1, side, side)
        if hasattr(net, "trunk_output"):
            return net.trunk_output(net.stem(images))
        x = net.features(images)
        if isinstance(net, torchvision.models.SwinTransformer):
            return net.permute(net.norm(x))  # (batch, h, w, channels) -> (batch, channels, h, w)
        if isinstance(net, torchvision.models.DenseNet):
            # DenseNet's forward applies its last ReLU after `features`.
            return nn.functional.relu(x)
        return x

    def forward(self, images):
        """The pooled feature that the network's classifier would read: (batch, out_features)."""
        net = self.net
        if isinstance(net, torchvision.models.VisionTransformer) or hasattr(net, "trunk_output"):
            return net(images)  # ViT: the class token; RegNet: average pooling, fc=Identity
        return self.feature_map(images).mean(dim=(2, 3))


class TimmBackbone(nn.Module):
    """A timm image model without its classifier, with EncoderCNN's backbone interface:
    `out_features`, `blocks` (its last 4 stages), `feature_map` and pooled `forward`.

    The model stays timm's own module, `net`: its weights keep timm's names. `name` is the
    backbone's name ("timm:<model name>"), for errors.
    """

    def __init__(self, net, name):
        super().__init__()
        self.net, self.name = net, name
        self.out_features = net.num_features  # the channels of forward_features' map or tokens
        # timm's coarse parameter groups (those of its layer-wise learning-rate decay): the stem,
        # then each stage (a ViT: each transformer block), the final norm joining the last.
        from timm.models import group_parameters

        groups = group_parameters(net, net.group_matcher(coarse=True), return_values=True)
        stages = [groups[k] for k in sorted(groups)][1:]  # the stem is never trained alone
        # In 4 runs to the end: a ResNet's 4 stages; a ConvNeXt's 4 and its head norm with the
        # last; 12 ViT blocks 3 by 3. A ParameterList unfreezes them (its weights are net's).
        bounds = [len(stages) * k // 4 for k in range(5)]
        self.blocks = [
            nn.ParameterList([p for stage in stages[a:b] for p in stage])
            for a, b in zip(bounds, bounds[1:])
            if b > a
        ]
        # Where the classifier reads a wider vector than the map (MobileNetV3's head
        # convolution), the pooled feature is the map's average, so that both have out_features.
        self.pooled_by_head = getattr(net, "head_hidden_size", net.num_features) == net.num_features
        cfg = net.pretrained_cfg
        self.fixed_size = tuple(cfg["input_size"][1:]) if cfg.get("fixed_input_size") else None

    def check_size(self, images):
        """A ValueError unless a model that takes one input size (a ViT) is given that size."""
        if self.fixed_size is not None and tuple(images.shape[-2:]) != self.fixed_size:
            height, width = self.fixed_size
            raise ValueError(
                f"{self.name} takes {height}x{width} images, not "
                f"{images.shape[-2]}x{images.shape[-1]}: set image_size={height}"
            )

    def feature_map(self, images):
        """The last feature map (batch, out_features, h, w); a ViT's patch tokens laid out as
        their grid, its class (and other prefix) tokens dropped."""
        self.check_size(images)
        features = self.net.forward_features(images)
        if features.ndim == 3:  # tokens: (batch, prefix + h * w, out_features)
            height, width = self.net.patch_embed.grid_size
            patches = features[:, features.shape[1] - height * width :]  # prefix tokens dropped
            # (batch, h * w, out_features) -> (batch, out_features, h, w)
            return patches.transpose(1, 2).reshape(patches.shape[0], -1, height, width)
        if getattr(self.net, "output_fmt", "NCHW") == "NHWC":  # Swin's: channels last
            return features.permute(0, 3, 1, 2)  # -> (batch, out_features, h, w)
        return features

    def forward(self, images):
        """The pooled feature that the model's classifier would read (a ViT: its class token, or
        its pool), or the map's average: (batch, out_features)."""
        if not self.pooled_by_head:
            return self.feature_map(images).mean(dim=(2, 3))
        self.check_size(images)
        return self.net.forward_head(self.net.forward_features(images), pre_logits=True)
