"""Heads at inference: a head's result on a clip's utterance embedding, beside the nine emotions (a
classifier's label and scores, or a regression's values). Numpy only
(the head's arrays, `model/head.py`): no scikit-learn, on every backend."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np

from emoserve.inference.results import HeadResult, Result
from emoserve.model.head import Head, load_head

if TYPE_CHECKING:
    from emoserve.model.entry import ModelInfo


def head_result(head: Head, pooled: np.ndarray) -> HeadResult:
    """`head` on one utterance embedding (dim,): a classifier's label and scores, a regression's values."""
    if head.task == "regression":
        values = head.values(pooled)
        named = {name: float(v) for name, v in zip(head.label_names, values, strict=True)}
        return HeadResult(head.name, None, None, {}, kind="regression", values=named)
    p = head_probabilities(head, pooled)
    best = int(p.argmax())
    label = head.labels[best]
    return HeadResult(
        name=head.name,
        label=label.name,
        confidence=float(p[best]),
        scores={lab.name: float(x) for lab, x in zip(head.labels, p, strict=True)},
        label_zh=label.zh,
        emoji=label.emoji,
        calibrated="calibration" in head.meta,
    )


def head_probabilities(head: Head, embeddings: np.ndarray) -> np.ndarray:
    """A classifier head's probabilities, through its calibration when it has one (`train-head
    --calibrate`, fitted on its cross-validated predictions)."""
    p = head.probabilities(embeddings)
    if "calibration" not in head.meta:
        return p
    from emoserve.inference.confidence import calibration_from_dict

    return calibration_from_dict(head.meta["calibration"], f"{head.path or head.name} (calibration)").apply(p)


def pooled_embedding(result: Result) -> np.ndarray:
    """The utterance embedding of a result asked for with `embedding=True`: as it is for "utterance", the
    mean over the frames for "frame" (the model's own pooling: the mean of an item's real frames)."""
    if result.embedding is None:
        raise ValueError("a head needs the result's embedding: recognise with embedding=True")
    emb = result.embedding
    return emb if emb.ndim == 1 else emb.mean(axis=0)


def with_head(result: Result, head: Head, keep_embedding: bool = True) -> Result:
    """`result` with `head`'s result on its embedding (and without the embedding unless kept)."""
    found = head_result(head, pooled_embedding(result))
    return dataclasses.replace(result, head=found, embedding=result.embedding if keep_embedding else None)


def load_heads(specs: dict[str, str], info: ModelInfo) -> dict[str, Head]:
    """Heads by name from `specs` (name -> directory), each checked against the model: HeadError (one
    sentence naming the head) for a head that is damaged or made for another model."""
    heads = {}
    for name, path in specs.items():
        head = load_head(path, name)
        head.check_model(info)
        heads[name] = head
    return heads
