"""The heads a server serves beside the nine emotions (`--head NAME=DIR`, EMOSERVE_HEADS): loaded and
checked against the model when it loads (a head made for another model fails start-up in one sentence),
chosen by name per request (`?head=NAME`: an unknown name is 422), run in numpy on the pooled embedding
after the model call, counted by head and label."""

from __future__ import annotations

from typing import TYPE_CHECKING

from emoserve.errors import ApiError

if TYPE_CHECKING:
    from emoserve.inference.recognizer import Recognizer
    from emoserve.inference.results import Result
    from emoserve.model.head import Head
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
    if metrics is not None and headed.head is not None:
        metrics.head_results_total.labels(head=head.name, label=headed.head.label).inc()
    return headed
