"""A head: a small classifier of your own labels, or a regression of your own numeric targets (arousal,
valence, ...), on the model's utterance embedding (`emoserve train-head`), stored as a directory that is
safe to share and to load, and run in numpy.

    DIR/head.safetensors   the arrays: `mean` and `scale` (the standardisation), then `layer.N.weight`
                           (out, in) and `layer.N.bias` (out,) of each layer, the last one giving logits
                           (a classifier) or the targets' values (a regression)
    DIR/head.json          task (classification | regression), labels (a classifier's labels: name,
                           optional zh and emoji; a regression's targets: name), the model it was trained
                           on, the kind, the training report, library versions and the weights' sha256

No pickle anywhere: a head is arrays and JSON, so loading one runs no code from it. Inference is
`layers(standardise(x))` in float64, ReLU between layers, then softmax for a classifier: the same numbers
as scikit-learn's `predict_proba` (a classifier) or `predict` (a regression) of the pipeline it came from
(to ~1e-12), with no scikit-learn here. A two-class classifier (one logit z) is stored as the logits
(0, z): softmax of those is exactly (1 - sigmoid(z), sigmoid(z)).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from emoserve.constants import HeadTask
from emoserve.errors import HeadError
from emoserve.files import atomic_dir, atomic_write, sha256_file
from emoserve.model.entry import ModelInfo

HEAD_FORMAT = "emoserve-head"
HEAD_VERSION = 1
WEIGHTS_FILE = "head.safetensors"
META_FILE = "head.json"


@dataclass(frozen=True)
class HeadLabel:
    name: str
    zh: str | None = None
    emoji: str | None = None


def model_identity(info: ModelInfo) -> dict[str, Any]:
    """What a head records of the model whose embeddings it was trained on, and is checked against."""
    config = json.dumps(info.config.to_dict(), sort_keys=True).encode()
    return {
        "name": info.name,
        "config_sha256": hashlib.sha256(config).hexdigest(),
        "weights_sha256": info.source.get("sha256"),
        "embedding_dim": info.config.embed_dim,
        "random_weights": info.random_weights,
    }


@dataclass(frozen=True)
class Head:
    name: str
    path: Path | None
    labels: tuple[HeadLabel, ...]
    mean: np.ndarray  # (dim,) float64
    scale: np.ndarray  # (dim,) float64
    layers: tuple[tuple[np.ndarray, np.ndarray], ...]  # (weight (out, in), bias (out,)), float64
    meta: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def load(cls, path: str | Path, name: str | None = None) -> Head:
        """`load_head`: the head in directory `path`."""
        return load_head(path, name)

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    @property
    def model(self) -> dict[str, Any]:
        return dict(self.meta.get("model", {}))

    @property
    def kind(self) -> str:
        return str(self.meta.get("kind", "logistic"))

    @property
    def task(self) -> HeadTask:
        return "regression" if self.meta.get("task") == "regression" else "classification"

    @property
    def min_confidence(self) -> float | None:
        """The head's own abstain threshold (`train-head --min-confidence`): under it its label is
        `uncertain`, unless a request sets another."""
        value = self.meta.get("min_confidence")
        return float(value) if value is not None else None

    @property
    def label_names(self) -> list[str]:
        """A classifier's labels, or a regression's targets, in output order."""
        return [label.name for label in self.labels]

    def outputs(self, embeddings: np.ndarray) -> np.ndarray:
        """(n, dim) or (dim,) utterance embeddings -> (n, outputs) or (outputs,): a classifier's logits, a
        regression's values; float64."""
        x = np.asarray(embeddings, dtype=np.float64)
        single = x.ndim == 1
        x = np.atleast_2d(x)
        if x.shape[-1] != self.dim:
            raise HeadError(f"head {self.name!r} takes {self.dim}-d embeddings; this one is {x.shape[-1]}-d")
        h = (x - self.mean) / self.scale
        for i, (weight, bias) in enumerate(self.layers):
            h = h @ weight.T + bias
            if i < len(self.layers) - 1:
                h = np.maximum(h, 0.0)
        return h[0] if single else h

    def probabilities(self, embeddings: np.ndarray) -> np.ndarray:
        """A classifier's (n, labels) or (labels,) probabilities, float64."""
        if self.task == "regression":
            raise HeadError(f"head {self.name!r} is a regression of {', '.join(self.label_names)}: no labels")
        h = np.atleast_2d(self.outputs(embeddings))
        h = h - h.max(axis=1, keepdims=True)
        p = np.exp(h)
        p /= p.sum(axis=1, keepdims=True)
        return p[0] if np.asarray(embeddings).ndim == 1 else p

    def values(self, embeddings: np.ndarray) -> np.ndarray:
        """A regression's (n, targets) or (targets,) values, in the units of its training data."""
        if self.task != "regression":
            raise HeadError(f"head {self.name!r} is a classifier of labels: it has no values")
        return self.outputs(embeddings)

    def check_model(self, info: ModelInfo) -> None:
        """Refuse, in one sentence, a model whose embeddings this head was not trained on."""
        check_identity(self, model_identity(info))

    def summary(self) -> dict[str, Any]:
        """What /v1/model lists of a served head."""
        report = self.meta.get("report", {})
        out = {
            "name": self.name,
            "task": self.task,
            "labels": [{"name": label.name, "zh": label.zh, "emoji": label.emoji} for label in self.labels],
            "kind": self.kind,
            "model": self.model,
        }
        if self.task == "regression":  # the training values' range: the scale a client draws values on
            ranges = self.meta.get("training", {}).get("targets", {})
            return {**out, "cv": {"targets": report.get("targets", {})}, "ranges": ranges}
        return {**out, "cv": {k: report.get(k) for k in ("accuracy", "balanced_accuracy", "f1_macro")}}


def check_identity(head: Head, model: dict[str, Any]) -> None:
    want = head.model
    where = f"head {head.name!r}" + (f" ({head.path})" if head.path else "")
    if want.get("embedding_dim") != model["embedding_dim"]:
        raise HeadError(
            f"{where} was trained on {want.get('embedding_dim')}-d embeddings of {want.get('name')}; "
            f"{model['name']} gives {model['embedding_dim']}-d ones: train it again on this model"
        )
    same_config = want.get("config_sha256") == model["config_sha256"]
    known = want.get("weights_sha256") and model["weights_sha256"]
    if not same_config or (known and want["weights_sha256"] != model["weights_sha256"]):
        raise HeadError(
            f"{where} was trained on the embeddings of {want.get('name')} (weights "
            f"{str(want.get('weights_sha256'))[:12]}), not of {model['name']} (weights "
            f"{str(model['weights_sha256'])[:12]}): its scores would be meaningless; "
            "train it again on this model"
        )


# ---------------------------------------------------------------------------------------- save and load


def save_head(
    dest: Path,
    labels: Sequence[HeadLabel],
    mean: np.ndarray,
    scale: np.ndarray,
    layers: Sequence[tuple[np.ndarray, np.ndarray]],
    meta: dict[str, Any],
    extra_files: dict[str, bytes] | None = None,
) -> Path:
    """Write a head directory at `dest` (replacing one there, only once complete): the arrays, head.json
    with `meta` (model, kind, report, versions) and the arrays' sha256, and `extra_files` (report.json,
    confusion.png) beside them."""
    from safetensors.numpy import save_file

    arrays = {"mean": np.asarray(mean, np.float64), "scale": np.asarray(scale, np.float64)}
    for i, (weight, bias) in enumerate(layers):
        arrays[f"layer.{i}.weight"] = np.ascontiguousarray(weight, np.float64)
        arrays[f"layer.{i}.bias"] = np.ascontiguousarray(bias, np.float64)
    with atomic_dir(dest) as work:
        save_file(arrays, str(work / WEIGHTS_FILE))
        body = {
            "format": HEAD_FORMAT,
            "version": HEAD_VERSION,
            "labels": [{"name": label.name, "zh": label.zh, "emoji": label.emoji} for label in labels],
            **meta,
            "files": {WEIGHTS_FILE: sha256_file(work / WEIGHTS_FILE)},
        }
        with atomic_write(work / META_FILE) as out:
            json.dump(body, out, indent=2, ensure_ascii=False)
            out.write("\n")
        for name, data in (extra_files or {}).items():
            (work / name).write_bytes(data)
    return dest


def load_head(path: str | Path, name: str | None = None) -> Head:
    """The head in directory `path` (named `name`, default the directory's name), its arrays checked
    against head.json's sha256 and shapes; HeadError, naming the file, when it is not a sound head."""
    path = Path(path)
    meta = _read_meta(path)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise HeadError(f"{path} has no {WEIGHTS_FILE}: not a complete head directory (emoserve train-head)")
    recorded = meta.get("files", {}).get(WEIGHTS_FILE)
    if recorded and sha256_file(weights) != recorded:
        raise HeadError(
            f"{weights} is damaged: its sha256 differs from the one in {META_FILE}; copy it again"
        )
    arrays = _read_arrays(weights)
    labels = _labels(meta, path, 1 if meta.get("task") == "regression" else 2)
    return _assemble(name or path.name, path, labels, arrays, meta)


def _read_meta(path: Path) -> dict[str, Any]:
    file = path / META_FILE
    if not file.is_file():
        raise HeadError(
            f"{path} is not a head directory: it has no {META_FILE} (emoserve train-head makes one)"
        )
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise HeadError(f"{file} is damaged: not valid JSON ({error})") from None
    if not isinstance(meta, dict) or meta.get("format") != HEAD_FORMAT:
        raise HeadError(f"{file} is not an emoserve head (its format is not {HEAD_FORMAT!r})")
    if meta.get("version") != HEAD_VERSION:
        raise HeadError(
            f"{file} is head format version {meta.get('version')}; this emoserve reads {HEAD_VERSION}"
        )
    return meta


def _read_arrays(weights: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as error:
        raise HeadError(f"{weights} is damaged: {error}") from None


def _labels(meta: dict[str, Any], path: Path, least: int) -> tuple[HeadLabel, ...]:
    raw = meta.get("labels")
    if (
        not isinstance(raw, list)
        or len(raw) < least
        or not all(isinstance(x, dict) and x.get("name") for x in raw)
    ):
        raise HeadError(
            f"{path / META_FILE}: `labels` must list at least {least} "
            f"{'target' if least == 1 else 'labels'} with a `name` each"
        )
    return tuple(HeadLabel(str(x["name"]), x.get("zh"), x.get("emoji")) for x in raw)


def _assemble(
    name: str, path: Path, labels: tuple[HeadLabel, ...], arrays: dict[str, np.ndarray], meta: dict[str, Any]
) -> Head:
    n_layers = sum(1 for key in arrays if key.endswith(".weight"))
    try:
        mean, scale = arrays["mean"], arrays["scale"]
        layers = tuple((arrays[f"layer.{i}.weight"], arrays[f"layer.{i}.bias"]) for i in range(n_layers))
    except KeyError as missing:
        raise HeadError(f"{path / WEIGHTS_FILE} lacks the array {missing}: not a complete head") from None
    width = mean.shape[0] if mean.ndim == 1 else -1
    for weight, bias in layers:
        if weight.ndim != 2 or weight.shape[1] != width or bias.shape != (weight.shape[0],):
            raise HeadError(
                f"{path / WEIGHTS_FILE}: its arrays' shapes do not chain ({weight.shape} after {width})"
            )
        width = weight.shape[0]
    if not layers or scale.shape != mean.shape or width != len(labels):
        raise HeadError(f"{path / WEIGHTS_FILE}: {width} outputs for {len(labels)} labels in {META_FILE}")
    if not all(np.isfinite(a).all() for a in arrays.values()) or not (scale > 0).all():
        raise HeadError(f"{path / WEIGHTS_FILE} holds non-finite numbers or a scale <= 0: it is damaged")
    as64 = tuple((w.astype(np.float64), b.astype(np.float64)) for w, b in layers)
    return Head(name, path, labels, mean.astype(np.float64), scale.astype(np.float64), as64, meta)
