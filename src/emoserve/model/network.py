"""The emotion2vec+ network (data2vec 2.0 audio encoder + a linear emotion head), inference only.

Written from `emotion2vec-spec.md`; the step numbers in comments refer to its section 4.
Unlike upstream, the forward takes a *padded batch* with per-item lengths and keeps every item
independent of its neighbours (spec section 5): per-item waveform statistics, padded frames
zeroed before every positional convolution, padded keys masked in attention, means over real
frames only.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from emoserve.model.config import ModelConfig

# ---------------------------------------------------------------------------------------------
# Building blocks


class ConvLayer(nn.Module):
    """Conv1d (no bias) -> LayerNorm over channels (in float32, as upstream) -> GELU (spec step 3)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, eps: float) -> None:
        super().__init__()
        self.conv = nn.Conv1d(in_channels, out_channels, kernel, stride=stride, bias=False)
        self.norm = nn.LayerNorm(out_channels, eps=eps)

    def forward(self, x: Tensor) -> Tensor:  # (batch, channels, time) -> (batch, channels, time')
        x = self.conv(x)
        if lean_path(x):
            # torch's CUDA layer_norm accumulates half inputs in float32 and rounds its output once, as
            # upstream's Fp32LayerNorm does, without float32 copies of the model's largest activation (the
            # first layer's (batch, 512, samples / 5)). The weights are the model's dtype either way.
            x = F.layer_norm(
                x.transpose(1, 2), self.norm.normalized_shape, self.norm.weight, self.norm.bias, self.norm.eps
            )
            return F.gelu(x.transpose(1, 2))
        # on the CPU exactly the ONNX graph's operations (the parity tests hold the two at 1e-5)
        x = F.layer_norm(
            x.transpose(1, 2).float(),
            self.norm.normalized_shape,
            self.norm.weight.float(),
            self.norm.bias.float(),
            self.norm.eps,
        ).to(x.dtype)
        return F.gelu(x.transpose(1, 2))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """x: (batch, tokens, dim); mask: additive, broadcastable to (batch, heads, tokens, tokens)."""
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).view(batch, tokens, 3, self.heads, dim // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (batch, heads, tokens, dim / heads)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(x.transpose(1, 2).reshape(batch, tokens, dim))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """data2vec 2.0 `AltBlock` with `layer_norm_first=False`: post-norm (spec step 8)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, eps: float) -> None:
        super().__init__()
        self.attn = Attention(dim, heads)
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.norm2 = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        r = self.norm1(x + self.attn(x, mask))
        return self.norm2(r + self.mlp(r))


def alibi_slopes(heads: int) -> list[float]:
    """Per-head ALiBi slopes (Press et al. 2021), including the non-power-of-two rule."""
    if math.log2(heads).is_integer():
        ratio = 2.0 ** (-8.0 / heads)
        return [ratio ** (h + 1) for h in range(heads)]
    lower = 2 ** math.floor(math.log2(heads))
    return alibi_slopes(lower) + alibi_slopes(2 * lower)[0::2][: heads - lower]


# SDPA's memory-efficient CUDA kernel (the one that takes an additive mask) wants every stride of the mask but
# the last to be a multiple of 8 elements; otherwise it pads a copy of the mask in each call, that is in each
# of the blocks (`preprocess_mask`, aten/src/ATen/native/transformers/cuda/attention.cu). So the CUDA mask
# is a slice of a buffer whose rows are rounded up to MASK_ALIGNMENT.
MASK_ALIGNMENT = 8
# The ALiBi bias of a width, (heads, tokens, tokens) in the activation dtype, is kept for the widths seen
# last, up to this many bytes: 30 s of audio is 73 MB for the large model in float16, 120 s 1.2 GB (not kept).
BIAS_CACHE_BYTES = 256 * 2**20


def lean_path(x: Tensor) -> bool:
    """Whether the forward takes its CUDA formulation (mask and LayerNorm in the activation dtype, the
    bias cached); the CPU keeps the ONNX graph's operations, whose numbers the parity tests pin."""
    return x.is_cuda


def aligned_width(tokens: int) -> int:
    return -(-tokens // MASK_ALIGNMENT) * MASK_ALIGNMENT


# ---------------------------------------------------------------------------------------------
# The model


@dataclass(frozen=True)
class Features:
    frames: Tensor  # (batch, frames, dim), zero past each item's length
    lengths: Tensor  # (batch,) real frames per item


class Emotion2vec(nn.Module):
    """Audio -> frame features -> emotion logits.

    Parameter names are ours; `checkpoint.py` maps the published checkpoint keys onto them.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        c, d, eps = config, config.embed_dim, config.norm_eps
        channels = [1] + [ch for ch, _, _ in c.conv_layers]
        self.feature_encoder = nn.ModuleList(
            ConvLayer(channels[i], ch, k, s, eps) for i, (ch, k, s) in enumerate(c.conv_layers)
        )
        self.project_norm = nn.LayerNorm(c.conv_channels, eps=eps)
        self.project = nn.Linear(c.conv_channels, d)
        k = c.conv_pos_kernel
        self.pos_conv = nn.ModuleList(
            nn.Conv1d(d, d, k, padding=k // 2, groups=c.conv_pos_groups) for _ in range(c.conv_pos_depth)
        )
        self.extra_tokens = nn.Parameter(torch.zeros(1, c.num_extra_tokens, d))
        self.alibi_scale = nn.Parameter(torch.ones(1, 1, c.num_alibi_heads, 1, 1))
        self.prenet_norm = nn.LayerNorm(d, eps=eps)
        self.prenet = nn.ModuleList(Block(d, c.num_heads, c.mlp_ratio, eps) for _ in range(c.prenet_depth))
        self.blocks = nn.ModuleList(Block(d, c.num_heads, c.mlp_ratio, eps) for _ in range(c.depth))
        self.proj = nn.Linear(d, c.num_labels)
        # The CUDA path's ALiBi state (the CPU path builds its mask as the ONNX graph does). The slopes are
        # float32 on the model's device, not a buffer: `.to(dtype=float16)` would round them, and the
        # model is built on the meta device (convert.py); `_apply` puts them where the weights go.
        self._slopes = torch.tensor(alibi_slopes(c.num_alibi_heads))
        self._bias_cache: OrderedDict[tuple[object, ...], Tensor] = OrderedDict()

    def _apply(self, fn, recurse=True):  # nn.Module's own (untyped) signature
        super()._apply(fn, recurse)
        self._slopes = torch.tensor(alibi_slopes(self.config.num_alibi_heads), device=self.alibi_scale.device)
        self._bias_cache.clear()
        return self

    # -- the pipeline, spec section 4 -------------------------------------------------------------

    def forward(self, waves: Tensor, lengths: Tensor) -> Features:
        """waves: (batch, samples) float32 16 kHz mono, zero-padded; lengths: (batch,) real samples."""
        if waves.dim() != 2 or lengths.shape != waves.shape[:1]:
            raise ValueError(
                f"expected waves (batch, samples) and lengths (batch,), got "
                f"{tuple(waves.shape)} and {tuple(lengths.shape)}"
            )
        if self.config.normalize:
            waves = normalize_waveform(waves, lengths, self.config.norm_eps)
        x = self.encode_frames(waves.to(self.project.weight.dtype))  # (batch, channels, frames)
        frame_lengths = self.frame_lengths(lengths)
        padded = torch.arange(x.shape[-1], device=x.device)[None, :] >= frame_lengths[:, None]
        x = self.project(self.project_norm(x.transpose(1, 2)))  # (batch, frames, dim)
        x = x + self.positional(x, padded)
        x = self.transformer(x, padded)
        return Features(x.masked_fill(padded[..., None], 0.0), frame_lengths)

    def frame_lengths(self, lengths: Tensor) -> Tensor:
        """Real frames per item: `ModelConfig.num_frames` as tensor operations (exportable)."""
        n = lengths.long()
        for _, kernel, stride in self.config.conv_layers:
            n = (torch.div(n - kernel, stride, rounding_mode="floor") + 1).clamp_min(0)
        return n

    def encode_frames(self, waves: Tensor) -> Tensor:
        """Step 3. No padding in any conv: a real frame never reads samples past its item's end."""
        x = waves[:, None, :]  # (batch, 1, samples)
        for layer in self.feature_encoder:
            x = layer(x)
        return x

    def positional(self, x: Tensor, padded: Tensor) -> Tensor:
        """Step 5, the term added to the projected features. Padded frames are zeroed before every
        layer so that each item sees the zero padding it would see alone (spec section 5)."""
        k = self.config.conv_pos_kernel
        keep = ~padded[..., None]  # (batch, frames, 1)
        for conv in self.pos_conv:
            x = conv((x * keep).transpose(1, 2))  # (batch, dim, frames [+1 when k is even])
            x = x[..., : x.shape[-1] - (1 - k % 2)]  # upstream `SamePad`
            x = F.gelu(F.layer_norm(x.transpose(1, 2), x.shape[1:2], eps=self.config.norm_eps))
        return x

    def transformer(self, x: Tensor, padded: Tensor) -> Tensor:
        """Steps 6-9: extra tokens, prenet, main blocks; returns the frames without the extra tokens."""
        batch, frames, _ = x.shape
        extra = self.config.num_extra_tokens
        x = torch.cat([self.extra_tokens.expand(batch, -1, -1), x], dim=1)  # (batch, extra + frames, dim)
        if lean_path(x):
            mask = self.cuda_attention_mask(frames, padded, x.dtype)
        else:
            mask = self.attention_mask(frames, padded).to(x.dtype)
        x = self.prenet_norm(x)
        for block in self.prenet:
            x = block(x, mask)
        for block in self.blocks:
            x = block(x, mask)
        return x[:, extra:]

    def attention_mask(self, frames: int, padded: Tensor) -> Tensor:
        """ALiBi bias, zero for the extra tokens, plus -inf on padded keys: (batch, heads, tokens, tokens).
        The -inf fill is unconditional (no data-dependent branch, so the graph exports)."""
        extra = self.config.num_extra_tokens
        pos = torch.arange(frames, device=padded.device)
        distance = (pos[None, :] - pos[:, None]).abs().float()  # (frames, frames)
        scale = self.alibi_scale.float().clamp_min(0).view(-1, 1, 1)  # (heads, 1, 1)
        slopes = torch.tensor(alibi_slopes(self.config.num_alibi_heads), device=padded.device)
        bias = -distance[None] * slopes.view(-1, 1, 1) * scale  # (heads, frames, frames)
        bias = F.pad(bias, (extra, 0, extra, 0))[None]
        keys = F.pad(padded, (extra, 0))[:, None, None, :]  # (batch, 1, 1, tokens)
        return bias.masked_fill(keys, float("-inf"))

    def cuda_attention_mask(self, frames: int, padded: Tensor, dtype: torch.dtype) -> Tensor:
        """`attention_mask` for CUDA, built once per forward in the activation dtype: the width's ALiBi bias
        (cached) plus -inf on padded keys, written into rows of `aligned_width(tokens)` elements so that
        SDPA's memory-efficient kernel takes it as it is in every block. (batch, heads, tokens, tokens).
        Runs on any device (the tests compare it with `attention_mask` on the CPU)."""
        extra = self.config.num_extra_tokens
        batch, tokens = padded.shape[0], frames + extra
        bias = self.alibi_bias(tokens, dtype, padded.device)  # (heads, tokens, tokens)
        keys = torch.zeros(batch, 1, 1, tokens, dtype=dtype, device=padded.device)
        keys.masked_fill_(F.pad(padded, (extra, 0))[:, None, None, :], float("-inf"))
        mask = torch.empty(
            batch, bias.shape[0], tokens, aligned_width(tokens), dtype=dtype, device=padded.device
        )
        return torch.add(bias, keys, out=mask[..., :tokens])

    def alibi_bias(self, tokens: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """The ALiBi bias of `tokens` (zero for the extra tokens): -|i - j| * slope * scale per head, computed
        in float32 and rounded once to `dtype`, as `attention_mask` then `.to(dtype)` does. (heads, tokens,
        tokens), a view of rows `aligned_width(tokens)` long. No host-device copy: the slopes live on the
        device (`_apply`), the distances come from `arange` there. Kept per width while inference runs."""
        key = (tokens, dtype, device, id(self.alibi_scale), self.alibi_scale._version)
        if (cached := self._bias_cache.get(key)) is not None:
            self._bias_cache.move_to_end(key)
            return cached
        extra, frames = self.config.num_extra_tokens, tokens - self.config.num_extra_tokens
        slopes = self._slopes if self._slopes.device == device else self._slopes.to(device)
        scale = self.alibi_scale.float().clamp_min(0).view(-1)  # (heads,)
        pos = torch.arange(frames, device=device)
        distance = (pos[None, :] - pos[:, None]).abs().float()  # (frames, frames)
        bias = torch.zeros(slopes.shape[0], tokens, aligned_width(tokens), dtype=dtype, device=device)
        # one float32 product per element, rounded into the half-precision buffer (no float32 copy per head)
        torch.mul(distance[None], (-slopes * scale).view(-1, 1, 1), out=bias[:, extra:, extra:tokens])
        bias = bias[..., :tokens]
        if not torch.is_grad_enabled():
            self._keep_bias(key, bias)
        return bias

    def _keep_bias(self, key: tuple[object, ...], bias: Tensor) -> None:
        size = bias.untyped_storage().nbytes()
        if size > BIAS_CACHE_BYTES:
            return
        self._bias_cache[key] = bias
        while sum(b.untyped_storage().nbytes() for b in self._bias_cache.values()) > BIAS_CACHE_BYTES:
            self._bias_cache.popitem(last=False)

    # -- heads -------------------------------------------------------------------------------------

    def pool(self, features: Features) -> Tensor:
        """Mean over each item's real frames: the utterance embedding (batch, dim), summed in float32 (a
        float16 sum over a minute's 3000 frames overflows at 65504)."""
        total = features.frames.sum(dim=1, dtype=torch.float32)
        return (total / features.lengths[:, None].to(total.dtype)).to(features.frames.dtype)

    def outputs(self, waves: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Everything a result needs, in float32: what the torch backend runs and the ONNX graph holds, in
        `interface.OUTPUTS` order: logits (batch, labels) and pooled (batch, dim) of the utterance embedding,
        frame_logits (batch, frames, labels) and frames (batch, frames, dim), meaningless (frames: zero) past
        an item's frames, and frame_lengths (batch,).

        Logits, not scores: the label mask and softmax (step 10) are applied by the recognizer, the
        same for every backend. Per-frame logits (the head on each frame) are our addition."""
        features = self(waves, lengths)
        pooled = self.pool(features)
        return (
            self.proj(pooled).float(),
            pooled.float(),
            self.proj(features.frames).float(),
            features.frames.float(),
            features.lengths,
        )

    def utterance_outputs(self, waves: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """`outputs` for utterance requests (`interface.UTTERANCE_OUTPUTS`): logits, pooled, frame_lengths,
        without the head on every frame or a float32 copy of the frames."""
        features = self(waves, lengths)
        pooled = self.pool(features)
        return self.proj(pooled).float(), pooled.float(), features.lengths


def normalize_waveform(waves: Tensor, lengths: Tensor, eps: float) -> Tensor:
    """Step 2 per item over its real samples only: (x - mean) / sqrt(biased var + eps).

    The statistics are accumulated in float64 so long clips lose nothing to rounding."""
    valid = torch.arange(waves.shape[1], device=waves.device)[None, :] < lengths[:, None]
    x = waves.double() * valid
    n = lengths[:, None].double()
    mean = x.sum(dim=1, keepdim=True) / n
    var = (((x - mean) * valid) ** 2).sum(dim=1, keepdim=True) / n
    return (((x - mean) / torch.sqrt(var + eps)) * valid).float()
