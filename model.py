"""Captioning models: a CNN encoder, an LSTM decoder (Show and Tell) and an attention LSTM
decoder (Show, Attend and Tell); needs only torch and torchvision."""

import urllib.error
from typing import NamedTuple

import torch
import torch.nn as nn
import torchvision

# torchvision's ResNet class builds these; EncoderCNN builds them by name (any other network is
# passed in as a module: the project's captioning.backbones.build_backbone makes them).
RESNETS = tuple(
    name
    for name in torchvision.models.list_models(module=torchvision.models)
    if name.startswith(("resnet", "resnext", "wide_resnet"))
)


class WeightsError(RuntimeError):
    """ImageNet weights that could not be downloaded, or a weights file that cannot be used."""


def torchvision_net(name, pretrained=True, weights_path=None):
    """torchvision's network `name` with ImageNet weights (`pretrained`), a local file's
    (`weights_path`) or random ones."""
    download = pretrained and weights_path is None
    weights = torchvision.models.get_model_weights(name).DEFAULT if download else None
    try:
        net = torchvision.models.get_model(name, weights=weights)
    except (urllib.error.URLError, OSError) as e:
        raise WeightsError(
            f"Could not download the ImageNet weights for {name} from {weights.url} ({e}). "
            f"Connect to the internet, or put that file in {torch.hub.get_dir()}/checkpoints/, "
            "or pass weights_path=<local .pth file>, or pretrained=False for random "
            "weights."
        ) from None
    if weights_path is not None:
        load_weights(net, name, weights_path)
    return net


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
        raise WeightsError(
            f"{weights_path}: not usable {name} weights ({type(e).__name__}: {detail}). "
            "Weights files are read with weights_only=True, so files holding code are "
            "refused; give a state dict saved with torch.save(model.state_dict(), path)."
        ) from None


class ResNet(nn.Module):
    """A torchvision ResNet (or ResNeXt, Wide ResNet) without its classifier, as a backbone; its
    layers keep torchvision's names, which every checkpoint's weights have."""

    def __init__(self, name="resnet50", pretrained=True, weights_path=None):
        super().__init__()
        if name not in RESNETS:
            raise ValueError(
                f"backbone {name!r} is not a ResNet, the family model.py builds by name "
                f"({', '.join(RESNETS)}); pass any other network as a module, such as this "
                f"project's captioning.backbones.build_backbone({name!r}, ...)"
            )
        net = torchvision_net(name, pretrained, weights_path)
        for layer in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            setattr(self, layer, getattr(net, layer))
        self.avgpool = net.avgpool
        self.out_features = net.fc.in_features

    @property
    def blocks(self):
        """Its 4 stages, for EncoderCNN's `trainable_blocks`."""
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def feature_map(self, images):
        """The last feature map: (batch, out_features, h, w)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, images):
        """The average-pooled map, as torchvision's ResNet pools it: (batch, out_features)."""
        return self.avgpool(self.feature_map(images)).flatten(1)  # (batch, out_features)


class EncoderCNN(nn.Module):
    """CNN backbone (frozen by default) then a linear projection: images -> (batch, embed_size);
    with `grid`, the spatial grid (batch, positions, feature_size) for attention instead.

    `backbone`: a ResNet's name (RESNETS), with ImageNet weights (`pretrained`) or a local file's
    (`weights_path`); or a module (captioning.backbones.build_backbone makes one of any other
    torchvision or timm network) with `out_features`, `blocks` (its last 4 stages, for
    `trainable_blocks`), `feature_map(images)` -> (batch, out_features, h, w) and a pooled
    `forward(images)` -> (batch, out_features).
    """

    def __init__(self, embed_size, backbone="resnet50", pretrained=True, weights_path=None,
                 trainable_blocks=0, feature_norm="batch", grid=False, grid_size=None):  # fmt: skip
        super().__init__()
        if isinstance(backbone, str):
            backbone = ResNet(backbone, pretrained, weights_path)  # other names: a ValueError
        self.backbone = backbone
        self.feature_size = feature_size = backbone.out_features
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
            return self.backbone(images)

    def project(self, features):
        """Backbone features -> (batch, embed_size); a grid passes unchanged."""
        embedded = self.embed(features)
        if self.training and embedded.shape[0] == 1 and type(self.norm) is nn.BatchNorm1d:
            # Batch statistics of one sample are undefined: a lone caption uses the running ones.
            norm = self.norm
            return nn.functional.batch_norm(
                embedded, norm.running_mean, norm.running_var, norm.weight, norm.bias, eps=norm.eps
            )
        return self.norm(embedded)

    def forward(self, images):
        return self.project(self.backbone_features(images))

    def backbone_features(self, images):
        """What the feature cache holds: pooled (batch, feature_size), or the grid
        (batch, positions, feature_size) for an attention decoder."""
        return self.extract_grid(images, self.grid_size) if self.grid else self.extract(images)

    def extract_grid(self, images, grid_size=None):
        """Spatial features (batch, positions, feature_size), for attention.

        The last feature map, adaptive-average-pooled to grid_size x grid_size (None: as it
        is, e.g. 7x7 for a ResNet at 224 px, 4x4 for the small CNN at 64 px).
        """
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            grid = self.backbone.feature_map(images)  # (batch, feature_size, h, w)
            if grid_size is not None:
                grid = nn.functional.adaptive_avg_pool2d(grid, grid_size)
            return grid.flatten(2).transpose(1, 2)  # (batch, h * w, feature_size)


class DecoderOutput(NamedTuple):
    """Teacher-forced scores of captions (batch, seq_len) that start with `<start>`: output t
    predicts captions[:, t + 1], the same for every decoder."""

    scores: torch.Tensor  # (batch, seq_len - 1, vocab), or (len(scored), vocab) with `scored`
    weights: torch.Tensor | None = None  # attention (batch, seq_len - 1, positions), if any


# The decoder protocol, which every decoder here answers and `decoding` and training rely on:
#   score(features, captions, scored=None) -> DecoderOutput, teacher-forced; `scored`, the flat
#       positions (n,) among the (batch, seq_len - 1) outputs to compute (`scored_positions`
#       makes them of a mask of the words to predict), computes only those;
#   init_state(features) -> state, a tuple of tensors with the batch first (searches reorder it
#       with index_select(0, rows));
#   step(words (batch,), state) -> (scores (batch, vocab), state, attention weights or None);
#   regulariser(output) -> what the decoder adds to its training loss (0.0: nothing);
#   start_id, end_id, vocab_size.


def scored_positions(scored):
    """The flat positions (n,) among a batch's (batch, seq_len - 1) outputs of the words that a
    mask (batch, seq_len) marks for prediction (column 0, `<start>`, is never predicted). It
    calls `nonzero`, which waits for the GPU: make them on the host before the batch goes there."""
    return scored[:, 1:].flatten().nonzero().squeeze(1)  # (batch * (seq_len - 1),) -> (n,)


def select_outputs(outputs, positions):
    """`outputs` (batch, steps, ...) at flat `positions` (n,): (n, ...). Unlike indexing by a
    mask, it needs no count from the device, so the host never waits for the GPU."""
    return outputs.flatten(0, 1).index_select(0, positions)  # (batch * steps, ...) -> (n, ...)


def positions_mask(positions, batch, steps):
    """(batch, steps) booleans, True at the flat `positions` (n,)."""
    mask = torch.zeros(batch * steps, dtype=torch.bool, device=positions.device)
    return mask.index_fill_(0, positions, True).view(batch, steps)  # (batch * steps,) -> 2-D


class DecoderRNN(nn.Module):
    """LSTM decoder (Show and Tell): the image feature is the first input, then the words."""

    def __init__(self, embed_size, hidden_size, vocab_size, num_layers=1, dropout=0.0, end_id=1,
                 start_id=0, forget_bias=1.0):  # fmt: skip
        super().__init__()
        self.start_id, self.end_id, self.vocab_size = start_id, end_id, vocab_size
        self.embed = nn.Embedding(vocab_size, embed_size)
        self.lstm = nn.LSTM(embed_size, hidden_size, num_layers, batch_first=True,
                            dropout=dropout if num_layers > 1 else 0.0)  # fmt: skip
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

    def run_lstm(self, inputs, states=None):
        """The LSTM over inputs (batch, steps, embed), in its weights' dtype (float32) whatever
        autocast says: cuDNN's autocast runs an LSTM in float16 even under bfloat16, and no
        gradient scaler guards bfloat16 training from float16's underflowing gradients."""
        dtype = self.lstm.weight_ih_l0.dtype
        with torch.autocast(inputs.device.type, enabled=False):
            states = None if states is None else tuple(s.to(dtype) for s in states)
            return self.lstm(inputs.to(dtype), states)

    def read(self, features, captions):
        """LSTM outputs (batch, seq_len, hidden) for the image step then captions[:, :-1]."""
        embeddings = self.dropout(self.embed(captions[:, :-1]))  # (batch, seq_len - 1, embed)
        # Under autocast the image feature may come in a lower precision than the embeddings.
        features = features.to(embeddings.dtype).unsqueeze(1)  # (batch, 1, embed)
        inputs = torch.cat([features, embeddings], dim=1)  # (batch, seq_len, embed)
        return self.run_lstm(inputs)[0]

    def forward(self, features, captions):
        """CVND's call: scores (batch, seq_len, vocab) where output t predicts captions[:, t]
        (output 0, the image step's, predicts the given `<start>`)."""
        return self.fc(self.dropout(self.read(features, captions)))

    def score(self, features, captions, scored=None):
        """The protocol's teacher-forced scores (`DecoderOutput`); `scored` as in the protocol:
        the vocabulary layer is most of the work, and padding needs none of it."""
        hiddens = self.read(features, captions)[:, 1:]  # (batch, seq_len - 1, hidden)
        if scored is not None:
            hiddens = select_outputs(hiddens, scored)  # (scored, hidden)
        return DecoderOutput(self.fc(self.dropout(hiddens)))

    def init_state(self, features, states=None):
        """(h, c) after the image step, batch first: (batch, layers, hidden) each."""
        _, states = self.run_lstm(features.unsqueeze(1), states)  # (batch, 1, embed) in
        return tuple(s.transpose(0, 1) for s in states)  # (layers, batch, hidden) -> batch first

    def step(self, words, state):
        """One word: ids (batch,) -> scores (batch, vocab), the new state, None (no attention)."""
        state = tuple(s.transpose(0, 1).contiguous() for s in state)  # (layers, batch, hidden)
        inputs = self.dropout(self.embed(words)).unsqueeze(1)  # (batch, 1, embed)
        hiddens, state = self.run_lstm(inputs, state)
        scores = self.fc(self.dropout(hiddens.squeeze(1)))  # (batch, vocab)
        return scores, tuple(s.transpose(0, 1) for s in state), None

    def regulariser(self, output):
        """Nothing is added to Show and Tell's loss."""
        return 0.0

    @torch.no_grad()
    def sample(self, inputs, states=None, max_len=20):
        """CVND's call: greedy ids for one image feature shaped (1, 1, embed_size), a list of
        ints, `<start>` first and `<end>` last if reached."""
        state = self.init_state(inputs.flatten(1), states)  # (1, embed) in
        ids = [self.start_id]
        while len(ids) < max_len and ids[-1] != self.end_id:
            scores, state, _ = self.step(torch.tensor(ids[-1:], device=inputs.device), state)
            ids.append(int(scores.argmax(dim=1)))
        return ids


class AttentionDecoder(nn.Module):
    """LSTM decoder with soft attention over the image grid at every word (Show, Attend and Tell).

    As in the paper: the previous hidden state scores every grid position (additive attention),
    the softmax of those scores weights the grid into a context vector, a gating scalar (sigmoid
    of the hidden state) scales it, and the LSTM reads the previous word's embedding with that
    context; the word scores come from the new hidden state, the context and the previous word
    (deep output, eq. 7). The state starts from the mean grid feature. Two additions, off by
    default: `word_in_query` (the word just read joins the hidden state in the attention
    query) and `coverage` (the attention a position has had so far enters its score, Tu et al.,
    2016). The state is (h, c, coverage, grid, projected grid).

    With `region_mask`, the grid's last channel is a mask, 1 for a region, 0 for padding
    (region features, of varying number per image, padded to a batch): padding gets no
    attention and no part in the mean, and the state ends with the mask (batch, positions).
    """

    def __init__(self, feature_size, embed_size, hidden_size, vocab_size, attention_size=None,
                 dropout=0.0, end_id=1, start_id=0, forget_bias=1.0, attention_weight=1.0,
                 word_in_query=False, coverage=False, region_mask=False):  # fmt: skip
        super().__init__()
        self.attention_weight, self.word_in_query = attention_weight, word_in_query
        self.region_mask = region_mask
        attention_size = attention_size or hidden_size
        self.start_id, self.end_id, self.vocab_size = start_id, end_id, vocab_size
        self.embed = nn.Embedding(vocab_size, embed_size)
        # One bias before the tanh (two would be one parameter twice), none after it: softmax
        # ignores a shift, so that bias would get only rounding noise as its gradient.
        self.grid_attention = nn.Linear(feature_size, attention_size)
        query_size = hidden_size + (embed_size if word_in_query else 0)
        self.hidden_attention = nn.Linear(query_size, attention_size, bias=False)
        self.coverage_attention = nn.Linear(1, attention_size, bias=False) if coverage else None
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

    def init_state(self, grid):
        """(h, c, coverage, grid, projected grid) from a grid (batch, positions, feature_size);
        with `region_mask`, the grid's mask channel split off and appended to the state."""
        mask = None
        if self.region_mask:
            grid, mask = grid[..., :-1], grid[..., -1] > 0  # (batch, positions, features), mask
            counted = mask.unsqueeze(2).to(grid.dtype)  # (batch, positions, 1)
            mean = (grid * counted).sum(dim=1) / counted.sum(dim=1).clamp(min=1)
        else:
            mean = grid.mean(dim=1)  # (batch, feature_size)
        coverage = grid.new_zeros(grid.shape[:2])  # (batch, positions)
        h, c = torch.tanh(self.init_h(mean)), torch.tanh(self.init_c(mean))
        state = (h, c, coverage, grid, self.grid_attention(grid))  # projected: (b, p, attention)
        return state if mask is None else (*state, mask)

    def attend(self, state, word):
        """Gated context (batch, feature_size) and attention weights (batch, positions) for the
        embedded word (batch, embed_size) about to be read."""
        hidden, _, coverage, grid, projected = state[:5]
        query = self.hidden_attention(
            torch.cat([hidden, word], 1) if self.word_in_query else hidden
        )
        energy = projected + query.unsqueeze(1)  # (batch, positions, attention)
        if self.coverage_attention is not None:
            energy = energy + self.coverage_attention(coverage.unsqueeze(2))
        scores = self.attention_score(torch.tanh(energy)).squeeze(2)  # (batch, positions)
        if len(state) > 5:  # region_mask: padding gets no weight
            scores = scores.masked_fill(~state[5], float("-inf"))
        weights = scores.softmax(dim=1)
        context = torch.bmm(weights.unsqueeze(1), grid).squeeze(1)  # (batch, feature_size)
        return torch.sigmoid(self.gate(hidden)) * context, weights

    def advance(self, words, state):
        """Attend, then one LSTM step on the words (batch,) and the context: the new state, the
        output's word-and-context term (batch, embed_size) and the weights (batch, positions)."""
        word = self.dropout(self.embed(words))  # (batch, embed)
        context, weights = self.attend(state, word)
        hidden, cell = self.lstm(torch.cat([word, context], dim=1), state[:2])
        state = (hidden, cell, state[2] + weights, *state[3:])
        return state, word + self.context_out(context), weights

    def output(self, hidden, reading):
        """Word scores (..., vocab) from hidden states and `advance`'s terms (..., embed_size)."""
        return self.fc(self.dropout(self.hidden_out(hidden) + reading))

    def step(self, words, state):
        """One word: ids (batch,) -> scores (batch, vocab), new state, weights (batch, positions)."""
        state, reading, weights = self.advance(words, state)
        return self.output(state[0], reading), state, weights

    def score(self, grid, captions, scored=None):
        """The protocol's teacher-forced scores with the attention weights (`DecoderOutput`);
        with `scored`, the weights of unpredicted steps are zero."""
        state = self.init_state(grid)
        hiddens, readings, weights = [], [], []
        for t in range(captions.size(1) - 1):
            state, reading, alpha = self.advance(captions[:, t], state)
            hiddens.append(state[0])
            readings.append(reading)
            weights.append(alpha)
        hiddens = torch.stack(hiddens, dim=1)  # (batch, seq_len - 1, hidden)
        readings = torch.stack(readings, dim=1)  # (batch, seq_len - 1, embed)
        weights = torch.stack(weights, dim=1)  # (batch, seq_len - 1, positions)
        if scored is None:
            return DecoderOutput(self.output(hiddens, readings), weights)
        predicted = positions_mask(scored, *weights.shape[:2])  # (batch, seq_len - 1)
        weights = weights * predicted.unsqueeze(2)
        hiddens, readings = select_outputs(hiddens, scored), select_outputs(readings, scored)
        return DecoderOutput(self.output(hiddens, readings), weights)

    forward = score

    def regulariser(self, output):
        """attention_weight x the doubly stochastic penalty of the output's weights (eq. 14)."""
        return self.attention_weight * attention_penalty(output.weights, self.region_mask)


def attention_penalty(weights, padded_positions=False):
    """Doubly stochastic regulariser: mean of (1 - attention a position got over the words)^2.

    Pushes every position to be attended about once over a caption (Xu et al., eq. 14); padded
    steps carry zero weights, so only the words predicted count. With `padded_positions`
    (region features), the positions that got no attention at all, the padding, are left out.
    """
    penalty = (1.0 - weights.sum(dim=1)) ** 2  # (batch, positions)
    if not padded_positions:
        return penalty.mean()
    real = (weights.sum(dim=1) > 0).to(penalty.dtype)  # softmax gives a region some weight
    return (penalty * real).sum() / real.sum().clamp(min=1)


class CaptionModel(nn.Module):
    """An encoder and a decoder as one module (one object to train, wrap in DDP, and save).

    Its inputs are images (batch, 3, H, W), or with `cached=True` what the feature cache holds
    (`EncoderCNN.backbone_features`). A blind model (the ablation that shows what the words
    alone give) sees zero features whatever it is given and runs no CNN: a black image is no
    zero feature once a CNN's batch-norm statistics have shifted it.
    """

    def __init__(self, encoder, decoder, blind=False):
        super().__init__()
        self.encoder, self.decoder = encoder, decoder
        self.blind = blind

    def encode(self, inputs, cached=False):
        """What the decoder reads: (batch, embed_size), or a grid (batch, positions, features)."""
        if self.blind:  # a grid of one zero position: attention over it gives a zero context
            size = self.encoder.feature_size
            shape = (1, size) if self.encoder.grid else (size,)
            inputs, cached = inputs.new_zeros(inputs.shape[0], *shape), True
        return self.encoder.project(inputs) if cached else self.encoder(inputs)

    def forward(self, inputs, captions, owners=None, scored=None, cached=False):
        """The decoder's `DecoderOutput` for captions (captions, seq_len); caption k describes
        input `owners[k]` (default k); `scored` as in the decoder protocol."""
        features = self.encode(inputs, cached)  # (images, embed) or (images, positions, features)
        if owners is not None:
            features = features[owners]  # (captions, ...)
        return self.decoder.score(features, captions, scored)
