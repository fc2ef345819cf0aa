"""The status banner (webui/status.py)."""

from __future__ import annotations

import pytest

from emoserve.serving.phase import Phase
from emoserve.webui import status
from tests.support.webui import (
    make_service,
)

# Gradio's queue statistics (gradio/queueing.py) use pandas options and keywords that pandas 3
# deprecated; the warnings come from Gradio's server thread and are not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning")


def test_banner_follows_the_phase() -> None:
    def banner(phase: Phase, random_weights: bool | None, reason: str | None = None) -> str:
        service = make_service(None, None, phase=phase, reason=reason, random_weights=random_weights)
        return status.banner_html(service)

    assert 'data-state="loading"' in banner("loading", None) and "RANDOM" not in banner("loading", None)
    assert "model files damaged" in banner("loading", None, "model files damaged; converting it again")
    assert "Warming up" in banner("warming", None)
    assert "emotion2vec-tiny" in banner("ready", False) and "RANDOM" not in banner("ready", False)
    assert "RANDOM WEIGHTS" in banner("ready", True)
    assert 'data-state="failed"' in banner("failed", False, "no such model")
    assert "no such model" in banner("failed", False, "no such model")
    assert 'data-state="draining"' in banner("draining", False)
    assert "&lt;b&gt;" in banner("failed", False, "<b>")  # reasons are escaped
