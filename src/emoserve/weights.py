"""Find, download, convert and load emotion2vec+ weights.

A published model directory (`config.yaml`, `model.pt`, `tokens.txt`) is converted once into a
slim cache entry: the weights alone as safetensors under our parameter names, the parsed config,
the labels and a manifest. Loading an entry memory-maps the safetensors file into a model built
on the meta device, so no parameter is ever allocated or randomly initialised before it is
overwritten.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import pickle
import re
import shutil
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file

from . import hub
from .hub import Hub
from .labels import Label, parse_tokens
from .model import PRESETS, ConfigError, Emotion2vec, ModelConfig

log = logging.getLogger(__name__)

ENTRY_FORMAT = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
MANIFEST_FILE = "manifest.json"
TOKENS_FILE = "tokens.txt"
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
FALLBACK_PRESET = "large"  # the architecture of the default model


class WeightsError(RuntimeError):
    """A model that cannot be found, downloaded, converted or loaded; the message says what to do."""


@dataclass(frozen=True)
class ModelInfo:
    name: str
    path: Path  # the slim cache entry
    config: ModelConfig
    labels: tuple[Label, ...]
    random_weights: bool
    source: dict[str, Any]  # where the weights came from (path, size, sha256)

    @property
    def num_parameters(self) -> int:
        return int(sum(math.prod(shape) for shape in self.tensor_shapes().values()))

    def tensor_shapes(self) -> dict[str, list[int]]:
        return dict(json.loads((self.path / MANIFEST_FILE).read_text())["tensors"])


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
    missing = [name_of(k) for k in shapes if k not in state]
    unexpected = (unexpected or []) + [k for k in state if k not in shapes]
    misshaped = [
        f"{name_of(k)} is {tuple(v.shape)}, expected {shapes[k]}"
        for k, v in state.items()
        if k in shapes and tuple(v.shape) != shapes[k]
    ]
    problems = [
        f"{label}: {', '.join(keys)}"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped))
        if keys
    ]
    if problems:
        raise WeightsError("checkpoint does not match the model config; " + "; ".join(problems))


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


def read_labels(path: Path) -> tuple[Label, ...]:
    try:
        labels = parse_tokens(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise WeightsError(f"cannot read labels: {err}") from None
    if not labels:
        raise WeightsError(f"{path} lists no labels")
    return labels


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


def is_published_dir(path: Path) -> bool:
    return all((path / f).is_file() for f in ("config.yaml", "model.pt", "tokens.txt"))


def is_entry(path: Path) -> bool:
    return all((path / f).is_file() for f in (MANIFEST_FILE, WEIGHTS_FILE, CONFIG_FILE, TOKENS_FILE))


def is_random_dir(model_dir: Path) -> bool:
    """`make-test-model` marks its directories in configuration.json."""
    try:
        meta = json.loads((model_dir / "configuration.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return bool(isinstance(meta, dict) and meta.get("emoserve", {}).get("random_weights"))


# ---------------------------------------------------------------------------------------------
# The slim cache entry


@contextmanager
def atomic_dir(dest: Path) -> Iterator[Path]:
    """Yield a temporary directory beside `dest` that replaces `dest` only if the block succeeds."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        yield tmp
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def source_stamp(model_pt: Path) -> dict[str, Any]:
    stat = model_pt.stat()
    return {"path": str(model_pt.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def convert(model_dir: Path, entry: Path, *, name: str | None = None) -> Path:
    """Convert a published directory into a slim cache entry at `entry` (atomically)."""
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
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, ensure_ascii=False))
    log.info("converted %s -> %s in %.1f s", model_dir, entry, time.perf_counter() - started)
    return Path(entry)


def read_entry(entry: Path) -> ModelInfo:
    try:
        manifest = json.loads((entry / MANIFEST_FILE).read_text())
        config = ModelConfig.from_dict(json.loads((entry / CONFIG_FILE).read_text()))
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise WeightsError(f"{entry}: broken cache entry ({err}); delete it to convert again") from None
    if manifest.get("format") != ENTRY_FORMAT:
        raise WeightsError(f"{entry}: cache entry format {manifest.get('format')}, expected {ENTRY_FORMAT}")
    labels = read_labels(entry / TOKENS_FILE)
    return ModelInfo(
        manifest["name"], entry, config, labels, bool(manifest["random_weights"]), manifest["source"]
    )


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
# Resolving --model


def home() -> Path:
    """The cache directory: $EMOSERVE_HOME, else the user's cache dir."""
    if env := os.environ.get("EMOSERVE_HOME"):
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("emoserve"))


def resolve(
    model: str | os.PathLike[str] | None = None,
    *,
    hub_name: Hub = "auto",
    cache: Path | None = None,
    progress: bool = True,
) -> Path:
    """The slim cache entry for `model`: a local directory or a known name (default: large).

    Only when no model is given and the default can be neither found nor downloaded does this
    fall back - loudly - to a generated random-weight model of the large architecture."""
    cache = cache or home()
    if model is None:
        try:
            return resolve_name(hub.DEFAULT_MODEL, hub_name=hub_name, cache=cache, progress=progress)
        except (WeightsError, hub.HubError) as err:
            return random_fallback(cache, reason=str(err))
    path = Path(model).expanduser()
    if path.is_dir():
        return resolve_dir(path, cache)
    if hub.canonical_name(str(model)) is not None:
        return resolve_name(str(model), hub_name=hub_name, cache=cache, progress=progress)
    raise WeightsError(
        f"model {str(model)!r} is neither a directory nor a known name "
        f"({', '.join(hub.KNOWN_MODELS)}, also as iic/... or emotion2vec/...)"
    )


def resolve_dir(path: Path, cache: Path) -> Path:
    if is_entry(path):
        return path
    if not is_published_dir(path):
        raise WeightsError(
            f"{path} is not a model directory: expected config.yaml, model.pt and tokens.txt "
            f"(the published layout) or a converted entry ({MANIFEST_FILE}, {WEIGHTS_FILE})"
        )
    # one entry per source directory, reused while model.pt is unchanged (checked by size and mtime,
    # not by re-hashing 1.9 GB on every start)
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
    entry = cache / "converted" / f"{path.resolve().name}-{digest}"
    if is_entry(entry):
        stamp = read_entry(entry).source
        current = source_stamp(path / "model.pt")
        if all(stamp.get(k) == current[k] for k in ("size", "mtime_ns")):
            return entry
        log.info("%s changed since it was converted; converting again", path / "model.pt")
    return convert(path, entry)


def resolve_name(name: str, *, hub_name: Hub, cache: Path, progress: bool) -> Path:
    canonical = hub.canonical_name(name)
    if canonical is None:
        raise WeightsError(f"unknown model name {name!r}; known: {', '.join(hub.KNOWN_MODELS)}")
    entry = cache / "models" / canonical
    if is_entry(entry):
        return entry  # no network at all when the cache has the model
    download_dir = cache / "downloads" / canonical
    hub.download(canonical, download_dir, hub=hub_name, progress=progress)
    try:
        return convert(download_dir, entry, name=canonical)
    finally:
        shutil.rmtree(download_dir, ignore_errors=True)  # the entry holds all inference needs


def random_fallback(cache: Path, reason: str) -> Path:
    name = f"{hub.DEFAULT_MODEL}-random"
    log.warning(
        "\n%s\n!! %s is not cached and could not be downloaded:\n!!   %s\n"
        "!! Using a RANDOM-WEIGHT model of the same (large) architecture instead.\n"
        "!! Its predictions are MEANINGLESS; pass --model to use real weights.\n%s",
        "!" * 78,
        hub.DEFAULT_MODEL,
        reason,
        "!" * 78,
    )
    entry = cache / "models" / name
    if is_entry(entry):
        return entry
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        make_test_model(Path(tmp) / "published", preset=FALLBACK_PRESET, seed=0)
        return convert(Path(tmp) / "published", entry, name=name)


def describe(model: str | os.PathLike[str] | None) -> dict[str, Any]:
    """What `emoserve info` shows; never downloads or converts."""
    path = Path(model).expanduser() if model is not None else None
    if path is None or not path.is_dir():
        name = hub.canonical_name(str(model or hub.DEFAULT_MODEL))
        if name is None:
            raise WeightsError(f"model {model!r} is neither a directory nor a known name")
        path = home() / "models" / name
        if not is_entry(path):
            return {"name": name, "cached": False, "hint": f"run `emoserve download {name}`"}
    if is_entry(path):
        info = read_entry(path)
        config, labels, params, random = info.config, info.labels, info.num_parameters, info.random_weights
        extra: dict[str, Any] = {"source": info.source}
    elif is_published_dir(path):
        config, labels, state = read_published(path)
        params, random, extra = sum(v.numel() for v in state.values()), is_random_dir(path), {}
    else:
        raise WeightsError(f"{path} is not a model directory (config.yaml, model.pt, tokens.txt)")
    return {
        "path": str(path),
        "random_weights": random,
        "parameters": params,
        "weights_mb_fp32": round(params * 4 / 1e6, 1),
        "labels": [{"en": lb.en, "zh": lb.zh, "masked": lb.masked} for lb in labels],
        "config": config.to_dict(),
        "files": {p.name: p.stat().st_size for p in sorted(path.iterdir()) if p.is_file()},
        **extra,
    }


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


def published_config_yaml(config: ModelConfig, preset: str) -> str:
    """A `config.yaml` in the published shape (with a few training-only keys, as the real ones have)."""
    runs: list[str] = []
    layers = list(config.conv_layers)
    while layers:
        count = next((i for i, layer in enumerate(layers) if layer != layers[0]), len(layers))
        runs.append(f"[{layers[0]}]" + (f" * {count}" if count > 1 else ""))
        layers = layers[count:]
    raw = {
        "model": "Emotion2vec",
        "model_conf": {
            "loss_beta": 0.0,
            "depth": config.depth,
            "num_heads": config.num_heads,
            "norm_eps": config.norm_eps,
            "embed_dim": config.embed_dim,
            "mlp_ratio": config.mlp_ratio,
            "layer_norm_first": False,
            "ema_decay": 0.999,
            "normalize": config.normalize,
            "modalities": {
                "audio": {
                    "type": "AUDIO",
                    "prenet_depth": config.prenet_depth,
                    "num_extra_tokens": config.num_extra_tokens,
                    "mask_prob": 0.5,
                    "use_alibi_encoder": True,
                    "learned_alibi_scale": True,
                    "learned_alibi_scale_per_head": True,
                    "learned_alibi_scale_per_layer": False,
                    "num_alibi_heads": config.num_alibi_heads,
                    "model_depth": config.depth,
                    "decoder": {"decoder_dim": 384, "decoder_layers": 4},
                    "extractor_mode": "layer_norm",
                    "feature_encoder_spec": " + ".join(runs),
                    "conv_pos_width": config.conv_pos_width,
                    "conv_pos_groups": config.conv_pos_groups,
                    "conv_pos_depth": config.conv_pos_depth,
                    "conv_pos_pre_ln": False,
                }
            },
        },
        "tokenizer": "CharTokenizer",
        "scope_map": ["d2v_model.", "none"],
    }
    header = f"# RANDOM-WEIGHT test model made by `emoserve make-test-model --preset {preset}`\n"
    return header + yaml.safe_dump(raw, sort_keys=False, allow_unicode=True)
