"""A transformer captioner: an encoder over the CNN grid and a causal decoder over the words with
cross-attention to it, speaking the decoder protocol of `model` (score, init_state, step).

Built on torch.nn's layers, pre-norm (`norm_first=True`, a final LayerNorm after each stack), as
ruotianluo/self-critical.pytorch's TransformerModel (the Annotated Transformer's sublayer
connection x + dropout(sublayer(norm(x)))): pre-norm trains without a long warm-up. The grid
is projected to the model width (linear, ReLU, dropout: ruotianluo's `att_embed`) and given a
fixed 2-D sinusoidal position code (ruotianluo's regions have none; a grid's cells have a place);
words get the 1-D sinusoidal code of Vaswani et al. after an embedding scaled by sqrt(width).

`nn.TransformerDecoderLayer` keeps no cache of the keys and values of earlier words, and returns
no cross-attention weights, so its forward is not used: `_run_layer` runs its modules (self_attn,
multihead_attn, linear1/2, norm1/2/3, dropouts) on any number of new words after cached ones.
Teacher forcing (`score`) runs it on every word at once under a causal mask, decoding (`step`) on
one word after the cache; the same function and weights, so the two agree (tests show it).
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import DecoderOutput, positions_mask, select_outputs


def sinusoids(positions, channels):
    """The sinusoidal code (n, channels) of `positions` (n,) (Vaswani et al.): sines on the
    even channels, cosines on the odd ones, wavelengths from 2 pi to 10000 x 2 pi."""
    rates = torch.exp(
        torch.arange(0, channels, 2, device=positions.device, dtype=torch.float32)
        * (-math.log(10000.0) / channels)
    )  # (ceil(channels / 2),)
    angles = positions.float().unsqueeze(1) * rates  # (n, ceil(channels / 2))
    code = torch.zeros(len(positions), channels, device=positions.device)
    code[:, 0::2] = torch.sin(angles)
    code[:, 1::2] = torch.cos(angles[:, : channels // 2])
    return code


def grid_positions(positions, channels, device=None):
    """The position code (positions, channels) of a grid flattened row by row: for a square grid
    the 2-D code (half the channels the row's sinusoids, half the column's); otherwise the 1-D
    code of the flattened index."""
    index = torch.arange(positions, device=device)
    side = math.isqrt(positions)
    if side * side != positions:
        return sinusoids(index, channels)
    rows, cols = index // side, index % side
    return torch.cat([sinusoids(rows, channels - channels // 2), sinusoids(cols, channels // 2)], 1)


class TransformerDecoder(nn.Module):
    """Transformer encoder over the grid (batch, positions, feature_size), causal transformer
    decoder over the words; the decoder protocol of `model`.

    `width` (d_model), `heads`, `feed_forward`, `dropout` as in `nn.TransformerDecoderLayer`;
    `attention_layer`: the decoder layer whose cross-attention weights `score` and `step` return
    (-1: the last); `attention_head`: of its heads, the one returned (None: their average). The
    state is (cross, cache), batch first:
    cross (batch, layers, 2, positions, width), each decoder layer's cross-attention keys and
    values of the encoded grid, computed once by `init_state`; cache (batch, layers, 2, words,
    width), each layer's self-attention keys and values of the words read so far, one longer
    after each step (so a step costs O(words), not a pass over the prefix). Nothing is added to
    the training loss (`regulariser`: 0.0).

    With `region_mask`, the grid's last channel is a mask, 1 for a region, 0 for padding
    (region features, of varying number per image, padded to a batch): the encoder and the
    cross-attention give padding no weight, the regions get no position code (they have no
    place in a grid), and the state ends with the mask (batch, positions).
    """

    def __init__(self, feature_size, vocab_size, width=512, heads=8, encoder_layers=6,
                 decoder_layers=6, feed_forward=2048, dropout=0.1, end_id=1, start_id=0,
                 attention_layer=-1, attention_head=None, region_mask=False):  # fmt: skip
        super().__init__()
        self.region_mask = region_mask
        if width % heads:
            raise ValueError(f"width {width} is not a multiple of heads {heads}")
        self.start_id, self.end_id, self.vocab_size = start_id, end_id, vocab_size
        self.width, self.heads = width, heads
        self.grid_embed = nn.Sequential(
            nn.Linear(feature_size, width), nn.ReLU(), nn.Dropout(dropout)
        )
        layer = nn.TransformerEncoderLayer(
            width, heads, feed_forward, dropout, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(
            layer, encoder_layers, norm=nn.LayerNorm(width), enable_nested_tensor=False
        )
        self.layers = nn.ModuleList(
            nn.TransformerDecoderLayer(
                width, heads, feed_forward, dropout, batch_first=True, norm_first=True
            )
            for _ in range(decoder_layers)
        )
        self.norm = nn.LayerNorm(width)
        self.embed = nn.Embedding(vocab_size, width)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(width, vocab_size)
        self.attention_layer, self.attention_head = attention_layer, attention_head
        # Glorot initialisation of every matrix, as nn.Transformer and ruotianluo's model.
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    @property
    def attention_layer(self):
        """The decoder layer (0 to layers - 1) whose cross-attention `score` and `step` return."""
        return self._attention_layer

    @attention_layer.setter
    def attention_layer(self, layer):
        layers = len(self.layers)
        if not -layers <= layer < layers:
            raise ValueError(f"attention_layer {layer}: the decoder has {layers} layers")
        self._attention_layer = layer % layers

    @property
    def attention_head(self):
        """The head (0 to heads - 1) whose cross-attention `score` and `step` return; None: the
        average over the heads."""
        return self._attention_head

    @attention_head.setter
    def attention_head(self, head):
        if head is not None and not 0 <= head < self.heads:
            raise ValueError(f"attention_head {head}: the decoder has {self.heads} heads")
        self._attention_head = head

    def encode(self, grid, mask=None):
        """The encoded grid (batch, positions, width): projected, position-coded, encoded; with
        a region `mask` (batch, positions), no position code, and padding left unread."""
        if mask is not None:
            return self.encoder(self.grid_embed(grid), src_key_padding_mask=~mask)
        code = grid_positions(grid.size(1), self.width, grid.device)  # (positions, width)
        return self.encoder(self.grid_embed(grid) + code)

    def init_state(self, grid):
        """(cross, cache) for a grid (batch, positions, feature_size), and with `region_mask`
        the mask split off its last channel; no word read yet."""
        mask = None
        if self.region_mask:
            grid, mask = grid[..., :-1], grid[..., -1] > 0  # regions, and which are real
        memory = self.encode(grid, mask)  # (batch, positions, width)
        cross = torch.stack(
            [self._keys_values(layer.multihead_attn, memory) for layer in self.layers], dim=1
        )  # (batch, layers, 2, positions, width)
        cache = cross.new_zeros(*cross.shape[:3], 0, self.width)  # (batch, layers, 2, 0, width)
        return (cross, cache) if mask is None else (cross, cache, mask)

    def _keys_values(self, attention, inputs):
        """The keys and values that `attention` (nn.MultiheadAttention) makes of `inputs`
        (batch, n, width), stacked: (batch, 2, n, width)."""
        w, b = attention.in_proj_weight[self.width :], attention.in_proj_bias[self.width :]
        return F.linear(inputs, w, b).unflatten(-1, (2, self.width)).transpose(1, 2)

    def _attend(self, attention, queries, keys_values, mask=None, need_weights=False):
        """`attention`'s output (batch, n, width) for `queries` (batch, n, width) over keys and
        values (batch, 2, m, width), and with `need_weights` its weights (batch, n, m) before
        attention dropout: `attention_head`'s, or averaged over the heads."""
        w, b = attention.in_proj_weight[: self.width], attention.in_proj_bias[: self.width]
        # Split into heads: (batch, heads, n, width / heads) and (batch, heads, m, width / heads).
        q = F.linear(queries, w, b).unflatten(-1, (self.heads, -1)).transpose(1, 2)
        k, v = (kv.unflatten(-1, (self.heads, -1)).transpose(1, 2) for kv in keys_values.unbind(1))
        p = attention.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (batch, heads, n, m)
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            probs = scores.softmax(dim=-1)
            out = F.dropout(probs, p, self.training) @ v
            head = self.attention_head
            weights = probs.mean(dim=1) if head is None else probs[:, head]  # (batch, n, m)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        out = out.transpose(1, 2).flatten(2)  # (batch, n, width)
        return attention.out_proj(out), weights

    def _run_layer(self, layer, x, past, cross, need_weights=False, cross_mask=None):
        """One pre-norm nn.TransformerDecoderLayer on new words x (batch, n, width) after the
        cached keys and values `past` (batch, 2, t, width): x after the layer, the keys and
        values of all t + n words, and the cross-attention weights (batch, n, positions) if
        asked. Word t + i sees words 0 to t + i (causal); `cross_mask` (batch, 1, 1,
        positions), True where a word may look, keeps cross-attention off padding."""
        h = layer.norm1(x)
        new = self._keys_values(layer.self_attn, h)  # (batch, 2, n, width)
        keys_values = torch.cat([past, new], dim=2) if past.size(2) else new
        n, total = x.size(1), keys_values.size(2)
        mask = None
        if n > 1:  # (n, total): True where a word may look
            seen = torch.arange(total, device=x.device)
            mask = seen <= torch.arange(total - n, total, device=x.device).unsqueeze(1)
        x = x + layer.dropout1(self._attend(layer.self_attn, h, keys_values, mask)[0])
        out, weights = self._attend(
            layer.multihead_attn, layer.norm2(x), cross, cross_mask, need_weights
        )
        x = x + layer.dropout2(out)
        h = layer.linear2(layer.dropout(layer.activation(layer.linear1(layer.norm3(x)))))
        return x + layer.dropout3(h), keys_values, weights

    def decode(self, words, state, keep_cache=True):
        """Read words (batch, n) after the state's: the decoder's outputs (batch, n, width), the
        state after them (the cache not grown without `keep_cache`) and the chosen layer's
        cross-attention weights (batch, n, positions)."""
        cross, cache = state[:2]
        mask = state[2][:, None, None, :] if len(state) > 2 else None  # (batch, 1, 1, positions)
        t = cache.size(3)
        code = sinusoids(torch.arange(t, t + words.size(1), device=words.device), self.width)
        x = self.dropout(self.embed(words) * math.sqrt(self.width) + code)  # (batch, n, width)
        caches, weights = [], None
        for i, layer in enumerate(self.layers):
            chosen = i == self.attention_layer
            x, keys_values, alpha = self._run_layer(
                layer, x, cache[:, i], cross[:, i], chosen, mask
            )
            caches.append(keys_values)
            weights = alpha if chosen else weights
        if keep_cache:
            # The cache: (batch, layers, 2, t + n, width); the mask, if any, as it was.
            state = (cross, torch.stack(caches, dim=1), *state[2:])
        return self.norm(x), state, weights

    def step(self, words, state):
        """One word: ids (batch,) -> scores (batch, vocab), the new state, the cross-attention
        weights (batch, positions) of `attention_layer` (and `attention_head`)."""
        hidden, state, weights = self.decode(words.unsqueeze(1), state)
        return self.fc(hidden.squeeze(1)), state, weights.squeeze(1)

    def score(self, grid, captions, scored=None):
        """The protocol's teacher-forced scores with the cross-attention weights
        (`DecoderOutput`): every word at once under the causal mask; with `scored`, the
        weights of unpredicted steps are zero.

        Padding follows a caption's words, and the causal mask keeps every word from seeing a
        later one, so pads change no real word's output: no key padding mask is needed.
        """
        hidden, _, weights = self.decode(captions[:, :-1], self.init_state(grid), False)
        if scored is None:
            return DecoderOutput(self.fc(hidden), weights)
        predicted = positions_mask(scored, *hidden.shape[:2])  # (batch, seq_len - 1)
        scores = self.fc(select_outputs(hidden, scored))  # (scored, vocab)
        return DecoderOutput(scores, weights * predicted.unsqueeze(2))

    forward = score

    def regulariser(self, output):
        """Nothing is added to the transformer's loss."""
        return 0.0


class PrefixDecoder:
    """A decoder's protocol without a cache, the reference that cached decoding must equal (and
    the benchmark's baseline): each step re-runs `score` on the grid and the whole prefix."""

    def __init__(self, decoder):
        self.decoder = decoder
        self.start_id, self.end_id = decoder.start_id, decoder.end_id
        self.vocab_size = decoder.vocab_size

    def init_state(self, grid):
        """(grid, no words yet), batch first."""
        return grid, torch.zeros(grid.size(0), 0, dtype=torch.long, device=grid.device)

    def step(self, words, state):
        """The scores of the word after `words`, from a pass over the prefix and the grid."""
        grid, prefix = state
        prefix = torch.cat([prefix, words.unsqueeze(1)], dim=1)  # (batch, t + 1)
        # score's output t predicts captions[:, t + 1]: a last column to predict, any word.
        output = self.decoder.score(grid, torch.cat([prefix, prefix[:, :1]], dim=1))
        return output.scores[:, -1], (grid, prefix), output.weights[:, -1]
