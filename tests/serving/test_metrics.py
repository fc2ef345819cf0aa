"""Metrics: the exposition carries every promised name with its unit; the alert rules pass promtool."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
from prometheus_client.parser import text_string_to_metric_families

from emoserve.serving.metrics import Metrics
from emoserve.system import resident_memory_bytes
from tests.support.paths import ROOT

RULES_DIR = ROOT / "deploy" / "prometheus"
PROMISED = (  # the list (section 5)
    "emoserve_model_load_seconds",
    "emoserve_warmup_seconds",
    "emoserve_start_to_ready_seconds",
    "emoserve_ready",
    "emoserve_request_duration_seconds",
    "emoserve_batch_size",
    "emoserve_queue_depth",
    "emoserve_in_flight_requests",
    "emoserve_requests",  # a counter: exposed as emoserve_requests_total
    "emoserve_audio_seconds",
    "emoserve_errors",
    "emoserve_process_resident_memory_bytes",
    "process_resident_memory_bytes",
)


def families(metrics: Metrics) -> dict[str, object]:
    text, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    return {f.name: f for f in text_string_to_metric_families(text.decode())}


def samples(metrics: Metrics, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    text = metrics.render()[0].decode()
    return {
        tuple(sorted(s.labels.items())): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == name
    }


def test_exposition_has_every_promised_metric() -> None:
    metrics = Metrics(max_queue=64)
    metrics.observe_request("/v1/recognize", decode_s=0.01, queue_s=0.002, inference_s=0.1, total_s=0.12)
    metrics.count_response("/v1/recognize", 200)
    metrics.count_error("queue_full")
    names = families(metrics)
    missing = [name for name in PROMISED if name not in names]
    assert not missing
    assert samples(metrics, "emoserve_queue_capacity") == {(): 64}


def test_engine_observer_hooks_feed_the_batch_metrics() -> None:
    metrics = Metrics(max_queue=8)
    metrics.batch_done(size=3, audio_seconds=6.0, padded_seconds=6.3, seconds=0.2)
    metrics.queue_changed(5)
    assert samples(metrics, "emoserve_batch_size_count") == {(): 1}
    assert samples(metrics, "emoserve_batch_size_sum") == {(): 3}
    assert samples(metrics, "emoserve_audio_seconds_total") == {(): 6.0}
    assert samples(metrics, "emoserve_padded_audio_seconds_total") == {(): 6.3}
    assert samples(metrics, "emoserve_queue_depth") == {(): 5}


def test_request_stages_are_labelled_by_stage_and_route() -> None:
    metrics = Metrics(max_queue=8)
    metrics.observe_request("ui", decode_s=0.5, queue_s=0.25, inference_s=1.0, total_s=2.0)
    sums = samples(metrics, "emoserve_request_duration_seconds_sum")
    assert sums == {
        (("route", "ui"), ("stage", stage)): seconds
        for stage, seconds in {"decode": 0.5, "queue": 0.25, "inference": 1.0, "total": 2.0}.items()
    }


def test_state_sets_the_ready_gauge() -> None:
    metrics = Metrics(max_queue=8)
    metrics.set_state("warming")
    assert samples(metrics, "emoserve_ready") == {(): 0}
    metrics.set_state("ready")
    assert samples(metrics, "emoserve_ready") == {(): 1}
    assert samples(metrics, "emoserve_state")[(("emoserve_state", "ready"),)] == 1


def test_resident_memory_is_reported() -> None:
    rss = resident_memory_bytes()
    assert rss is not None and rss > 1_000_000


def test_gpu_memory_gauges_only_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    torch = pytest.importorskip("torch")
    metrics = Metrics(max_queue=8)
    metrics.watch_device("cpu")
    assert "emoserve_gpu_memory_allocated_bytes" not in families(metrics)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 123)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 456)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 789)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1_000, 80_000))
    metrics.watch_device("cuda:0")
    assert samples(metrics, "emoserve_gpu_memory_allocated_bytes") == {(): 123}
    assert samples(metrics, "emoserve_gpu_max_memory_allocated_bytes") == {(): 456}
    assert samples(metrics, "emoserve_gpu_memory_reserved_bytes") == {(): 789}
    assert samples(metrics, "emoserve_gpu_device_free_bytes") == {(): 1_000}
    assert samples(metrics, "emoserve_gpu_device_total_bytes") == {(): 80_000}


PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian package `prometheus`)"
)


@needs_promtool
def test_alert_rules_pass_promtool_check() -> None:
    run = subprocess.run(
        [str(PROMTOOL), "check", "rules", "alerts.yml"], cwd=RULES_DIR, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stdout + run.stderr


@needs_promtool
def test_alert_rules_pass_their_promtool_unit_tests() -> None:
    run = subprocess.run(
        [str(PROMTOOL), "test", "rules", "alerts_test.yml"], cwd=RULES_DIR, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_alert_rules_use_only_exposed_metrics() -> None:
    """Every emoserve_* name the rules query exists in the exposition (a renamed metric would leave an
    alert that can never fire)."""
    metrics = Metrics(max_queue=8)
    metrics.count_error("queue_full")
    metrics.observe_request("/v1/recognize", decode_s=0, queue_s=0, inference_s=0, total_s=0)
    exposed = {s.name for f in families(metrics).values() for s in f.samples}  # type: ignore[attr-defined]
    queried = set(re.findall(r"\b(emoserve_[a-z_]+)", (RULES_DIR / "alerts.yml").read_text()))
    assert queried <= exposed, queried - exposed
