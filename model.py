"""Captioning models: a CNN encoder, an LSTM decoder (Show and Tell) and an attention LSTM
decoder (Show, Attend and Tell); needs only torch and torchvision."""

import urllib.error

import torch
import torch.nn as nn
import torchvision

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
# torchvision classification networks whose last feature map (ViT: patch tokens) we know how to
# take: residual nets, RegNets, every `features` stack, Swin and ViT. Not GoogLeNet, Inception
# (auxiliary heads), MNASNet, ShuffleNet or MaxViT.
FAMILIES = ("resnet", "resnext", "wide_resnet", "regnet", "vgg", "alexnet", "efficientnet",
            "mobilenet", "convnext", "densenet", "squeezenet", "swin", "vit_")  # fmt: skip
TORCHVISION_BACKBONES = tuple(
    name
    for name in torchvision.models.list_models(module=torchvision.models)
    if name.startswith(FAMILIES)
)
BACKBONES = TORCHVISION_BACKBONES + ("smallcnn",)


class SmallCNN(nn.Module):
    """Four conv blocks for small images (the demo dataset), trained from scratch."""

    def __init__(self, width=16):
        super().__init__()
        layers, channels = [], 3
        # The last block's kernel is 1x1: it joins the colour and the shape seen at one place
        # into colour-shape units without widening the view to the neighbouring shapes, which
        # would let one shape's colour pair with another's outline (3x3 there: 63% of demo
        # captions right, not 68%).
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
        # Channels-last convolutions and pooling run about a third faster on CPU (oneDNN).
        self.to(memory_format=torch.channels_last)

    def forward(self, images):
        return self.net(
            images.contiguous(memory_format=torch.channels_last)
        )  # (batch, out_features)


def build_backbone(name, pretrained=True, weights_path=None):
    """A torchvision classification network by name without its classifier, its feature size,
    and its last 4 blocks (`net.blocks`, for `trainable_blocks`)."""
    if name not in TORCHVISION_BACKBONES:
        raise ValueError(
            f"backbone {name!r} is not one this project can use; choose smallcnn or one of "
            f"torchvision's: {', '.join(TORCHVISION_BACKBONES)}"
        )
    if weights_path is not None:
        net = torchvision.models.get_model(name, weights=None)
        load_weights(net, name, weights_path)
    elif pretrained:
        weights = torchvision.models.get_model_weights(name).DEFAULT
        try:
            net = torchvision.models.get_model(name, weights=weights)
        except (urllib.error.URLError, OSError) as e:
            raise RuntimeError(
                f"Could not download the ImageNet weights for {name} from {weights.url} ({e}). "
                f"Connect to the internet, or put that file in {torch.hub.get_dir()}/checkpoints/, "
                "or pass weights_path=<local .pth file>, or pretrained=False for random "
                "weights."
            ) from None
    else:
        net = torchvision.models.get_model(name, weights=None)
    return strip_classifier(net)


def load_weights(net, name, weights_path):
    """Load a local state dict into `net`, with an error that names the file and the cause."""
    try:
        # weights_only: tensors and plain data only; a file that would run code is refused.
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        net.load_state_dict(state)
    except FileNotFoundError:
        raise FileNotFoundError(f"{weights_path}: weights file not found") from None
    except Exception as e:  # UnpicklingError, RuntimeError, EOFError... by cause
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        # torch's refusal is a page of advice (including how to load it anyway); the
        # reason is one line of it.
        refused = [line for line in lines if line.startswith("WeightsUnpickler error:")]
        detail = refused[0].split(". ")[0] if refused else " ".join(lines) or "empty"
        detail = detail if len(detail) <= 300 else detail[:300] + " ..."
        raise RuntimeError(
            f"{weights_path}: not usable {name} weights ({type(e).__name__}: {detail}). "
            "Weights files are read with weights_only=True, so files holding code are "
            "refused; give a state dict saved with torch.save(model.state_dict(), path)."
        ) from None


def strip_classifier(net):
    """(net without its classifier, feature size); `net.blocks` are its last 4 stages.

    The net stays torchvision's own module, so its weights keep torchvision's names.
    """
    if isinstance(net, torchvision.models.VisionTransformer):
        net.heads = nn.Identity()
        layers = list(net.encoder.layers)
        size = -(-len(layers) // 4)  # (the encoder's layers in 4 groups)
        net.blocks = [nn.Sequential(*layers[k * size : (k + 1) * size]) for k in range(4)]
        return net, net.hidden_dim
    if hasattr(net, "layer4"):  # ResNet, ResNeXt, Wide ResNet
        features = net.fc.in_features
        net.fc = nn.Identity()
        net.blocks = [net.layer1, net.layer2, net.layer3, net.layer4]
        return net, features
    if hasattr(net, "trunk_output"):  # RegNet
        features = net.fc.in_features
        net.fc = nn.Identity()
        net.blocks = list(net.trunk_output.children())[-4:]
        return net, features
    # A `features` stack (VGG, AlexNet, EfficientNet, MobileNet, ConvNeXt, DenseNet, SqueezeNet,
    # Swin): the classifier (VGG's holds 120M of its 138M weights) goes.
    for head in ("classifier", "head"):
        if hasattr(net, head):
            setattr(net, head, nn.Identity())
    stages = list(net.features.children())
    if isinstance(net, (torchvision.models.VGG, torchvision.models.AlexNet)):
        # Flat layers: a block is what lies between two max-pooling layers.
        bounds = [0] + [k + 1 for k, m in enumerate(stages) if isinstance(m, nn.MaxPool2d)]
        stages = [nn.Sequential(*stages[a:b]) for a, b in zip(bounds, bounds[1:])]
    net.blocks = stages[-4:]
    with torch.no_grad():
        features = torchvision_feature_map(net.eval(), torch.zeros(1, 3, 224, 224)).shape[1]
    return net.train(), features


def torchvision_feature_map(net, images):
    """The last feature map (batch, channels, h, w) of a torchvision net from `strip_classifier`;
    for a ViT, its patch tokens laid out as their grid."""
    if isinstance(net, torchvision.models.VisionTransformer):
        if images.shape[-1] != net.image_size or images.shape[-2] != net.image_size:
            raise ValueError(
                f"a ViT takes {net.image_size}x{net.image_size} images, not "
                f"{images.shape[-2]}x{images.shape[-1]}: set image_size={net.image_size}"
            )
        tokens = net._process_input(images)  # (batch, patches, hidden)
        tokens = torch.cat([net.class_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        patches = net.encoder(tokens)[:, 1:]  # (batch, patches, hidden), class token dropped
        side = net.image_size // net.patch_size
        return patches.transpose(1, 2).reshape(patches.shape[0], -1, side, side)
    if hasattr(net, "layer4"):
        x = net.maxpool(net.relu(net.bn1(net.conv1(images))))
        return net.layer4(net.layer3(net.layer2(net.layer1(x))))
    if hasattr(net, "trunk_output"):
        return net.trunk_output(net.stem(images))
    x = net.features(images)
    if isinstance(net, torchvision.models.SwinTransformer):
        return net.permute(net.norm(x))  # (batch, h, w, channels) -> (batch, channels, h, w)
    if isinstance(net, torchvision.models.DenseNet):
        return nn.functional.relu(x)
    return x


def torchvision_pooled(net, images):
    """The pooled feature (batch, feature_size) that the net's classifier would read."""
    if isinstance(net, torchvision.models.VisionTransformer) or hasattr(net, "fc"):
        return net(images)  # ResNet, RegNet: avgpool then fc=Identity; ViT: the class token
    return torchvision_feature_map(net, images).mean(dim=(2, 3))


class EncoderCNN(nn.Module):
    """CNN backbone (frozen by default) then a linear projection: images -> (batch, embed_size).

    With `grid`, the spatial grid (batch, positions, feature_size) instead, for the attention
    decoder (`grid_size` as in `extract_grid`).
    """

    def __init__(
        self,
        embed_size,
        backbone="resnet50",
        pretrained=True,
        weights_path=None,
        trainable_blocks=0,
        feature_norm="batch",
        grid=False,
        grid_size=None,
    ):
        super().__init__()
        if backbone == "smallcnn":
            self.backbone = SmallCNN()
            feature_size = self.backbone.out_features
        else:
            self.backbone, feature_size = build_backbone(backbone, pretrained, weights_path)
        self.feature_size = feature_size
        self.trainable_blocks = trainable_blocks
        self.backbone.requires_grad_(trainable_blocks < 0)
        if trainable_blocks > 0:
            for block in self.backbone.blocks[-trainable_blocks:]:
                block.requires_grad_(True)
        # With `grid`, the encoder gives the attention decoder the spatial grid as it is.
        self.grid, self.grid_size = grid, grid_size
        if grid:
            self.embed = self.norm = nn.Identity()
            return
        self.embed = nn.Linear(feature_size, embed_size)
        # Batch norm on the image feature is what lets the LSTM use it: without centring, the
        # feature is nearly the same for every image and the decoder learns a caption prior.
        norms = {
            "batch": lambda: nn.BatchNorm1d(embed_size, momentum=0.01),
            "layer": lambda: nn.LayerNorm(embed_size),
            "none": nn.Identity,
        }
        if feature_norm not in norms:
            raise ValueError(f"feature_norm must be one of {list(norms)}, not {feature_norm!r}")
        self.norm = norms[feature_norm]()

    @property
    def frozen(self):
        return self.trainable_blocks == 0

    def train(self, mode=True):
        super().train(mode)
        if self.frozen:
            self.backbone.eval()  # frozen batch-norm statistics stay ImageNet's
        return self

    def extract(self, images):
        """Pooled backbone features: (batch, 3, H, W) -> (batch, feature_size)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            if isinstance(self.backbone, SmallCNN):
                return self.backbone(images)  # (batch, feature_size)
            return torchvision_pooled(self.backbone, images).flatten(1)  # (batch, feature_size)

    def project(self, features):
        """Backbone features -> (batch, embed_size); a grid passes unchanged."""
        embedded = self.embed(features)
        if self.training and embedded.shape[0] == 1 and type(self.norm) is nn.BatchNorm1d:
            # Batch statistics of one sample are undefined: a lone caption uses the running ones.
            return nn.functional.batch_norm(
                embedded,
                self.norm.running_mean,
                self.norm.running_var,
                self.norm.weight,
                self.norm.bias,
                False,
                0.0,
                self.norm.eps,
            )
        return self.norm(embedded)

    def forward(self, images):
        return self.project(self.backbone_features(images))

    def backbone_features(self, images):
        """What the feature cache holds: pooled (batch, feature_size), or the grid
        (batch, positions, feature_size) for an attention decoder."""
        return self.extract_grid(images, self.grid_size) if self.grid else self.extract(images)

    def feature_map(self, images):
        """The backbone's last feature map, before pooling: (batch, feature_size, h, w)."""
        net = self.backbone
        if isinstance(net, SmallCNN):
            return net.net[:-2](images.contiguous(memory_format=torch.channels_last))
        return torchvision_feature_map(net, images)

    def extract_grid(self, images, grid_size=None):
        """Spatial features (batch, positions, feature_size), for attention.

        The last feature map, adaptive-average-pooled to grid_size x grid_size (None: as it
        is, e.g. 7x7 for a ResNet at 224 px, 4x4 for the small CNN at 64 px).
        """
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            grid = self.feature_map(images)
            if grid_size is not None:
                grid = nn.functional.adaptive_avg_pool2d(grid, grid_size)
            return grid.flatten(2).transpose(1, 2)  # (batch, h * w, feature_size)


class DecoderRNN(nn.Module):
    """LSTM decoder: the image feature is the first input, then the embedded caption tokens."""

    def __init__(
        self,
        embed_size,
        hidden_size,
        vocab_size,
        num_layers=1,
        dropout=0.0,
        end_id=1,
        start_id=0,
        forget_bias=1.0,
    ):
        super().__init__()
        self.start_id, self.end_id = start_id, end_id
        self.embed = nn.Embedding(vocab_size, embed_size)
        self.lstm = nn.LSTM(
            embed_size,
            hidden_size,
            num_layers,
            batch_first=True,
            dropout=dropout if num_layers > 1 else 0.0,
        )
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(hidden_size, vocab_size)
        # A positive forget-gate bias (Jozefowicz et al., 2015) keeps the image, seen once at
        # step 0, in the cell for the words that need it instead of fading at every step.
        with torch.no_grad():
            for name, bias in self.lstm.named_parameters():
                if name.startswith("bias_"):  # gates are ordered input, forget, cell, output
                    bias[hidden_size : 2 * hidden_size] = (
                        forget_bias if name.startswith("bias_ih") else 0.0
                    )

    def forward(self, features, captions, scored=None):
        """Scores (batch, captions.shape[1], vocab_size); output t predicts captions[:, t].

        Output 0 is the image step's. Its word is always `<start>`, so, as in Show and Tell,
        it is given rather than predicted: training scores outputs 1 onwards only. With
        `scored`, a boolean mask (batch, seq_len), only those outputs are computed and
        returned, (mask.sum(), vocab_size): the vocabulary layer is most of the work, and
        padding and the image step need none of it.
        """
        embeddings = self.dropout(self.embed(captions[:, :-1]))  # (batch, seq_len - 1, embed)
        inputs = torch.cat([features.unsqueeze(1), embeddings], dim=1)  # (batch, seq_len, embed)
        hiddens, _ = self.lstm(inputs)
        if scored is not None:
            hiddens = hiddens[scored]  # (scored outputs, hidden)
        return self.fc(self.dropout(hiddens))  # (batch, seq_len, vocab) or (scored, vocab)

    def begin(self, features, states=None):
        """The image step: LSTM states after features (batch, embed), and `<start>` ids (batch,)."""
        _, states = self.lstm(features.unsqueeze(1), states)  # (batch, 1, embed) in
        start = torch.full(
            (features.size(0),), self.start_id, dtype=torch.long, device=features.device
        )
        return states, start

    def step(self, inputs, states=None):
        """One LSTM step: inputs (batch, 1, embed) -> scores (batch, vocab), new states."""
        hiddens, states = self.lstm(inputs, states)
        return self.fc(hiddens.squeeze(1)), states  # (batch, vocab)

    @torch.no_grad()
    def sample(self, inputs, states=None, max_len=20):
        """Greedy caption ids for one image: a list of ints, `<start>` first, `<end>` last if reached.

        `inputs` is the image feature shaped (1, 1, embed_size), as in the CVND project.
        """
        states, word = self.begin(inputs.flatten(1), states)  # (1, embed) in
        ids = [int(word)]
        while len(ids) < max_len and ids[-1] != self.end_id:
            scores, states = self.step(self.embed(word).unsqueeze(1), states)  # (1, 1, embed) in
            word = scores.argmax(dim=1)
            ids.append(int(word))
        return ids


class AttentionDecoder(nn.Module):
    """LSTM decoder with soft attention over the image grid at every word (Show, Attend and Tell).

    At each step the previous hidden state and the previous word score every grid position
    (additive attention),
    the softmax of those scores weights the grid into a context vector, a gating scalar
    (sigmoid of the hidden state) scales it, and the LSTM reads the previous word's embedding
    with that context. The word scores come from the new hidden state, the context and the
    previous word (the paper's deep output). The state starts from the mean grid feature; it is
    (h, c, coverage), the coverage being the attention each position has had so far.
    """

    def __init__(self, feature_size, embed_size, hidden_size, vocab_size, attention_size=None,
                 dropout=0.0, end_id=1, start_id=0, forget_bias=1.0, attention_weight=1.0):  # fmt: skip
        super().__init__()
        self.attention_weight = attention_weight
        attention_size = attention_size or hidden_size
        self.start_id, self.end_id = start_id, end_id
        self.embed = nn.Embedding(vocab_size, embed_size)
        # One bias before the tanh (two would be one parameter twice), none after it: softmax
        # ignores a shift, so that bias would get only rounding noise as its gradient.
        self.grid_attention = nn.Linear(feature_size, attention_size)
        # The query is the hidden state and the word just read: demo captions list objects in
        # random order, so only the word says which object the next words describe (with the
        # hidden state alone, 3-shape captions paired colours with the wrong shapes).
        self.hidden_attention = nn.Linear(hidden_size + embed_size, attention_size, bias=False)
        # Coverage (Tu et al., 2016): the attention a position has already had enters its
        # score, so that "a blue star and a blue square" can move on to the other blue object;
        # the grid features hold no position, and without it demo captions named one twice.
        self.coverage_attention = nn.Linear(1, attention_size, bias=False)
        self.attention_score = nn.Linear(attention_size, 1, bias=False)
        self.gate = nn.Linear(hidden_size, 1)
        self.init_h = nn.Linear(feature_size, hidden_size)
        self.init_c = nn.Linear(feature_size, hidden_size)
        self.lstm = nn.LSTMCell(embed_size + feature_size, hidden_size)
        self.dropout = nn.Dropout(dropout)
        # Deep output (Xu et al., eq. 7): the context reaches the word scores directly, not only
        # through the LSTM, so a shape word is read off the object that its colour word chose.
        self.hidden_out = nn.Linear(hidden_size, embed_size)
        self.context_out = nn.Linear(feature_size, embed_size, bias=False)
        self.fc = nn.Linear(embed_size, vocab_size)
        with torch.no_grad():  # gates: input, forget, cell, output (as in DecoderRNN)
            self.lstm.bias_ih[hidden_size : 2 * hidden_size] = forget_bias
            self.lstm.bias_hh[hidden_size : 2 * hidden_size] = 0.0

    def begin(self, grid):
        """State (h, c, coverage) from the mean grid feature, and the grid's projection for
        attention."""
        mean = grid.mean(dim=1)  # (batch, feature_size)
        coverage = grid.new_zeros(grid.shape[:2])  # (batch, positions)
        state = (torch.tanh(self.init_h(mean)), torch.tanh(self.init_c(mean)), coverage)
        return state, self.grid_attention(grid)  # (batch, positions, attention)

    def attend(self, grid, projected, hidden, word, coverage):
        """Gated context (batch, feature_size) and attention weights (batch, positions), queried
        by the hidden state and the embedded word (batch, embed_size), given the coverage."""
        query = self.hidden_attention(torch.cat([hidden, word], dim=1))  # (batch, attention)
        covered = self.coverage_attention(coverage.unsqueeze(2))  # (batch, positions, attention)
        energy = torch.tanh(projected + query.unsqueeze(1) + covered)
        scores = self.attention_score(energy).squeeze(2)  # (batch, positions)
        weights = scores.softmax(dim=1)
        context = torch.bmm(weights.unsqueeze(1), grid).squeeze(1)  # (batch, feature_size)
        return torch.sigmoid(self.gate(hidden)) * context, weights

    def advance(self, words, state, grid, projected):
        """Attend, then one LSTM step on the words (batch,) and the context: the new state, the
        output's word-and-context term (batch, embed_size) and the weights (batch, positions)."""
        hidden, cell, coverage = state
        word = self.dropout(self.embed(words))  # (batch, embed)
        context, weights = self.attend(grid, projected, hidden, word, coverage)
        hidden, cell = self.lstm(torch.cat([word, context], dim=1), (hidden, cell))
        return (hidden, cell, coverage + weights), word + self.context_out(context), weights

    def output(self, hidden, reading):
        """Word scores (..., vocab) from hidden states and `advance`'s terms (..., embed_size)."""
        return self.fc(self.dropout(self.hidden_out(hidden) + reading))

    def step(self, words, state, grid, projected):
        """One word: ids (batch,) -> scores (batch, vocab), new state, attention (batch, positions)."""
        state, reading, weights = self.advance(words, state, grid, projected)
        return self.output(state[0], reading), state, weights

    def forward(self, grid, captions, scored=None):
        """Word scores and attention weights for captions (batch, seq_len) that start with `<start>`.

        Output t predicts captions[:, t + 1] from the words before it: scores (batch,
        seq_len - 1, vocab) and weights (batch, seq_len - 1, positions). With `scored`, a mask
        (batch, seq_len) of the words to predict (as in `DecoderRNN.forward`; column 0,
        `<start>`, is never predicted), scores are (scored.sum(), vocab) and the weights of
        unscored steps are zero.
        """
        state, projected = self.begin(grid)
        hiddens, readings, weights = [], [], []
        for t in range(captions.size(1) - 1):
            state, reading, alpha = self.advance(captions[:, t], state, grid, projected)
            hiddens.append(state[0])
            readings.append(reading)
            weights.append(alpha)
        hiddens = torch.stack(hiddens, dim=1)  # (batch, seq_len - 1, hidden)
        readings = torch.stack(readings, dim=1)  # (batch, seq_len - 1, embed)
        weights = torch.stack(weights, dim=1)  # (batch, seq_len - 1, positions)
        if scored is None:
            return self.output(hiddens, readings), weights
        predicted = scored[:, 1:]  # (batch, seq_len - 1)
        weights = weights * predicted.unsqueeze(2)
        return self.output(hiddens[predicted], readings[predicted]), weights  # (scored, vocab)

    @staticmethod
    def attention_penalty(weights):
        """Doubly stochastic regulariser: mean of (1 - attention a position got over the words)^2.

        Pushes every position to be attended about once over a caption (Xu et al., eq. 14);
        padded steps carry zero weights, so only the words predicted count.
        """
        return ((1.0 - weights.sum(dim=1)) ** 2).mean()

    @torch.no_grad()
    def sample(self, grid, max_len=20):
        """Greedy caption ids for one image's grid (1, positions, feature_size), `<start>` first,
        `<end>` last if reached, and the attention weights of each generated word (words, positions).
        """
        state, projected = self.begin(grid)
        word = torch.full((1,), self.start_id, dtype=torch.long, device=grid.device)
        ids, weights = [self.start_id], []
        while len(ids) < max_len and ids[-1] != self.end_id:
            scores, state, alpha = self.step(word, state, grid, projected)
            word = scores.argmax(dim=1)
            ids.append(int(word))
            weights.append(alpha[0])
        empty = grid.new_zeros(0, grid.size(1))
        return ids, torch.stack(weights) if weights else empty


class ShowAndTell(nn.Module):
    """Encoder and decoder as one module (one object to train, wrap in DDP, and save)."""

    def __init__(self, encoder, decoder, blind=False):
        super().__init__()
        self.encoder, self.decoder = encoder, decoder
        self.blind = blind

    def encode(self, inputs):
        """Image embedding from images (batch, 3, H, W) or cached features (batch, feature_size).

        A blind model (the ablation that shows what the words alone give) sees zero features
        whatever it is given, in training and captioning alike, and runs no CNN: a black
        image is no zero feature once a CNN's batch-norm statistics have shifted it.
        """
        grid = self.encoder.grid
        if self.blind:  # one zero position: attention over it gives a zero context
            shape = (1, self.encoder.feature_size) if grid else (self.encoder.feature_size,)
            inputs = inputs.new_zeros(inputs.shape[0], *shape)
        cached = inputs.dim() == (3 if grid else 2)
        return self.encoder.project(inputs) if cached else self.encoder(inputs)

    def forward(self, inputs, captions, owners=None, scored=None):
        """Scores (captions, seq_len, vocab); caption k describes image `owners[k]` (default k).

        `scored` (a mask over outputs) as in `DecoderRNN.forward`. An attention decoder gives
        (scores, attention penalty): its weighted doubly stochastic regulariser.
        """
        features = self.encode(inputs)  # (images, embed) or (images, positions, features)
        if owners is not None:
            features = features[owners]  # (captions, ...)
        if not isinstance(self.decoder, AttentionDecoder):
            return self.decoder(features, captions, scored)
        scores, weights = self.decoder(features, captions, scored)
        return scores, self.decoder.attention_weight * self.decoder.attention_penalty(weights)
