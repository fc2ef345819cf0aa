"""Read published emotion2vec+ checkpoints, convert them into cache entries, load entries into torch.

A published model directory (`config.yaml`, `model.pt`, `tokens.txt`) is converted once into a
slim cache entry (`entry.py`): the weights alone as safetensors under our parameter names, the parsed
config, the labels, a manifest and the ONNX graphs (`onnx_export.py`). Loading an entry memory-maps
the safetensors file into a model built on the meta device, so no parameter is ever allocated or
randomly initialised before it is overwritten.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
import time
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file

from . import hub
from .config import PRESETS, ConfigError, ModelConfig
from .entry import (
    CONFIG_FILE,
    ENTRY_FORMAT,
    MANIFEST_FILE,
    TOKENS_FILE,
    WEIGHTS_FILE,
    ModelInfo,
    WeightsError,
    atomic_dir,
    is_published_dir,
    is_random_dir,
    read_entry,
    read_labels,
    record_files,
    source_stamp,
)
from .labels import Label
from .model import Emotion2vec

log = logging.getLogger(__name__)

PUBLISHED_LABELS = (
    "生气/angry",
    "厌恶/disgusted",
    "恐惧/fearful",
    "开心/happy",
    "中立/neutral",
    "其他/other",
    "难过/sad",
    "吃惊/surprised",
    "<unk>",
)


# ---------------------------------------------------------------------------------------------
# Published key names <-> ours: one table, from our names to upstream's.

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
# The slim cache entry


def convert(
    model_dir: Path, entry: Path, *, name: str | None = None, onnx: bool | None = None, int8: bool = False
) -> Path:
    """Convert a published directory into a slim cache entry at `entry` (atomically).

    `onnx` (default: unless EMOSERVE_EXPORT_ONNX=0) also exports the float32 ONNX graph for the onnx
    backend, `int8` the dynamically quantized one too."""
    from .onnx_export import export_enabled, onnx_record

    model_dir = Path(model_dir)
    if not is_published_dir(model_dir):
        raise WeightsError(f"{model_dir} is not a model directory (config.yaml, model.pt, tokens.txt)")
    started = time.perf_counter()
    config, labels, state = read_published(model_dir)
    source = source_stamp(model_dir / "model.pt") | {"sha256": hub.sha256_file(model_dir / "model.pt")}
    manifest = {
        "format": ENTRY_FORMAT,
        "name": name or model_dir.resolve().name,
        "random_weights": is_random_dir(model_dir),
        "source": source,
        "tensors": {k: list(v.shape) for k, v in state.items()},
        "converted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    with atomic_dir(Path(entry)) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / WEIGHTS_FILE))
        (tmp / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2))
        (tmp / TOKENS_FILE).write_text("\n".join(label.token for label in labels), encoding="utf-8")
        if export_enabled() if onnx is None else onnx:
            model = meta_model(config)
            model.load_state_dict(state, strict=True, assign=True)
            model.eval().requires_grad_(False)
            dtypes = ("float32", "int8") if int8 else ("float32",)
            manifest["onnx"] = {dtype: onnx_record(model, tmp, dtype) for dtype in dtypes}
        manifest["files"] = record_files(tmp)  # content hashes: `emoserve verify`, the server's check
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, ensure_ascii=False))
    log.info("converted %s -> %s in %.1f s", model_dir, entry, time.perf_counter() - started)
    return Path(entry)


def load_entry(
    entry: Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[Emotion2vec, ModelInfo]:
    """Memory-map the entry's weights into a model whose parameters were never allocated."""
    info = read_entry(entry)
    state = load_file(str(entry / WEIGHTS_FILE), device="cpu")  # zero-copy mmap on the CPU
    model = meta_model(info.config)
    check_state(state, state_shapes(model))
    model.load_state_dict(state, strict=True, assign=True)
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return model, info


# ---------------------------------------------------------------------------------------------
# Random-weight models in the published layout


def make_test_model(out: Path, *, preset: str = "tiny", seed: int = 0, training_state: bool = False) -> Path:
    """Write a random-weight model directory in the published layout, marked as random.

    `training_state` adds Adam-shaped optimizer state (two tensors per weight) as the published
    files carry, so that `model.pt` is ~3x its weights like the real one (for load benchmarks)."""
    if preset not in PRESETS:
        raise WeightsError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    config = PRESETS[preset]
    torch.manual_seed(seed)
    model = Emotion2vec(config)
    with torch.no_grad():  # non-default values so that these tensors matter in parity tests
        model.extra_tokens.normal_(0.0, 0.5)
        model.alibi_scale.uniform_(0.5, 1.5)
    state = {published_name(k): v.contiguous() for k, v in model.state_dict().items()}
    checkpoint: dict[str, Any] = {"model": state}
    if training_state:
        checkpoint["optimizer"] = {
            "state": {
                i: {"exp_avg": torch.zeros_like(v), "exp_avg_sq": torch.zeros_like(v)}
                for i, v in enumerate(state.values())
            },
            "param_groups": [{"lr": 0.0, "params": list(range(len(state)))}],
        }
        checkpoint["num_updates"] = 0
    with atomic_dir(Path(out)) as tmp:
        torch.save(checkpoint, tmp / "model.pt")
        (tmp / "config.yaml").write_text(published_config_yaml(config, preset), encoding="utf-8")
        (tmp / "tokens.txt").write_text("\n".join(PUBLISHED_LABELS), encoding="utf-8")
        (tmp / "configuration.json").write_text(
            json.dumps(
                {
                    "framework": "pytorch",
                    "task": "emotion-recognition",
                    "model": {"type": "funasr"},
                    "file_path_metas": {
                        "init_param": "model.pt",
                        "config": "config.yaml",
                        "tokenizer_conf": {"token_list": "tokens.txt"},
                    },
                    "emoserve": {"random_weights": True, "preset": preset, "seed": seed},
                },
                indent=2,
            )
        )
    return Path(out)


PUBLISHED_CONFIG = Path(__file__).with_name("published_config.yaml")


def published_config_yaml(config: ModelConfig, preset: str) -> str:
    """The complete published `config.yaml` (every key, training ones included, so FunASR loads it too)
    with the architecture numbers of `config`."""
    runs: list[str] = []
    layers = list(config.conv_layers)
    while layers:
        count = next((i for i, layer in enumerate(layers) if layer != layers[0]), len(layers))
        runs.append(f"[{layers[0]}]" + (f" * {count}" if count > 1 else ""))
        layers = layers[count:]
    raw = yaml.safe_load(PUBLISHED_CONFIG.read_text(encoding="utf-8"))
    conf = raw["model_conf"]
    audio = conf["modalities"]["audio"]
    conf |= {
        "depth": config.depth,
        "num_heads": config.num_heads,
        "norm_eps": config.norm_eps,
        "embed_dim": config.embed_dim,
        "mlp_ratio": config.mlp_ratio,
        "normalize": config.normalize,
    }
    audio |= {
        "prenet_depth": config.prenet_depth,
        "num_extra_tokens": config.num_extra_tokens,
        "num_alibi_heads": config.num_alibi_heads,
        "model_depth": config.depth,
        "feature_encoder_spec": " + ".join(runs),
        "conv_pos_width": config.conv_pos_width,
        "conv_pos_groups": config.conv_pos_groups,
        "conv_pos_depth": config.conv_pos_depth,
    }
    header = f"# RANDOM-WEIGHT test model made by `emoserve make-test-model --preset {preset}`\n"
    return header + yaml.safe_dump(raw, sort_keys=False, allow_unicode=True)
