"""The emotion2vec+ network (data2vec 2.0 audio encoder + a linear emotion head), inference only.

Written from `emotion2vec-spec.md`; the step numbers in comments refer to its section 4.
Unlike upstream, the forward takes a *padded batch* with per-item lengths and keeps every item
independent of its neighbours (spec section 5): per-item waveform statistics, padded frames
zeroed before every positional convolution, padded keys masked in attention, means over real
frames only.
"""

from __future__ import annotations

import ast
import math
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SAMPLE_RATE = 16_000  # Hz


class ConfigError(ValueError):
    """A `config.yaml` that does not describe a model this code can run."""


# ---------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class ModelConfig:
    """Architecture numbers of one emotion2vec+ variant (training-only keys never enter here)."""

    embed_dim: int
    num_heads: int
    depth: int  # main transformer blocks
    prenet_depth: int  # blocks inside the audio encoder ("context_encoder"), before the main ones
    mlp_ratio: float
    # (channels, kernel, stride) per conv layer; the published spec gives a hop of 320 samples
    # (20 ms) and a receptive field of 400 samples (25 ms).
    conv_layers: tuple[tuple[int, int, int], ...]
    conv_pos_width: int
    conv_pos_depth: int
    conv_pos_groups: int
    num_extra_tokens: int
    num_alibi_heads: int
    norm_eps: float = 1e-5
    normalize: bool = True  # waveform normalisation (spec step 2)
    num_labels: int = 9  # from tokens.txt, not config.yaml

    @property
    def conv_channels(self) -> int:
        return self.conv_layers[-1][0]

    @property
    def conv_pos_kernel(self) -> int:
        # data2vec 2.0 splits the positional receptive field evenly over its layers
        return max(3, self.conv_pos_width // self.conv_pos_depth)

    @property
    def frame_hop(self) -> int:
        return math.prod(stride for _, _, stride in self.conv_layers)

    @property
    def receptive_field(self) -> int:
        field = 1
        for _, kernel, stride in reversed(self.conv_layers):
            field = (field - 1) * stride + kernel
        return field

    def num_frames(self, num_samples: int) -> int:
        """Frames the conv encoder makes from `num_samples` (0 when too short for one frame)."""
        n = num_samples
        for _, kernel, stride in self.conv_layers:
            n = (n - kernel) // stride + 1
            if n <= 0:
                return 0
        return n

    @classmethod
    def from_yaml_dict(cls, raw: dict[str, Any], num_labels: int = 9) -> ModelConfig:
        """Build from a parsed published `config.yaml` (`model_conf` and its `modalities.audio`)."""
        if raw.get("model", "Emotion2vec") != "Emotion2vec":
            raise ConfigError(f"config.yaml: model is {raw.get('model')!r}, expected 'Emotion2vec'")
        conf = _section(raw, "model_conf", "config.yaml")
        audio = _section(_section(conf, "modalities", "model_conf"), "audio", "model_conf.modalities")
        _require_supported(conf, audio)
        try:
            return cls(
                embed_dim=int(conf["embed_dim"]),
                num_heads=int(conf["num_heads"]),
                depth=int(conf["depth"]),
                prenet_depth=int(audio["prenet_depth"]),
                mlp_ratio=float(conf["mlp_ratio"]),
                conv_layers=parse_conv_spec(str(audio["feature_encoder_spec"])),
                conv_pos_width=int(audio["conv_pos_width"]),
                conv_pos_depth=int(audio["conv_pos_depth"]),
                conv_pos_groups=int(audio["conv_pos_groups"]),
                num_extra_tokens=int(audio["num_extra_tokens"]),
                num_alibi_heads=int(audio.get("num_alibi_heads", conf["num_heads"])),
                norm_eps=float(conf.get("norm_eps", 1e-5)),
                normalize=bool(conf.get("normalize", True)),
                num_labels=num_labels,
            )
        except KeyError as missing:
            raise ConfigError(f"config.yaml: model_conf is missing the key {missing}") from None

    def to_dict(self) -> dict[str, Any]:
        return {
            "embed_dim": self.embed_dim,
            "num_heads": self.num_heads,
            "depth": self.depth,
            "prenet_depth": self.prenet_depth,
            "mlp_ratio": self.mlp_ratio,
            "conv_layers": [list(layer) for layer in self.conv_layers],
            "conv_pos_width": self.conv_pos_width,
            "conv_pos_depth": self.conv_pos_depth,
            "conv_pos_groups": self.conv_pos_groups,
            "num_extra_tokens": self.num_extra_tokens,
            "num_alibi_heads": self.num_alibi_heads,
            "norm_eps": self.norm_eps,
            "normalize": self.normalize,
            "num_labels": self.num_labels,
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        fields = dict(raw)
        fields["conv_layers"] = tuple(tuple(int(v) for v in layer) for layer in raw["conv_layers"])
        return cls(**fields)


def _section(raw: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = raw.get(key)
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: missing the section {key!r}")
    return value


def _require_supported(conf: dict[str, Any], audio: dict[str, Any]) -> None:
    """Refuse variants whose inference differs from the published models (rather than run them wrongly)."""
    expected = {
        ("model_conf", "layer_norm_first"): (conf.get("layer_norm_first", False), False),
        ("audio", "conv_pos_pre_ln"): (audio.get("conv_pos_pre_ln", False), False),
        ("audio", "use_alibi_encoder"): (audio.get("use_alibi_encoder", True), True),
        ("audio", "learned_alibi_scale_per_layer"): (
            audio.get("learned_alibi_scale_per_layer", False),
            False,
        ),
        ("audio", "extractor_mode"): (audio.get("extractor_mode", "layer_norm"), "layer_norm"),
    }
    for (where, key), (got, want) in expected.items():
        if got != want:
            raise ConfigError(
                f"config.yaml: {where}.{key} is {got!r}; only {want!r} (as published) is supported"
            )


def parse_conv_spec(spec: str) -> tuple[tuple[int, int, int], ...]:
    """Evaluate a `feature_encoder_spec` such as "[(512, 10, 5)] + [(512, 3, 2)] * 4" safely.

    Upstream `eval`s this string; we accept only list/tuple literals of ints joined by + and *.
    """

    def value(node: ast.AST) -> Any:
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.List | ast.Tuple):
            items = [value(e) for e in node.elts]
            return items if isinstance(node, ast.List) else tuple(items)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add | ast.Mult):
            left, right = value(node.left), value(node.right)
            return left + right if isinstance(node.op, ast.Add) else left * right
        raise ConfigError(f"feature_encoder_spec: unsupported expression {ast.unparse(node)!r} in {spec!r}")

    try:
        layers = value(ast.parse(spec.strip(), mode="eval").body)
    except SyntaxError as err:
        raise ConfigError(f"feature_encoder_spec: cannot parse {spec!r}: {err.msg}") from None
    if not isinstance(layers, list) or not all(
        isinstance(layer, tuple) and len(layer) == 3 and all(isinstance(v, int) and v > 0 for v in layer)
        for layer in layers
    ):
        raise ConfigError(
            f"feature_encoder_spec: expected a list of (channels, kernel, stride), got {spec!r}"
        )
    return tuple(layers)


_PUBLISHED_CONV = ((512, 10, 5),) + ((512, 3, 2),) * 4 + ((512, 2, 2),) * 2
_BASE = ModelConfig(
    embed_dim=768,
    num_heads=12,
    depth=8,
    prenet_depth=4,
    mlp_ratio=4.0,
    conv_layers=_PUBLISHED_CONV,
    conv_pos_width=95,
    conv_pos_depth=5,
    conv_pos_groups=16,
    num_extra_tokens=10,
    num_alibi_heads=12,
)
PRESETS: dict[str, ModelConfig] = {
    "seed": _BASE,
    "base": _BASE,
    "large": replace(_BASE, embed_dim=1024, num_heads=16, num_alibi_heads=16),
    # the shape of fixtures/emotion2vec-tiny: for tests, not a published model
    "tiny": replace(
        _BASE,
        embed_dim=64,
        num_heads=4,
        num_alibi_heads=4,
        depth=2,
        prenet_depth=1,
        conv_layers=tuple((128, k, s) for _, k, s in _PUBLISHED_CONV),
    ),
}


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


# ---------------------------------------------------------------------------------------------
# The model


@dataclass(frozen=True)
class Features:
    frames: Tensor  # (batch, frames, dim), zero past each item's length
    lengths: Tensor  # (batch,) real frames per item


class Emotion2vec(nn.Module):
    """Audio -> frame features -> emotion logits.

    Parameter names are ours; `weights.py` maps the published checkpoint keys onto them.
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
        frame_lengths = torch.tensor([self.config.num_frames(int(n)) for n in lengths], device=x.device)
        padded = torch.arange(x.shape[-1], device=x.device)[None, :] >= frame_lengths[:, None]
        x = self.project(self.project_norm(x.transpose(1, 2)))  # (batch, frames, dim)
        x = x + self.positional(x, padded)
        x = self.transformer(x, padded)
        return Features(x.masked_fill(padded[..., None], 0.0), frame_lengths)

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
        mask = self.attention_mask(frames, padded).to(x.dtype)
        x = self.prenet_norm(x)
        for block in self.prenet:
            x = block(x, mask)
        for block in self.blocks:
            x = block(x, mask)
        return x[:, extra:]

    def attention_mask(self, frames: Tensor | int, padded: Tensor) -> Tensor:
        """ALiBi bias (1, heads, tokens, tokens), zero for the extra tokens, plus -inf on padded keys
        (then (batch, heads, tokens, tokens)) only when some item is padded."""
        extra = self.config.num_extra_tokens
        pos = torch.arange(int(frames), device=padded.device)
        distance = (pos[None, :] - pos[:, None]).abs().float()  # (frames, frames)
        scale = self.alibi_scale.float().clamp_min(0).view(-1, 1, 1)  # (heads, 1, 1)
        slopes = torch.tensor(alibi_slopes(self.config.num_alibi_heads), device=padded.device)
        bias = -distance[None] * slopes.view(-1, 1, 1) * scale  # (heads, frames, frames)
        bias = F.pad(bias, (extra, 0, extra, 0))[None]
        if padded.any():
            keys = F.pad(padded, (extra, 0))[:, None, None, :]  # (batch, 1, 1, tokens)
            bias = bias.masked_fill(keys, float("-inf"))
        return bias

    # -- heads -------------------------------------------------------------------------------------

    def pool(self, features: Features) -> Tensor:
        """Mean over each item's real frames: the utterance embedding (batch, dim)."""
        total = features.frames.sum(dim=1)
        return total / features.lengths[:, None].to(total.dtype)

    def scores(self, embedding: Tensor, label_mask: Tensor | None = None) -> Tensor:
        """Step 10: `proj`, `unuse` labels to -inf, softmax. Works per utterance (batch, dim) or per
        frame (batch, frames, dim) - the per-frame use is our addition, not upstream's."""
        logits = self.proj(embedding).float()
        if label_mask is not None:
            logits = logits.masked_fill(~label_mask, float("-inf"))
        return logits.softmax(dim=-1)


def normalize_waveform(waves: Tensor, lengths: Tensor, eps: float) -> Tensor:
    """Step 2 per item over its real samples only: (x - mean) / sqrt(biased var + eps).

    The statistics are accumulated in float64 so long clips lose nothing to rounding."""
    valid = torch.arange(waves.shape[1], device=waves.device)[None, :] < lengths[:, None]
    x = waves.double() * valid
    n = lengths[:, None].double()
    mean = x.sum(dim=1, keepdim=True) / n
    var = (((x - mean) * valid) ** 2).sum(dim=1, keepdim=True) / n
    return (((x - mean) / torch.sqrt(var + eps)) * valid).float()
