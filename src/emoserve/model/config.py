"""Architecture numbers of the emotion2vec+ variants, parsed from the published `config.yaml`.

Torch-free: the entry reader and the ONNX Runtime backend use it without importing torch.
"""

from __future__ import annotations

import ast
import math
from dataclasses import dataclass, replace
from typing import Any

from emoserve.errors import ConfigError

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
