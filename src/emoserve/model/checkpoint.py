"""Read published emotion2vec+ checkpoints: the rename table to our parameter names, the check that
accounts for every tensor, and `torch.load` limited to weights. `convert.py` turns what this reads into a
cache entry.
"""

from __future__ import annotations

import logging
import pickle
import re
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import yaml

from emoserve.errors import ConfigError, WeightsError
from emoserve.model.config import ModelConfig
from emoserve.model.entry import read_labels
from emoserve.model.labels import Label
from emoserve.model.network import Emotion2vec

log = logging.getLogger(__name__)

_AUDIO = "d2v_model.modality_encoders.AUDIO."
_TO_PUBLISHED: list[tuple[re.Pattern[str], Callable[[re.Match[str]], str]]] = [
    (re.compile(p), f)
    for p, f in [
        (
            r"feature_encoder\.(\d+)\.conv\.weight",
            lambda m: f"{_AUDIO}local_encoder.conv_layers.{m[1]}.0.weight",
        ),
        (
            r"feature_encoder\.(\d+)\.norm\.(\w+)",
            lambda m: f"{_AUDIO}local_encoder.conv_layers.{m[1]}.2.1.{m[2]}",
        ),
        (r"project_norm\.(\w+)", lambda m: f"{_AUDIO}project_features.1.{m[1]}"),
        (r"project\.(\w+)", lambda m: f"{_AUDIO}project_features.2.{m[1]}"),
        # upstream index 0 (and the last) of `relative_positional_encoder` are transposes
        (
            r"pos_conv\.(\d+)\.(\w+)",
            lambda m: f"{_AUDIO}relative_positional_encoder.{int(m[1]) + 1}.0.{m[2]}",
        ),
        (r"(extra_tokens|alibi_scale)", lambda m: f"{_AUDIO}{m[1]}"),
        (r"prenet_norm\.(\w+)", lambda m: f"{_AUDIO}context_encoder.norm.{m[1]}"),
        (r"prenet\.(.+)", lambda m: f"{_AUDIO}context_encoder.blocks.{m[1]}"),
        (r"blocks\.(.+)", lambda m: f"d2v_model.blocks.{m[1]}"),
        (r"proj\.(\w+)", lambda m: f"proj.{m[1]}"),
    ]
]
# Pre-training machinery that may sit beside the weights; it never changes inference outputs.
_TRAINING_ONLY = re.compile(
    r"^d2v_model\.(modality_encoders\.AUDIO\.decoder\.|shared_decoder\.|ema\.|recon_proj\.)"
)


def published_name(name: str) -> str:
    for pattern, rename in _TO_PUBLISHED:
        if match := pattern.fullmatch(name):
            return rename(match)
    raise KeyError(f"no published name for parameter {name!r}")


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of a model of `config`, without allocating it."""
    return state_shapes(meta_model(config))


def meta_model(config: ModelConfig) -> Emotion2vec:
    """A model whose parameters have shapes but no storage: nothing allocated or initialised."""
    with torch.device("meta"):
        return Emotion2vec(config)


def state_shapes(model: Emotion2vec) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def from_published(state: Mapping[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Rename a published state dict to ours; fail naming every missing, extra or mis-shaped tensor."""
    shapes = expected_shapes(config)
    ours_by_published = {published_name(name): name for name in shapes}
    renamed = {ours_by_published[k]: v for k, v in state.items() if k in ours_by_published}
    unexpected = [k for k in state if k not in ours_by_published and not _TRAINING_ONLY.match(k)]
    check_state(renamed, shapes, unexpected=unexpected, name_of=published_name)
    return renamed


def check_state(
    state: Mapping[str, torch.Tensor],
    shapes: Mapping[str, tuple[int, ...]],
    *,
    unexpected: list[str] | None = None,
    name_of: Callable[[str], str] = str,
) -> None:
    """Fail with a summary (counts and the first few) when `state` does not fit `shapes`; the full
    list goes to the debug log."""
    missing = [name_of(k) for k in shapes if k not in state]
    unexpected = (unexpected or []) + [k for k in state if k not in shapes]
    misshaped = [
        f"{name_of(k)} is {tuple(v.shape)}, expected {shapes[k]}"
        for k, v in state.items()
        if k in shapes and tuple(v.shape) != shapes[k]
    ]
    groups = [("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped)]
    if not any(keys for _, keys in groups):
        return
    for label, keys in groups:
        for key in keys:
            log.debug("checkpoint tensor %s: %s", label, key)
    counts = ", ".join(f"{len(keys)} {label}" for label, keys in groups if keys)
    first = "; ".join(f"{label}: {keys[0]}" for label, keys in groups if keys)
    total = sum(len(keys) for _, keys in groups)
    raise WeightsError(
        f"checkpoint does not match the model config: {total} tensors differ ({counts}), e.g. {first}; "
        "is config.yaml the one published with this model.pt? (the full list: --verbose / debug log)"
    )


# ---------------------------------------------------------------------------------------------
# The published layout


def read_config(model_dir: Path, num_labels: int) -> ModelConfig:
    try:
        raw = yaml.safe_load((model_dir / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise WeightsError(f"{model_dir}: cannot read config.yaml: {err}") from None
    try:
        return ModelConfig.from_yaml_dict(raw if isinstance(raw, dict) else {}, num_labels=num_labels)
    except ConfigError as err:
        raise WeightsError(f"{model_dir}: {err}") from None


def read_published(model_dir: Path) -> tuple[ModelConfig, tuple[Label, ...], dict[str, torch.Tensor]]:
    """Config, labels and (renamed, checked) weights of a published directory.

    `model.pt` is memory-mapped, so the training state beside the weights is never read."""
    labels = read_labels(model_dir / "tokens.txt")
    config = read_config(model_dir, len(labels))
    checkpoint = load_checkpoint(model_dir / "model.pt")
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise WeightsError(f"{model_dir / 'model.pt'}: expected a dict with the weights under 'model'")
    try:
        return config, labels, from_published(state, config)
    except WeightsError as err:
        raise WeightsError(f"{model_dir / 'model.pt'}: {err}") from None


def load_checkpoint(path: Path) -> Any:
    """`torch.load` with `weights_only=True` (no arbitrary pickles), memory-mapped when the file is
    in the zip format (every torch.save since 1.6), so unread training state costs nothing."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as err:
        if "Unsupported global" in str(err):  # an object other than tensors and plain containers
            raise WeightsError(
                f"{path}: refused: not a weights-only checkpoint ({_last_line(err)})"
            ) from None
        raise WeightsError(f"{path}: cannot load: not a torch checkpoint ({_last_line(err)})") from None
    except Exception as err:  # a damaged file fails deep inside the unpickler with any error type
        raise WeightsError(
            f"{path}: cannot load ({type(err).__name__}: {err}); is the file complete?"
        ) from None


def _last_line(err: Exception) -> str:
    lines = [line for line in str(err).splitlines() if line.strip() and not line.startswith("Check the")]
    return lines[-1].strip() if lines else type(err).__name__


# ---------------------------------------------------------------------------------------------
