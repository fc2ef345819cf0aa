"""What a result's scores claim, chosen per request or per server, in numpy (never scikit-learn):

    label subsets   `labels=angry,happy,neutral,sad` (or a named set, `iemocap4`): the nine scores restricted
                    to those labels and renormalised to sum to 1, which is what the upstream maintainers
                    advise for fewer classes (emotion2vec#45); a named set may fold labels together
    calibration     `emoserve calibrate` fits, on your labelled audio, a map from the model's scores to
                    probabilities of being right (temperature scaling, or isotonic regression per label);
                    a server given `--calibration DIR` serves the calibrated scores, and says so
    abstain         `min_confidence=X`: a result whose top score is under X says `uncertain` as its emotion
                    (its scores stay as they are); per request, as a setting, and per head (head.json)

The order is calibration, then the label subset, then the threshold.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from emoserve.errors import HeadError, OptionError
from emoserve.files import atomic_dir, atomic_write
from emoserve.model.labels import EMOJI

if TYPE_CHECKING:
    from emoserve.inference.results import FrameResult, HeadResult, Result
    from emoserve.model.entry import ModelInfo
    from emoserve.model.labels import Label

UNCERTAIN = "uncertain"  # the top label of a result under its min_confidence
UNCERTAIN_ZH = "不确定"
UNCERTAIN_EMOJI = "🤷"

# Named label sets for common datasets: each label of the set gathers the scores of the labels listed (those
# the scores have). IEMOCAP's 4-class convention folds `excited` into `happy` (a head may have `excited`;
# the nine emotions have not). EmoDB and RAVDESS: their classes that the nine emotions name.
LABEL_SETS: dict[str, dict[str, tuple[str, ...]]] = {
    "iemocap4": {
        "angry": ("angry",),
        "happy": ("happy", "excited"),
        "neutral": ("neutral",),
        "sad": ("sad",),
    },
    "emodb": {x: (x,) for x in ("angry", "disgusted", "fearful", "happy", "neutral", "sad")},
    "ravdess": {x: (x,) for x in ("angry", "disgusted", "fearful", "happy", "neutral", "sad", "surprised")},
}


# ------------------------------------------------------------------------------------------- readout


@dataclass(frozen=True)
class Readout:
    """What one request asks of its results' scores: a label subset (label -> the labels whose scores it
    gathers) and an abstain threshold (for the nine emotions and a classifier head alike)."""

    labels: Mapping[str, tuple[str, ...]] | None = None
    min_confidence: float | None = None

    @property
    def empty(self) -> bool:
        return self.labels is None and self.min_confidence is None


def readout(
    labels: str | Sequence[str] | None, min_confidence: float | str | None, known: Sequence[str]
) -> Readout:
    """A request's `labels` (comma-separated or a list, or a named set) and `min_confidence`, checked
    against the model's labels `known`: OptionError naming what is wrong and the valid values."""
    return Readout(label_subset(labels, known), threshold(min_confidence))


def label_subset(text: str | Sequence[str] | None, known: Sequence[str]) -> dict[str, tuple[str, ...]] | None:
    if text is None or (isinstance(text, str) and not text.strip()):
        return None
    names = [x.strip() for x in text.split(",")] if isinstance(text, str) else [str(x).strip() for x in text]
    names = [x for x in names if x]
    if len(names) == 1 and names[0] in LABEL_SETS:
        mapping = LABEL_SETS[names[0]]
    else:
        mapping = {name: (name,) for name in dict.fromkeys(names)}
    if unknown := [label for label, sources in mapping.items() if not set(sources) & set(known)]:
        said = "is not a label" if len(unknown) == 1 else "are not labels"
        raise OptionError(
            f"labels: {', '.join(map(repr, unknown))} {said} of this model; its labels are "
            f"{', '.join(known)} (or a named set: {', '.join(LABEL_SETS)})"
        )
    if len(mapping) < 2:
        raise OptionError(f"labels: {', '.join(names)} is one label; a subset needs two or more")
    return {label: tuple(s for s in sources if s in known) for label, sources in mapping.items()}


def threshold(value: float | str | None) -> float | None:
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except ValueError:
        raise OptionError(f"min_confidence is {value!r}; give a number from 0 to 1") from None
    if not 0.0 <= number <= 1.0:
        raise OptionError(f"min_confidence is {number:g}; give a number from 0 to 1")
    return number


def restrict(scores: Mapping[str, float], subset: Mapping[str, tuple[str, ...]]) -> dict[str, float]:
    """`scores` over the subset's labels, each the sum of its sources', renormalised to sum to 1 (equal
    shares where they sum to 0)."""
    gathered = np.array([sum(scores.get(s, 0.0) for s in sources) for sources in subset.values()])
    total = gathered.sum()
    shares = gathered / total if total > 0 else np.full(len(gathered), 1.0 / len(gathered))
    return {label: float(p) for label, p in zip(subset, shares, strict=True)}


def first_set(*thresholds: float | None) -> float | None:
    """The first threshold given: a request's wins over a head's own, which wins over the setting."""
    return next((t for t in thresholds if t is not None), None)


def read_out(
    result: Result, chosen: Readout | None, labels: Mapping[str, Label], head_threshold: float | None = None
) -> Result:
    """`result` with the request's label subset (its scores, frames and top label) and threshold (its
    top label `uncertain` when under it), and its classifier head's label `uncertain` under
    `head_threshold`. `labels`: the model's, by English key (their Chinese names and emoji). Frames keep
    their labels: the threshold is for the clip's answer."""
    if chosen is not None and chosen.labels is not None:
        scores = restrict(result.scores, chosen.labels)
        frames = (
            [_restricted_frame(f, chosen.labels) for f in result.frames] if result.frames else result.frames
        )
        result = dataclasses.replace(result, scores=scores, frames=frames, **_top(scores, labels))
    if chosen is not None and chosen.min_confidence is not None and result.confidence < chosen.min_confidence:
        result = dataclasses.replace(result, emotion=UNCERTAIN, label_zh=UNCERTAIN_ZH, emoji=UNCERTAIN_EMOJI)
    return _head_abstains(result, head_threshold)


def _top(scores: dict[str, float], labels: Mapping[str, Label]) -> dict[str, Any]:
    best = max(scores, key=lambda k: scores[k])
    label = labels.get(best)
    return {
        "emotion": best,
        "label_zh": label.zh if label else best,
        "emoji": label.emoji if label else EMOJI.get(best, "❔"),
        "confidence": scores[best],
    }


def _restricted_frame(frame: FrameResult, subset: Mapping[str, tuple[str, ...]]) -> FrameResult:
    scores = restrict(frame.scores, subset)
    best = max(scores, key=lambda k: scores[k])
    return dataclasses.replace(frame, scores=scores, emotion=best, confidence=scores[best])


def _head_abstains(result: Result, min_confidence: float | None) -> Result:
    head: HeadResult | None = result.head
    if min_confidence is None or head is None or head.confidence is None or head.confidence >= min_confidence:
        return result
    uncertain = dataclasses.replace(head, label=UNCERTAIN, label_zh=UNCERTAIN_ZH, emoji=UNCERTAIN_EMOJI)
    return dataclasses.replace(result, head=uncertain)


# --------------------------------------------------------------------------------------- calibration

CALIBRATION_FORMAT = "emoserve-calibration"
CALIBRATION_VERSION = 1
CALIBRATION_FILE = "calibration.json"
Method = Literal["temperature", "isotonic"]


@dataclass(frozen=True)
class Calibration:
    """A map from scores (n, labels) to calibrated probabilities: temperature scaling, softmax(log p / T),
    which keeps every argmax; or isotonic regression per label (one-vs-rest, a piecewise-linear map given by
    its knots), then renormalised, as scikit-learn's CalibratedClassifierCV does."""

    method: Method
    labels: tuple[str, ...]
    temperature: float = 1.0
    knots: tuple[tuple[tuple[float, ...], tuple[float, ...]], ...] = ()  # per label: (x, y) of its map
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def apply(self, scores: np.ndarray) -> np.ndarray:
        """(n, labels) or (labels,) probabilities -> the calibrated ones, float64, each row summing to 1."""
        p = np.asarray(scores, np.float64)
        single = p.ndim == 1
        p = np.atleast_2d(p)
        if p.shape[1] != len(self.labels):
            raise ValueError(f"a calibration of {len(self.labels)} labels got {p.shape[1]} scores")
        if self.method == "temperature":
            z = np.log(np.clip(p, 1e-300, None)) / self.temperature
            z -= z.max(axis=1, keepdims=True)
            out = np.exp(z)
        else:
            out = np.stack([np.interp(p[:, k], x, y) for k, (x, y) in enumerate(self.knots)], axis=1)
        total = out.sum(axis=1, keepdims=True)
        out = np.divide(out, total, out=np.full_like(out, 1.0 / out.shape[1]), where=total > 0)
        return out[0] if single else out

    @property
    def model(self) -> dict[str, Any]:
        return dict(self.meta.get("model", {}))

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": CALIBRATION_FORMAT,
            "version": CALIBRATION_VERSION,
            "method": self.method,
            "labels": list(self.labels),
            "temperature": self.temperature,
            "knots": [{"x": list(x), "y": list(y)} for x, y in self.knots],
            **dict(self.meta),
        }

    def summary(self) -> dict[str, Any]:
        """What GET /v1/model says of a served calibration."""
        report = self.meta.get("report", {})
        return {"method": self.method, "temperature": self.temperature, "ece": report.get("ece")}

    def check_model(self, info: ModelInfo, labels: Sequence[str]) -> None:
        """Refuse a model whose scores this calibration was not fitted on."""
        from emoserve.model.head import model_identity

        want, have = self.model, model_identity(info)
        if list(labels) != list(self.labels) or (
            want.get("config_sha256") != have["config_sha256"]
            or (want.get("weights_sha256") and want.get("weights_sha256") != have["weights_sha256"])
        ):
            raise HeadError(
                f"this calibration was fitted on the scores of {want.get('name')} "
                f"({', '.join(self.labels)}), not of {have['name']}: calibrate again on this model "
                "(emoserve calibrate)"
            )


def save_calibration(dest: Path, calibration: Calibration, extra_files: dict[str, bytes]) -> Path:
    """The calibration directory: calibration.json (numbers only, no code) and the report's files."""
    with atomic_dir(dest) as work:
        with atomic_write(work / CALIBRATION_FILE) as out:
            json.dump(calibration.to_dict(), out, indent=2, ensure_ascii=False)
            out.write("\n")
        for name, data in extra_files.items():
            (work / name).write_bytes(data)
    return dest


def load_calibration(path: str | Path) -> Calibration:
    """The calibration in directory `path`; HeadError naming the file when it is not a sound one."""
    file = Path(path) / CALIBRATION_FILE
    if not file.is_file():
        raise HeadError(
            f"{path} is not a calibration directory: it has no {CALIBRATION_FILE} (emoserve calibrate)"
        )
    try:
        body = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise HeadError(f"{file} is damaged: {error}") from None
    return calibration_from_dict(body, str(file))


def calibration_from_dict(body: Any, where: str) -> Calibration:
    """A calibration from its JSON (calibration.json, or a head.json's `calibration`); HeadError naming
    `where` when it is not a sound one."""
    try:
        if body.get("format") != CALIBRATION_FORMAT or body.get("version") != CALIBRATION_VERSION:
            raise ValueError(f"not an {CALIBRATION_FORMAT} version {CALIBRATION_VERSION}")
        method, labels = body["method"], tuple(str(x) for x in body["labels"])
        knots = tuple((tuple(map(float, k["x"])), tuple(map(float, k["y"]))) for k in body["knots"])
        temperature = float(body["temperature"])
        if method not in ("temperature", "isotonic") or not temperature > 0:
            raise ValueError(f"method {method!r}, temperature {temperature}")
        if method == "isotonic" and len(knots) != len(labels):
            raise ValueError(f"{len(knots)} isotonic maps for {len(labels)} labels")
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise HeadError(f"{where} is damaged: {error}") from None
    meta = {k: v for k, v in body.items() if k in ("model", "report", "created", "versions")}
    return Calibration(method, labels, temperature, knots, meta)
