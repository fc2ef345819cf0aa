"""The heads a server serves beside the nine emotions (`--head NAME=DIR`, EMOSERVE_HEADS): loaded and
checked against the model when it loads (a head made for another model fails start-up in one sentence),
chosen by name per request (`?head=NAME`: an unknown name is 422), run in numpy on the pooled embedding
after the model call, counted by head and label."""

from __future__ import annotations

from typing import TYPE_CHECKING

from emoserve.errors import ApiError

if TYPE_CHECKING:
    from collections.abc import Mapping

    from emoserve.inference.confidence import Readout
    from emoserve.inference.recognizer import Recognizer
    from emoserve.inference.results import Result
    from emoserve.model.head import Head
    from emoserve.model.labels import Label
    from emoserve.serving.metrics import Metrics
    from emoserve.serving.settings import Settings


def served_heads(settings: Settings, recognizer: Recognizer) -> dict[str, Head]:
    if not settings.heads:
        return {}
    from emoserve.inference.heads import load_heads

    return load_heads(dict(settings.heads), recognizer.info)


def pick_head(heads: dict[str, Head], name: str | None) -> Head | None:
    """The head called `name` (None: none asked for); ApiError 422 naming the served ones."""
    if name is None or name == "":
        return None
    if name not in heads:
        served = ", ".join(sorted(heads)) or "none (start the server with --head NAME=DIR)"
        raise ApiError("invalid_parameter", f"head is {name!r}; this server's heads: {served}")
    return heads[name]


def apply_head(result: Result, head: Head, keep_embedding: bool, metrics: Metrics | None) -> Result:
    """`result` (recognised with its embedding) with the head's result; the embedding kept only if asked."""
    from emoserve.inference.heads import with_head

    headed = with_head(result, head, keep_embedding=keep_embedding)
    if metrics is not None and headed.head is not None:  # a regression head's results: label "values"
        metrics.head_results_total.labels(head=head.name, label=headed.head.label or "values").inc()
    return headed


def read_out_counted(
    result: Result,
    chosen: Readout | None,
    labels: Mapping[str, Label],
    head: Head | None,
    default_threshold: float | None,
    metrics: Metrics | None,
) -> Result:
    """`result` read out as the request asks (inference/confidence.py), the thresholds in their order:
    the request's, else (for a head) the head's own, else the min_confidence setting; each `uncertain`
    counted, for the nine emotions (`output="emotion"`) and per head."""
    import dataclasses

    from emoserve.inference.confidence import UNCERTAIN, Readout, first_set, read_out

    asked = chosen or Readout()
    nine = dataclasses.replace(asked, min_confidence=first_set(asked.min_confidence, default_threshold))
    own = head.min_confidence if head is not None else None
    out = read_out(result, nine, labels, first_set(asked.min_confidence, own, default_threshold))
    if metrics is not None:
        if out.emotion == UNCERTAIN:
            metrics.uncertain_results_total.labels(output="emotion").inc()
        if out.head is not None and out.head.label == UNCERTAIN:
            metrics.uncertain_results_total.labels(output=out.head.name).inc()
    return out
