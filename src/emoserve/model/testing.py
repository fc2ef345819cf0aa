"""Random-weight models in the published layout: what the tests, the benchmarks and the offline
fallback run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import yaml

from emoserve.errors import WeightsError
from emoserve.files import atomic_dir
from emoserve.model.checkpoint import published_name
from emoserve.model.config import PRESETS, ModelConfig
from emoserve.model.labels import PUBLISHED_LABELS
from emoserve.model.network import Emotion2vec

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
