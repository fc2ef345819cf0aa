"""`emoserve jobs` against a live server (uvicorn in a thread, the tiny model): submit a folder and wait
(its results are the jobs' results), list, status, result, cancel, delete, and refusals as exit 2 with
the server's message."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from emoserve.cli import main
from tests.support.jobs import long_recording
from tests.support.server import LIVE, Live, live_server


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    settings = dataclasses.replace(LIVE, jobs_poll_s=0.05, allow_private_callbacks=True)
    with live_server(settings, tmp_path_factory.mktemp("jobs-cli-home")) as server:
        yield server


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[dict], str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, [json.loads(line) for line in out.splitlines() if line], err


def test_submit_a_folder_and_wait_then_every_action(
    live: Live, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = str(live.client.base_url)
    folder = tmp_path / "calls"
    folder.mkdir()
    for n in range(2):
        long_recording(folder / f"call{n}.wav", 8.0, seed=n)
    submit = ("jobs", "submit", str(folder), "--url", url, "--idempotency-key", "k")
    code, lines, _ = run(capsys, *submit, "--wait")
    assert code == 0
    jobs, results = lines[:2], lines[2:]
    assert [job["file"] for job in jobs] == ["call0.wav", "call1.wav"]
    assert [r["file"] for r in results] == ["call0.wav", "call1.wav"] and results[0]["segments"]
    for job, result in zip(jobs, results, strict=True):  # what --wait printed is the job's result
        assert live.client.get(f"/v1/jobs/{job['id']}/result").json() == result

    code, again, _ = run(capsys, *submit)
    assert code == 0 and [j["id"] for j in again] == [j["id"] for j in jobs]  # the keys made no new jobs

    hook = ("--callback", "http://127.0.0.1:9/hook", "--callback-progress")
    code, [asked], _ = run(capsys, "jobs", "submit", str(folder / "call0.wav"), "--url", url, *hook)
    assert code == 0 and asked["callback"] is True and asked["callback_progress"] is True

    code, [page], _ = run(capsys, "jobs", "list", "--status", "succeeded", "--url", url)
    assert {j["id"] for j in jobs} <= {j["id"] for j in page["jobs"]}
    code, [status], _ = run(capsys, "jobs", "status", jobs[0]["id"], "--url", url)
    assert status["status"] == "succeeded" and status["progress"]["percent"] == 100.0
    code, [result], _ = run(capsys, "jobs", "result", jobs[0]["id"], "--url", url)
    assert result == results[0]

    code, _, err = run(capsys, "jobs", "cancel", jobs[0]["id"], "--url", url)
    assert code == 2 and "has ended" in err  # job_finished, the server's message
    code, lines, _ = run(capsys, "jobs", "delete", jobs[0]["id"], "--url", url)
    assert code == 0 and lines == []
    code, _, err = run(capsys, "jobs", "status", jobs[0]["id"], "--url", url)
    assert code == 2 and "no job" in err
