"""Scaling out on Ray (the `ray` extra): Ray Serve replicas of the service, and Ray Data bulk scoring, on
one local cluster of two "nodes" (ray.cluster_utils.Cluster) shared by the module, with the tiny model.

Ray writes an auth token under ~/.ray: the cluster runs with a temporary HOME. Deselect with -m "not ray".
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from emoserve.errors import SettingsError
from emoserve.serving.settings import Settings
from tests.support.paths import FIXTURE, ROOT
from tests.support.reference import EMBEDDING_TOL, SCORE_TOL
from tests.support.server import LIVE, assert_error, live_server

MODEL = FIXTURE / "model"
AUDIO = FIXTURE / "audio"
CLIPS = ("zh_3s_16k.wav", "en_1s_16k.wav", "en_3s_44k.mp3", "en_7s_16k.flac")
# The replicas' settings, as `serve run emoserve.ray_serve:build_app key=value ...` passes them
APP_ARGS = {
    "model": str(MODEL),
    "device": "cpu",
    "replicas": "2",
    "num_cpus": "1",
    "verify_model": "false",
    "warmup_batch_sizes": "1,2",
    "max_audio_s": "10",
    "max_upload_mb": "1",
}


def test_nothing_of_ray_is_imported_without_asking() -> None:
    """`import emoserve`, the server and the CLI (its parser too) never import Ray."""
    code = (
        "import sys, emoserve, emoserve.api.app, emoserve.cli\n"
        "emoserve.cli.parser().parse_args(['serve'])\n"
        "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


# ------------------------------------------------------------------------------------ options (no cluster)


@pytest.mark.ray
def test_app_arguments_are_settings_or_ray_options_and_bad_ones_name_their_key() -> None:
    from emoserve.ray_serve import split_args

    settings, options = split_args({"model": "m", "max_queue": "10", "replicas": "3", "num_cpus": "2"})
    assert (settings.model, settings.max_queue, options.replicas, options.num_cpus) == ("m", 10, 3, 2.0)
    with pytest.raises(SettingsError, match=r"^replica: not a setting"):
        split_args({"replica": "2"})
    with pytest.raises(SettingsError, match=r"^max_queue: 'x' is not an integer"):
        split_args({"max_queue": "x"})
    with pytest.raises(SettingsError, match=r"^replicas: 0 is out of range"):
        split_args({"replicas": "0"})
    with pytest.raises(SettingsError, match=r"^max_replicas: 1 must be at least min_replicas"):
        split_args({"min_replicas": "2", "max_replicas": "1"})
    with pytest.raises(SettingsError, match=r"^min_replicas: autoscaling needs max_replicas"):
        split_args({"min_replicas": "2"})
    with pytest.raises(SettingsError, match=r"^ui: 'maybe' is not a boolean"):
        split_args({"ui": "maybe"})
    assert split_args({"ui": False, "verify_model": False})[1].ui is False  # YAML gives booleans


@pytest.mark.ray
def test_replicas_ask_for_a_gpu_share_when_told() -> None:
    """Ray hides the GPUs from an actor that asks for none: without num_gpus a replica on a GPU node serves
    on the CPU (review cuda-2026-12 A5). Fractions share a GPU."""
    from emoserve.ray_serve import RayOptions, deployment_options, split_args

    _, options = split_args({"num_gpus": "0.5", "num_cpus": "2"})
    assert options.num_gpus == 0.5
    actor = deployment_options(Settings(), options)["ray_actor_options"]
    assert actor == {"num_cpus": 2.0, "num_gpus": 0.5}
    assert deployment_options(Settings(), RayOptions())["ray_actor_options"] == {"num_cpus": 1.0}
    with pytest.raises(SettingsError, match=r"^num_gpus: -1.0 is out of range"):
        split_args({"num_gpus": "-1"})
    with pytest.raises(SettingsError, match=r"^num_gpus: 1 GPU per replica, but device is cpu"):
        split_args({"num_gpus": "1", "device": "cpu"})


@pytest.mark.ray
def test_serve_options_are_sized_from_the_service_settings() -> None:
    from emoserve.ray_serve import RayOptions, deployment_options

    settings = Settings(max_queue=20, max_batch_size=4, drain_timeout_s=12.0)
    fixed = deployment_options(settings, RayOptions(replicas=3, num_cpus=2))
    assert fixed["num_replicas"] == 3 and fixed["ray_actor_options"] == {"num_cpus": 2}
    # a replica holds no more than its engine queue and one batch; Serve's router queues max_queue more
    assert (fixed["max_ongoing_requests"], fixed["max_queued_requests"]) == (24, 20)
    assert fixed["graceful_shutdown_timeout_s"] == 12.0
    assert fixed["backpressure_config"].status_code == 503 and fixed["backpressure_config"].retry_after_s >= 1
    scaling = deployment_options(settings, RayOptions(min_replicas=1, max_replicas=4))
    assert "num_replicas" not in scaling
    autoscaling = {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 4}
    assert scaling["autoscaling_config"] == autoscaling


# ------------------------------------------------------------------------------------------- the cluster


@dataclass
class RayCluster:
    address: str
    nodes: int


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayCluster]:
    """Two nodes on this machine (2 + 1 logical CPUs): two replicas of 1 CPU each, one Ray Data actor."""
    pytest.importorskip("ray", reason="the ray extra is not installed (scripts/setup-venv.sh test,ray)")
    import ray
    from ray.cluster_utils import Cluster

    from emoserve.ray_serve import PROXY_CALLBACK

    env = pytest.MonkeyPatch()
    env.setenv("HOME", str(tmp_path_factory.mktemp("ray-home")))  # Ray's auth token, never the user's
    env.setenv("EMOSERVE_HOME", str(tmp_path_factory.mktemp("ray-emoserve-home")))
    env.setenv("EMOSERVE_EXPORT_ONNX", "0")
    env.setenv("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", PROXY_CALLBACK)  # inherited by Ray's processes
    # Serve's proxy sends everything to the replicas on its own node until they are full
    # (max_ongoing_requests); with two "nodes" on one machine the second node's replica would see nothing
    env.setenv("RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING", "0")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        yield RayCluster(cluster.address, nodes=len(ray.nodes()))
    finally:
        ray.shutdown()
        cluster.shutdown()
        env.undo()


@dataclass
class Deployed:
    client: httpx.Client
    url: str


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def deployed(ray_cluster: RayCluster) -> Iterator[Deployed]:
    """The API application (2 replicas) and the web UI application, as `emoserve serve --ray` deploys."""
    from ray import serve

    from emoserve.ray_serve import API_APP, UI_APP, UI_PREFIX, build_app, build_ui_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
    serve.run(build_app(APP_ARGS), name=API_APP, route_prefix="/")
    serve.run(build_ui_app(APP_ARGS), name=UI_APP, route_prefix=UI_PREFIX)
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, timeout=60, limits=httpx.Limits(max_connections=32)) as client:
            yield Deployed(client, url)
    finally:
        serve.shutdown()


def post(client: httpx.Client, clip: str, **params: Any) -> httpx.Response:
    return client.post("/v1/recognize", content=(AUDIO / clip).read_bytes(), params=params)


def metric_by_replica(text: str, name: str, **labels: str) -> dict[str, float]:
    """replica -> value of the samples named `name` with `labels`, from one /metrics answer."""
    from prometheus_client.parser import text_string_to_metric_families

    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                values[sample.labels["replica"]] = sample.value
    return values


def metric_of_each_replica(client: httpx.Client, name: str, **labels: str) -> dict[str, float]:
    """replica -> value of `name`, asking /metrics until both replicas answered (or 60 s passed).

    Every /metrics answer comes from one replica, and Serve's router picks between two at random only
    while neither is busier: asked one at a time, one replica can answer twenty times in a row (CI saw
    it). Bursts of concurrent requests make the router spread them."""
    seen: dict[str, float] = {}
    deadline = time.monotonic() + 60
    with ThreadPoolExecutor(8) as pool:
        while len(seen) < 2 and time.monotonic() < deadline:
            for text in pool.map(lambda _: client.get("/metrics").text, range(8)):
                seen |= metric_by_replica(text, name, **labels)
    return seen


# ----------------------------------------------------------------------------------------------- Serve


@pytest.mark.ray
def test_two_replicas_on_two_nodes_answer_as_the_single_process_server(
    ray_cluster: RayCluster, deployed: Deployed, tmp_path: Path
) -> None:
    assert ray_cluster.nodes == 2
    requests = [(clip, params) for clip in CLIPS for params in ({}, {"granularity": "frame", "embedding": 1})]
    with ThreadPoolExecutor(8) as pool:
        on_ray = list(pool.map(lambda r: post(deployed.client, r[0], **r[1]), requests * 4))
    with live_server(LIVE, tmp_path / "home") as single:
        alone = [post(single.client, clip, **params) for clip, params in requests]
    for got, want in zip(on_ray, alone * 4, strict=True):
        assert got.status_code == want.status_code == 200, got.text
        assert_same_body(got.json(), want.json())
    # each replica answered some of them
    served = metric_of_each_replica(
        deployed.client, "emoserve_requests_total", route="/v1/recognize", status="200"
    )
    assert len(served) == 2 and all(n > 0 for n in served.values()), served


def assert_same_body(got: dict[str, Any], want: dict[str, Any]) -> None:
    """Two answers of /v1/recognize agree: the same fields and labels, numbers within the fixture's
    tolerances (a clip may share a padded batch with others on one server and not on the other)."""
    assert set(got) == set(want)
    for key in ("emotion", "label_zh", "emoji", "granularity", "model", "random_weights", "duration_s"):
        assert got[key] == want[key], key
    np.testing.assert_allclose(list(got["scores"].values()), list(want["scores"].values()), atol=SCORE_TOL)
    assert (got["frames"] is None) == (want["frames"] is None)
    if got["embedding"] is not None:
        np.testing.assert_allclose(got["embedding"], want["embedding"], atol=EMBEDDING_TOL)


@pytest.mark.ray
def test_errors_probes_and_metrics_are_the_single_process_ones(deployed: Deployed) -> None:
    client = deployed.client
    assert_error(client.post("/v1/recognize", content=b"not audio"), 415, "unsupported_audio")
    assert_error(post(client, "zh_3s_16k.wav", granularity="word"), 422, "invalid_parameter")
    too_big = client.post("/v1/recognize", content=b"\0" * 1_000_001)
    assert_error(too_big, 413, "upload_too_large")
    assert client.get("/healthz").json()["status"] == "ok"
    assert client.get("/v1/model").json()["name"] == "model"
    text = client.get("/metrics").text
    # the single-process names, each sample labelled with the replica that rendered it
    for name in ("emoserve_ready", "emoserve_warmup_seconds", "emoserve_queue_capacity"):
        assert len(metric_by_replica(text, name)) == 1, name


@pytest.mark.ray
def test_a_replica_is_routed_to_only_after_its_warm_up(deployed: Deployed) -> None:
    """Serve routes to a replica once its constructor returned, and the constructor waits for warm-up:
    every replica that answers has warmed up, and the very first requests found them ready."""
    for _ in range(20):
        ready = deployed.client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["timings"]["warmup_s"] > 0, ready.text
    seen = metric_of_each_replica(deployed.client, "emoserve_warmup_seconds")
    assert len(seen) == 2 and all(seconds > 0 for seconds in seen.values()), seen


@pytest.mark.ray
def test_replicas_without_a_jobs_database_are_told_they_keep_jobs_per_node() -> None:
    from emoserve.ray_serve import jobs_warning, split_args

    for args in ({"replicas": "2"}, {"max_replicas": "3"}):
        warning = jobs_warning(*split_args(args))
        assert warning is not None and "EMOSERVE_JOBS_DB" in warning and "jobs_dir" in warning
    assert jobs_warning(*split_args({"replicas": "1"})) is None
    assert jobs_warning(*split_args({"replicas": "2", "jobs_db": "postgresql://db/jobs"})) is None


@pytest.mark.ray
@pytest.mark.slow
def test_replicas_on_one_postgres_store_take_each_job_once(deployed: Deployed, tmp_path: Path) -> None:
    """Two replicas of an application whose jobs_db names a real PostgreSQL database (and a jobs_dir
    both see): jobs submitted through Serve's proxy, whichever replica takes each upload, are each
    claimed once by one replica and scored once; every replica finds every job."""
    import psycopg
    from ray import serve

    from emoserve.ray_serve import build_app
    from tests.support.jobs import long_recording, new_database, postgres_server, wait_job

    clips = [long_recording(tmp_path / f"c{n}.wav", 8.0, seed=n) for n in range(6)]
    with postgres_server() as admin:
        url = new_database(admin, "ray_jobs")
        args = {
            **APP_ARGS,
            "num_cpus": "0.5",  # beside the module's two replicas of 1 CPU on the 3 CPUs of the cluster
            "jobs_db": url,
            "jobs_dir": str(tmp_path / "shared-jobs"),
            "jobs_poll_s": "0.05",
        }
        serve.run(build_app(args), name="jobs", route_prefix="/jobs")
        try:
            with httpx.Client(base_url=f"{deployed.url}/jobs", timeout=60) as client:
                with ThreadPoolExecutor(6) as pool:
                    accepted = list(
                        pool.map(lambda c: client.post("/v1/jobs", content=c.read_bytes()), clips)
                    )
                assert [r.status_code for r in accepted] == [202] * len(clips), accepted[0].text
                ids = [r.json()["id"] for r in accepted]
                done = [wait_job(client, job_id, timeout_s=300) for job_id in ids]
                assert [(j["status"], j["attempts"]) for j in done] == [("succeeded", 1)] * len(ids)
                claims = metric_of_each_replica(client, "emoserve_job_queue_wait_seconds_count")
                assert len(claims) == 2 and sum(claims.values()) == len(ids)  # each job claimed once
                with ThreadPoolExecutor(8) as pool:  # both replicas answer for every job
                    seen = list(pool.map(lambda i: client.get(f"/v1/jobs/{i}").status_code, ids * 8))
                assert seen == [200] * len(seen)
            with psycopg.connect(url) as db:
                row = db.execute("SELECT COUNT(*), COUNT(DISTINCT attempt) FROM job_scored").fetchone()
            assert row == (sum(j["progress"]["segments_total"] for j in done), 1)  # each segment once
        finally:
            serve.delete("jobs")


@pytest.mark.ray
def test_a_replica_that_cannot_load_its_model_fails_the_deployment(ray_cluster: RayCluster) -> None:
    from ray import serve

    from emoserve.ray_serve import RECOGNITION, deployment_options, split_args

    settings, options = split_args({**APP_ARGS, "model": "/nonexistent/model", "replicas": "1"})
    app = RECOGNITION.options(**deployment_options(settings, options), max_constructor_retry_count=1)
    with pytest.raises(RuntimeError, match="Deploying application broken failed"):
        serve.run(app.bind(settings), name="broken", route_prefix="/broken")
    try:
        message = serve.status().applications["broken"].deployments[RECOGNITION.name].message
        assert re.search(r"could not start: failed: .*/nonexistent/model", message), message
    finally:
        serve.delete("broken")


@pytest.mark.ray
def test_the_web_ui_runs_as_its_own_deployment_on_the_model_replicas(deployed: Deployed) -> None:
    from ray import serve

    from emoserve.audio.decode import load_audio
    from emoserve.ray_serve import API_APP, RECOGNITION, RemoteService, split_args

    home = deployed.client.get("/", follow_redirects=True)
    assert home.status_code == 200 and home.url.path == "/ui/" and "gradio" in home.text.lower()
    # the UI's service: state from the model deployment, recognitions through its replicas
    remote = RemoteService(split_args(APP_ARGS)[0], serve.get_deployment_handle(RECOGNITION.name, API_APP))
    wait_until(lambda: remote.phase == "ready", 30, "the UI's service to see the model deployment ready")
    assert remote.status.max_audio_s == 10
    assert remote.random_weights is deployed.client.get("/v1/model").json()["random_weights"]
    audio = load_audio(AUDIO / "zh_3s_16k.wav")
    import asyncio

    result, timing = asyncio.run(remote.recognize(audio, "utterance", False))
    body = post(deployed.client, "zh_3s_16k.wav").json()
    assert result.emotion == body["emotion"] and timing.inference_s > 0
    np.testing.assert_allclose(list(result.scores.values()), list(body["scores"].values()), atol=SCORE_TOL)
    remote.close()


@pytest.mark.ray
def test_the_web_ui_builds_a_long_recordings_timeline_on_the_model_replicas(
    deployed: Deployed, tmp_path: Path, tiny_recognizer: Any
) -> None:
    """The Long-recording tab under Ray Serve: the UI replica (no model) cuts the recording into speech
    segments, and the model deployment recognises each one: the library's timeline (the UI replica used
    to say "not ready (state ready)"). The length limit is the model deployment's max_timeline_s, not the
    UI replica's own: a recording longer than the UI's setting passes."""
    from ray import serve

    from emoserve.audio.segments import Recording
    from emoserve.inference.timeline import score_segments
    from emoserve.ray_serve import API_APP, RECOGNITION, RemoteService, split_args
    from emoserve.serving.settings import CPU_MAX_TIMELINE_S
    from emoserve.webui.long_recording import timeline_request, timeline_updates
    from emoserve.webui.saved import UIOutputs
    from tests.support.webui import joined_recording

    recording = joined_recording(tmp_path / "meeting.wav")  # 19 s
    ui_settings = dataclasses.replace(split_args(APP_ARGS)[0], max_timeline_s=5.0, save_outputs=False)
    remote = RemoteService(ui_settings, serve.get_deployment_handle(RECOGNITION.name, API_APP))
    outputs = UIOutputs(None)

    async def build() -> tuple[Any, ...]:
        request = timeline_request(remote, str(recording), "mix", 15.0, 0.5, None)
        return [values async for values in timeline_updates(remote, outputs, request)][-1]

    try:
        wait_until(lambda: remote.phase == "ready", 30, "the UI's service to see the model deployment ready")
        assert remote.status.max_timeline_s == CPU_MAX_TIMELINE_S  # the deployment's (its CPU default)
        progress, card, _, plot, table, files = asyncio.run(build())
    finally:
        remote.close()
        outputs.close()
    expected = list(score_segments(tiny_recognizer, Recording(str(recording))))
    assert len(expected) >= 3 and 'data-state="done"' in progress and "meeting.wav" in card
    assert [(row[0], row[1], row[3]) for row in table.itertuples(index=False)] == [
        (round(s.start_s, 2), round(s.end_s, 2), f"{s.emoji} {s.emotion} · {s.label_zh}") for s in expected
    ]
    got = [row[4] for row in table.itertuples(index=False)]
    assert got == pytest.approx([s.confidence for s in expected], abs=2e-3)
    assert plot.count('class="tl-segment"') == len(expected)
    assert [Path(f).name for f in files] == ["timeline.json", "timeline.csv"]  # saving off: downloads


@pytest.mark.ray
def test_a_live_stream_through_serves_proxy_and_the_ui_replica_gives_the_timelines_segments(
    deployed: Deployed, tmp_path: Path
) -> None:
    """GET /v1/stream through Serve's proxy (a WebSocket through the FastAPI ingress) on a model replica,
    and the Live tab's stream on the UI replica (its cut there, each segment scored on the model
    deployment): both give the segments and scores of /v1/timeline for the same audio."""
    import soundfile as sf
    from ray import serve
    from websockets.sync.client import connect

    from emoserve.inference.protocol import StreamOptions
    from emoserve.ray_serve import API_APP, RECOGNITION, RemoteService, split_args
    from tests.support.webui import joined_recording

    recording = joined_recording(tmp_path / "talk.wav", ("zh_3s_16k.wav", "en_3s_44k.mp3"))
    pcm = sf.read(recording, dtype="int16")[0].tobytes()
    timeline = deployed.client.post("/v1/timeline", content=recording.read_bytes()).json()["segments"]
    assert len(timeline) == 2
    with connect(deployed.url.replace("http://", "ws://") + "/v1/stream", open_timeout=60) as ws:
        messages = [json.loads(ws.recv(60))]
        for at in range(0, len(pcm), 6400):
            ws.send(pcm[at : at + 6400])
        ws.send(json.dumps({"type": "end"}))
        messages += [json.loads(raw) for raw in ws]
        assert ws.close_code == 1000
    assert messages[0]["type"] == "ready" and messages[-1]["type"] == "summary"

    remote = RemoteService(split_args(APP_ARGS)[0], serve.get_deployment_handle(RECOGNITION.name, API_APP))

    async def in_the_ui() -> list[dict[str, Any]]:
        async with remote.live_stream(StreamOptions()) as live:
            # read while feeding: a stream is not fed more while 2 segments wait for their scores
            reading = asyncio.create_task(collect(live.messages_out()))
            for at in range(0, len(pcm), 3200):
                await live.feed(pcm[at : at + 3200])
            await live.end()
            return await asyncio.wait_for(reading, 60)

    async def collect(messages: Any) -> list[dict[str, Any]]:
        return [message async for message in messages]

    try:
        wait_until(lambda: remote.phase == "ready", 30, "the UI's service to see the model deployment ready")
        ui_messages = asyncio.run(in_the_ui())
    finally:
        remote.close()
    for got in (messages, ui_messages):
        segments = [m for m in got if m["type"] == "segment"]
        spans = [(t["start_s"], t["end_s"]) for t in timeline]
        assert [(s["start_s"], s["end_s"]) for s in segments] == spans
        for segment, want in zip(segments, timeline, strict=True):
            np.testing.assert_allclose(
                list(segment["scores"].values()), list(want["scores"].values()), atol=SCORE_TOL
            )
        assert got[-1]["type"] == "summary" and got[-1]["summary"]["segments"] == 2


@pytest.mark.ray
def test_the_ui_gets_a_replica_error_with_its_code_status_and_retry_after(ray_cluster: RayCluster) -> None:
    import ray
    from ray.exceptions import RayTaskError

    from emoserve.errors import QueueFull
    from emoserve.ray_serve import domain_error

    @ray.remote(num_cpus=0)
    def full() -> None:
        raise QueueFull(3.0)

    with pytest.raises(RayTaskError) as raised:
        ray.get(full.remote())
    error = domain_error(raised.value)
    assert (error.code, error.status, error.retry_after_s) == ("queue_full", 503, 3.0)  # type: ignore[attr-defined]
    assert "the request queue is full" in str(error)


@pytest.mark.ray
def test_a_killed_replica_is_replaced_and_no_request_is_lost(deployed: Deployed) -> None:
    """Requests in flight on a replica that dies are sent again by the proxy (emoserve's middleware):
    each request is answered 200, or 503 with Retry-After; never a bare 500, never dropped."""
    import ray
    from ray import serve

    from emoserve.ray_serve import API_APP, RECOGNITION

    statuses: collections.Counter[Any] = collections.Counter()
    bad: list[str] = []
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(base_url=deployed.url, timeout=60) as http:
            while not stop.is_set():
                try:
                    response = post(http, "en_7s_16k.flac")
                except httpx.HTTPError as error:
                    statuses[type(error).__name__] += 1
                    continue
                statuses[response.status_code] += 1
                if response.status_code == 503 and "retry-after" not in response.headers:
                    bad.append(response.text)
                elif response.status_code not in (200, 503):
                    bad.append(f"{response.status_code} {response.text[:200]}")

    def running() -> int:
        deployment = serve.status().applications[API_APP].deployments[RECOGNITION.name]
        return deployment.replica_states.get("RUNNING", 0)

    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True) if "#Recognition#" in a["name"]]
    assert len(replicas) == 2, replicas
    threads = [threading.Thread(target=client) for _ in range(6)]
    for thread in threads:
        thread.start()
    try:
        # requests flowing: every client has had an answer, so six are in flight at any moment, on both
        # replicas (the proxy's log below says that the kill caught some)
        wait_until(lambda: sum(statuses.values()) >= len(threads), 120, "every client's first answer")
        before = sum(statuses.values())
        ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]), no_restart=True)
        killed_at = time.monotonic()
        wait_until(lambda: running() < 2, 30, "Serve to notice the dead replica")
        wait_until(lambda: running() == 2, 120, "a replacement replica")
        replaced_s = time.monotonic() - killed_at
        answered = sum(statuses.values())
        wait_until(lambda: sum(statuses.values()) > answered, 60, "an answer after the replacement")
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    assert not bad, bad
    assert set(statuses) <= {200, 503}, statuses
    assert sum(statuses.values()) > before, "no requests were sent during the kill"
    # the kill did catch requests in flight (else this test would not show the retry): the proxy says so,
    # in a log that Ray copies from the proxy's output on its own time (seconds, on a busy machine)
    with contextlib.suppress(AssertionError):
        wait_until(lambda: proxy_log_count("its replica was lost; trying again") >= 1, 15, "the proxy's log")
    retried = proxy_log_count("its replica was lost; trying again")
    assert retried >= 1, "no request was in flight on the killed replica"
    print(f"replaced in {replaced_s:.1f} s; statuses {dict(statuses)}; {retried} sent again")


def proxy_log_count(text: str) -> int:
    """Lines with `text` in the logs of this Ray session (Ray keeps each process's output there)."""
    import ray

    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    return sum(f.read_text(errors="replace").count(text) for f in logs.rglob("*") if f.is_file())


def wait_until(condition: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.2)


# -------------------------------------------------------------------------------------------- Ray Data


@pytest.mark.ray
def test_ray_data_scoring_writes_what_local_predict_writes(
    ray_cluster: RayCluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`emoserve predict --ray` and `emoserve predict`: the same rows in the same order (a bad file and a
    missing one are one error row each), the same .npy files, the same exit status; jsonl and csv."""
    from emoserve.cli import main

    clips = tmp_path / "clips"
    (clips / "nested").mkdir(parents=True)
    for clip in AUDIO.iterdir():
        (clips / clip.name).write_bytes(clip.read_bytes())
    (clips / "nested" / "zh_3s_16k.ogg").write_bytes((AUDIO / "zh_1s_16k.ogg").read_bytes())  # a stem twice
    (clips / "broken.wav").write_bytes(b"RIFF not really")
    inputs = [str(clips), str(tmp_path / "missing.wav")]
    common = ["predict", *inputs, "--model", str(MODEL), "--device", "cpu", "--batch-size", "2"]

    def run(name: str, *extra: str, fmt: str = "jsonl") -> tuple[int, str, list[Path]]:
        out, emb = tmp_path / f"{name}.{fmt}", tmp_path / f"{name}-emb"
        code = main([*common, "--format", fmt, "-o", str(out), "--embeddings", str(emb), *extra])
        capsys.readouterr()
        return code, out.read_text(), sorted(emb.iterdir())

    address = ["--ray", "--address", ray_cluster.address]
    local_code, local_out, local_npy = run("local")
    ray_code, ray_out, ray_npy = run("ray", *address)
    assert local_code == ray_code == 1  # two files failed
    local_rows = [json.loads(line) for line in local_out.splitlines()]
    ray_rows = [json.loads(line) for line in ray_out.splitlines()]
    assert [r["file"] for r in ray_rows] == [r["file"] for r in local_rows]
    assert len(ray_rows) == len(list(clips.rglob("*.*"))) + 1  # every file found, and the missing one
    errors = [r["file"] for r in ray_rows if r["error"]]
    assert errors == [str(clips / "broken.wav"), str(tmp_path / "missing.wav")]
    for got, want in zip(ray_rows, local_rows, strict=True):
        assert got["error"] == want["error"]
        if got["error"] is None:
            assert (got["emotion"], got["random_weights"]) == (want["emotion"], want["random_weights"])
            got_scores, want_scores = list(got["scores"].values()), list(want["scores"].values())
            np.testing.assert_allclose(got_scores, want_scores, atol=SCORE_TOL)
            assert Path(got["embedding"]).name == Path(want["embedding"]).name
    assert [p.name for p in ray_npy] == [p.name for p in local_npy]
    assert "zh_3s_16k-2.npy" in [p.name for p in ray_npy]  # the repeated stem, named in input order
    for got_npy, want_npy in zip(ray_npy, local_npy, strict=True):
        np.testing.assert_allclose(np.load(got_npy), np.load(want_npy), atol=EMBEDDING_TOL)
    _, local_csv, _ = run("local-csv", fmt="csv")
    _, ray_csv, _ = run("ray-csv", *address, fmt="csv")
    assert [line.split(",")[0] for line in ray_csv.splitlines()] == [
        line.split(",")[0] for line in local_csv.splitlines()
    ]
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind


@pytest.mark.ray
def test_predict_ray_scores_with_several_actors_in_input_order(ray_cluster: RayCluster) -> None:
    """More files than one actor's block, spread over two actors: the output keeps the input order."""
    from emoserve.inference.options import ModelOptions
    from emoserve.ray_batch import score_files

    files = [str(AUDIO / name) for name in ("en_1s_16k.wav", "zh_3s_16k.wav", "zh_1s_16k.ogg")] * 6
    outcomes = list(
        score_files(
            files,
            ModelOptions(str(MODEL), device="cpu", dtype="float32"),
            batch_size=1,
            actors=2,
            cpus_per_actor=0.5,
        )
    )
    assert [o.file for o in outcomes] == files
    durations = [o.result.duration_s for o in outcomes if o.result]
    assert durations == pytest.approx([1.0, 3.0, 1.0] * 6, abs=0.1)


# ------------------------------------------------------------------------------------------- deployment


@pytest.mark.ray
def test_serve_yaml_builds_the_two_applications() -> None:
    import yaml

    from emoserve.ray_serve import API_APP, UI_APP, UI_PREFIX, split_args

    config = yaml.safe_load((ROOT / "deploy" / "ray" / "serve.yaml").read_text())
    apps = {app["name"]: app for app in config["applications"]}
    assert apps[API_APP]["import_path"] == "emoserve.ray_serve:build_app"
    assert apps[API_APP]["route_prefix"] == "/"
    assert apps[UI_APP]["import_path"] == "emoserve.ray_serve:build_ui_app"
    assert apps[UI_APP]["route_prefix"] == UI_PREFIX
    for app in apps.values():
        split_args(app.get("args", {}))  # every argument is a setting or a Ray option
