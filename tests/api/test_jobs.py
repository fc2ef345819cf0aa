"""/v1/jobs against uvicorn in a thread with the real engine on the tiny model and the SQLite store: the
result equal to /v1/timeline's for the same file and options, 409 until done and partial results,
NDJSON that follows a running job and resumes after N segments, cancel, delete, one job per
Idempotency-Key, every limit with its code, and signed webhooks to a receiver on loopback."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from emoserve.serving.jobs.worker import Jobs
from tests.support.jobs import Receiver, long_recording, wait_job
from tests.support.server import (
    LIVE,
    Live,
    assert_error,
    assert_same_segments,
    gated_model,
    live_server,
    wait_for,
)

JOBS_LIVE = dataclasses.replace(
    LIVE,
    max_timeline_s=600.0,
    max_timeline_upload_mb=40.0,
    jobs_max_upload_mb=40.0,
    jobs_max_duration_s=600.0,
    jobs_poll_s=0.05,
    allow_private_callbacks=True,  # the tests' webhook receiver listens on loopback
)
SEGMENT_KEYS = ("start_s", "end_s", "emotion", "speaker", "split", "label_zh", "emoji")


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    with live_server(JOBS_LIVE, tmp_path_factory.mktemp("jobs-home")) as server:
        yield server


@pytest.fixture(scope="module")
def recording(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return long_recording(tmp_path_factory.mktemp("recording") / "call.wav", 40.0)


def jobs_of(live: Live) -> Jobs:
    jobs = live.server.config.app.state.jobs
    assert isinstance(jobs, Jobs)
    return jobs


def upload(path: Path) -> dict[str, Any]:
    return {"file": (path.name, path.read_bytes(), "audio/wav")}


def submit(client: httpx.Client, path: Path, **kwargs: Any) -> httpx.Response:
    return client.post("/v1/jobs", files=upload(path), **kwargs)


def assert_same_timeline(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert set(got) == set(want)
    for key in ("file", "duration_s", "speech_s", "model", "random_weights", "channels", "vad"):
        assert got[key] == want[key], key
    assert_same_segments(got["segments"], want["segments"], SEGMENT_KEYS)
    assert got["summary"]["dominant"] == want["summary"]["dominant"]
    assert got["summary"]["segments"] == want["summary"]["segments"]


def ndjson(client: httpx.Client, url: str, **params: Any) -> list[dict[str, Any]]:
    headers = {"Accept": "application/x-ndjson"}
    with client.stream("GET", url, headers=headers, params=params) as response:
        assert response.status_code == 200
        return [json.loads(line) for line in response.iter_lines() if line]


def audio_files(live: Live) -> list[Path]:
    return sorted(jobs_of(live).audio_dir.iterdir())


def test_a_job_gives_the_very_timeline_of_v1_timeline(live: Live, recording: Path) -> None:
    # every option /v1/timeline takes, the readout's too (a job that dropped them would differ)
    params = {
        "min_silence_ms": 250,
        "max_segment_s": 4,
        "labels": "angry,happy,neutral,sad",
        "min_confidence": 0.3,
    }
    timeline = live.client.post("/v1/timeline", files=upload(recording), params=params)
    assert set(timeline.json()["segments"][0]["scores"]) == {"angry", "happy", "neutral", "sad"}
    assert timeline.status_code == 200, timeline.text
    response = submit(live.client, recording, params=params)
    assert response.status_code == 202, response.text
    job = response.json()
    assert response.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["status"] in ("queued", "running") and job["file"] == "call.wav"
    done = wait_job(live.client, job["id"])
    assert done["status"] == "succeeded" and done["attempts"] == 1 and done["error"] is None
    assert done["progress"]["percent"] == 100.0 and done["stage"] == "done"
    assert done["progress"]["segments_done"] == done["progress"]["segments_total"] > 8
    want = timeline.json()  # the model, its runtime and precision: what every segment was scored by
    assert done["model"] == f"{want['model']} ({want['backend']} {want['dtype']})"
    assert done["expires_at"] > done["finished_at"]
    result = live.client.get(f"/v1/jobs/{job['id']}/result")
    assert result.status_code == 200
    assert_same_timeline(result.json(), timeline.json())
    assert audio_files(live) == []  # the audio is deleted once the job ends
    counted = live.service.metrics.registry.get_sample_value
    wait_for(lambda: (counted("emoserve_jobs", {"status": "succeeded"}) or 0) >= 1, 10, "the gauge")


def test_the_result_is_409_until_done_partial_on_request_and_ndjson_follows(
    live: Live, recording: Path
) -> None:
    with gated_model(live.service) as gate:
        job = submit(live.client, recording).json()
        wait_job(live.client, job["id"], until=("running",))
        early = assert_error(live.client.get(f"/v1/jobs/{job['id']}/result"), 409, "job_not_done")
        assert "partial=true" in early["error"]["message"]
        refused = live.client.get(f"/v1/jobs/{job['id']}/result")
        assert int(refused.headers["retry-after"]) >= 1
        partial = live.client.get(f"/v1/jobs/{job['id']}/result", params={"partial": "true"}).json()
        assert partial["complete"] is False and partial["file"] == "call.wav"
        followed: list[list[dict[str, Any]]] = []
        follower = threading.Thread(
            target=lambda: followed.append(ndjson(live.client, f"/v1/jobs/{job['id']}/result"))
        )
        follower.start()  # following a running job: its lines come as its segments are scored
        gate.set()
        follower.join(120)
    done = wait_job(live.client, job["id"])
    result = live.client.get(f"/v1/jobs/{job['id']}/result").json()
    [lines] = followed
    assert [line["type"] for line in lines] == ["segment"] * len(result["segments"]) + ["summary"]
    assert_same_segments(lines[:-1], result["segments"], SEGMENT_KEYS)
    assert lines[-1]["summary"] == result["summary"] and "segments" not in lines[-1]
    assert done["status"] == "succeeded"
    resumed = ndjson(live.client, f"/v1/jobs/{job['id']}/result", after=3)
    assert resumed == lines[3:]  # a client that had 3 segment lines goes on from the 4th
    # partial results are a prefix of the final timeline, never another one
    assert partial["segments"] == result["segments"][: len(partial["segments"])]


def test_ndjson_equals_the_timelines_lines(live: Live, recording: Path) -> None:
    headers = {"Accept": "application/x-ndjson"}
    with live.client.stream("POST", "/v1/timeline", files=upload(recording), headers=headers) as response:
        want = [json.loads(line) for line in response.iter_lines() if line]
    job = submit(live.client, recording).json()
    wait_job(live.client, job["id"])
    got = ndjson(live.client, f"/v1/jobs/{job['id']}/result")
    assert [line["type"] for line in got] == [line["type"] for line in want]
    assert_same_segments(got[:-1], want[:-1], (*SEGMENT_KEYS, "file", "random_weights", "type"))
    assert {k: v for k, v in got[-1].items() if k != "summary"} == {
        k: v for k, v in want[-1].items() if k != "summary"
    }


def test_cancel_and_delete(live: Live, recording: Path) -> None:
    with gated_model(live.service) as gate:
        running = submit(live.client, recording).json()
        wait_job(live.client, running["id"], until=("running",))
        queued = submit(live.client, recording).json()
        cancelled = live.client.post(f"/v1/jobs/{queued['id']}/cancel").json()
        assert cancelled["status"] == "cancelled"  # a queued job: at once
        asked = live.client.post(f"/v1/jobs/{running['id']}/cancel").json()
        assert asked["status"] == "running"
        gate.set()
        done = wait_job(live.client, running["id"])  # a running one: at its next segment
    assert done["status"] == "cancelled"
    assert done["progress"]["segments_done"] < (done["progress"]["segments_total"] or 99)
    body = assert_error(live.client.get(f"/v1/jobs/{running['id']}/result"), 409, "job_not_done")
    assert "cancelled" in body["error"]["message"]
    assert audio_files(live) == []
    assert live.client.delete(f"/v1/jobs/{running['id']}").status_code == 204
    assert_error(live.client.get(f"/v1/jobs/{running['id']}"), 404, "job_not_found")
    assert_error(live.client.delete(f"/v1/jobs/{running['id']}"), 404, "job_not_found")
    assert jobs_of(live).store.scored(running["id"]) == []
    finished = submit(live.client, recording).json()
    wait_job(live.client, finished["id"])
    assert_error(live.client.post(f"/v1/jobs/{finished['id']}/cancel"), 409, "job_finished")


def test_one_idempotency_key_one_job(live: Live, recording: Path, tmp_path: Path) -> None:
    key = {"Idempotency-Key": "call-42"}

    def post(_: int) -> httpx.Response:
        return submit(live.client, recording, headers=key)

    with ThreadPoolExecutor(10) as pool:
        responses = list(pool.map(post, range(10)))
    assert {r.status_code for r in responses} == {202}
    assert len({r.json()["id"] for r in responses}) == 1
    assert sum(r.headers.get("idempotent-replayed") == "true" for r in responses) == 9
    other = long_recording(tmp_path / "other.wav", 10.0, seed=1)
    assert_error(submit(live.client, other, headers=key), 422, "idempotency_key_reused")
    wait_job(live.client, responses[0].json()["id"])
    assert len(list(jobs_of(live).audio_dir.iterdir())) == 0  # the duplicates' uploads are gone


def test_jobs_are_listed_with_filters_and_pages(live: Live, recording: Path) -> None:
    ids = [
        submit(live.client, recording, params={"metadata": '{"batch": "b1"}'}).json()["id"] for _ in range(3)
    ]
    for job_id in ids:
        wait_job(live.client, job_id)
    first = live.client.get("/v1/jobs", params={"status": "succeeded", "limit": 2}).json()
    assert [job["id"] for job in first["jobs"]] == ids[::-1][:2] and first["next"] == ids[1]
    rest = live.client.get("/v1/jobs", params={"status": "succeeded", "limit": 2, "after": first["next"]})
    assert rest.json()["jobs"][0]["id"] == ids[0]
    assert first["jobs"][0]["metadata"] == {"batch": "b1"}
    assert all(job["status"] == "succeeded" for job in rest.json()["jobs"])
    assert_error(live.client.get("/v1/jobs", params={"status": "lost"}), 422, "invalid_parameter")


def verify(secret: str, header: str, body: bytes) -> bool:
    """The receiver's check, as docs/jobs.md shows it."""
    parts = dict(part.split("=", 1) for part in header.split(","))
    expected = hmac.new(secret.encode(), f"{parts['t']}.".encode() + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, parts["v1"]) and abs(time.time() - int(parts["t"])) < 300


def test_a_signed_webhook_is_retried_after_a_5xx_and_stops_at_a_4xx(live: Live, recording: Path) -> None:
    flaky, gone = Receiver([500, 200]), Receiver([410])
    try:
        form = {"callback_url": flaky.url, "callback_secret": "s3cret"}
        job = submit(live.client, recording, data=form).json()
        wait_job(live.client, job["id"])
        deadline = time.monotonic() + 30
        while len(flaky.got) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(flaky.got) == 2, flaky.got
        (_, first), (headers, body) = flaky.got
        event = json.loads(body)
        assert event["event"] == "job.succeeded" and event["job_id"] == job["id"]
        assert event["status"] == "succeeded" and json.loads(first)["event_id"] == event["event_id"]
        assert verify("s3cret", headers["Emoserve-Signature"], body)
        assert not verify("other", headers["Emoserve-Signature"], body)
        assert not verify("s3cret", headers["Emoserve-Signature"], body.replace(b"succeeded", b"failed"))
        assert (
            headers["Emoserve-Event-Id"] == event["event_id"] and headers["Emoserve-Webhook-Attempt"] == "2"
        )

        job = submit(live.client, recording, params={"callback_url": gone.url}).json()
        wait_job(live.client, job["id"])
        deadline = time.monotonic() + 10
        while not jobs_of(live).store.webhooks(job["id"])[0]["delivered_at"] and time.monotonic() < deadline:
            time.sleep(0.05)
        [row] = jobs_of(live).store.webhooks(job["id"])
        assert row["outcome"] == "rejected_410" and len(gone.got) == 1
        counted = live.service.metrics.registry.get_sample_value
        for result in ("retry", "delivered", "rejected"):
            assert counted("emoserve_webhook_deliveries_total", {"result": result}), result
        assert "Emoserve-Signature" not in gone.got[0][0]  # no secret, no signature
    finally:
        flaky.close()
        gone.close()


def test_progress_webhooks_come_when_asked_signed_each_tenth(live: Live, recording: Path) -> None:
    """callback_progress=true: job.progress events through the same outbox, one each tenth of the job's
    segments, signed like the end's, before job.succeeded; without a callback_url it is refused."""
    receiver = Receiver([204])
    try:
        form = {"callback_url": receiver.url, "callback_secret": "s3cret", "callback_progress": "true"}
        job = submit(live.client, recording, data=form).json()
        assert job["callback_progress"] is True
        done = wait_job(live.client, job["id"])
        wait_for(lambda: any(b"job.succeeded" in body for _, body in receiver.got), 30, "job.succeeded")
    finally:
        receiver.close()
    events = [json.loads(body) for _, body in receiver.got]
    assert all(verify("s3cret", headers["Emoserve-Signature"], body) for headers, body in receiver.got)
    total = done["progress"]["segments_total"]
    # the first segment at or past each tenth, before the last (whose event is job.succeeded)
    tenths = sorted({n * 10 // total for n in range(1, total)} - {0})
    assert total >= 8 and len(tenths) >= 7
    assert [e["event"] for e in events] == ["job.progress"] * len(tenths) + ["job.succeeded"]
    progress = [e["progress"] for e in events[:-1]]
    assert [p["segments_done"] * 10 // total for p in progress] == tenths  # never two in one tenth
    assert all(
        p["segments_total"] == total and e["status"] == "running"
        for p, e in zip(progress, events[:-1], strict=True)
    )
    assert [p["percent"] for p in progress] == [round(100 * p["segments_done"] / total, 1) for p in progress]
    assert len({e["event_id"] for e in events}) == len(events)
    assert {e["job_id"] for e in events} == {job["id"]}
    refused = submit(live.client, recording, params={"callback_progress": "true"})
    assert "callback_url" in assert_error(refused, 422, "invalid_parameter")["error"]["message"]
    bad = submit(live.client, recording, data={"callback_url": receiver.url, "callback_progress": "often"})
    assert assert_error(bad, 422, "invalid_parameter")


@pytest.fixture(scope="module")
def strict(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """A server with small limits and no worker (its jobs stay queued)."""
    settings = dataclasses.replace(
        LIVE,
        jobs_workers=0,
        jobs_max_queued=1,
        jobs_max_disk_mb=0.5,
        jobs_max_upload_mb=1.0,
        jobs_max_duration_s=12.0,
    )
    with live_server(settings, tmp_path_factory.mktemp("strict-home")) as server:
        yield server


def test_every_limit_is_refused_with_its_code_and_leaves_nothing(strict: Live, tmp_path: Path) -> None:
    client = strict.client
    too_long = long_recording(tmp_path / "long.wav", 15.0)
    body = assert_error(submit(client, too_long), 413, "audio_too_long")
    assert "jobs_max_duration_s" in body["error"]["message"]
    assert_error(client.post("/v1/jobs", content=b"\0" * 1_100_000), 413, "upload_too_large")
    assert_error(client.post("/v1/jobs", content=b"not audio" * 100), 415, "unsupported_audio")
    ten = long_recording(tmp_path / "ten.wav", 10.0)  # 0.32 MB
    refused = submit(client, ten, data={"callback_url": "http://127.0.0.1:9/hook"})
    assert "allow_private_callbacks" in assert_error(refused, 422, "invalid_parameter")["error"]["message"]
    assert_error(submit(client, ten, data={"metadata": "[1]"}), 422, "invalid_parameter")
    assert submit(client, ten).status_code == 202
    full_disk = submit(client, ten)
    assert_error(full_disk, 507, "jobs_disk_full")
    assert int(full_disk.headers["retry-after"]) >= 1
    small = long_recording(tmp_path / "small.wav", 2.0)
    full_queue = submit(client, small)
    assert_error(full_queue, 429, "too_many_jobs")
    assert int(full_queue.headers["retry-after"]) >= 1
    assert len(list(jobs_of(strict).audio_dir.iterdir())) == 1  # the accepted job's audio only


def scraped(live: Live) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """/metrics as the server answers it: (sample name, its labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    text = live.client.get("/metrics").text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_show_the_oldest_queued_age_the_queue_wait_and_the_run_time(
    live: Live, recording: Path
) -> None:
    """A job held behind a running one: the oldest-queued gauge grows while it waits and is 0 once none
    waits; each job's wait and run time land in the histograms (the held one waited at least as long)."""
    wait, run = "emoserve_job_queue_wait_seconds", "emoserve_job_run_seconds"
    succeeded = (("status", "succeeded"),)
    before = scraped(live)
    with gated_model(live.service) as gate:
        running = submit(live.client, recording).json()
        wait_job(live.client, running["id"], until=("running",))
        held = submit(live.client, recording).json()
        held_at = time.monotonic()
        wait_for(lambda: scraped(live)[("emoserve_jobs_oldest_queued_age_seconds", ())] > 1.0, 20, "the age")
        age = scraped(live)[("emoserve_jobs_oldest_queued_age_seconds", ())]
        assert age <= time.monotonic() - held_at + 1.0  # the held job's age, not another's
        gate.set()
        wait_job(live.client, running["id"])
        wait_job(live.client, held["id"])
        held_s = time.monotonic() - held_at
    wait_for(lambda: scraped(live)[("emoserve_jobs_oldest_queued_age_seconds", ())] == 0.0, 20, "no age")
    after = scraped(live)
    assert after[(f"{wait}_count", ())] - before[(f"{wait}_count", ())] == 2
    assert after[(f"{wait}_sum", ())] - before[(f"{wait}_sum", ())] >= age
    assert after[(f"{run}_count", succeeded)] - before.get((f"{run}_count", succeeded), 0.0) == 2
    assert 0 < after[(f"{run}_sum", succeeded)] - before.get((f"{run}_sum", succeeded), 0.0) < 2 * held_s
