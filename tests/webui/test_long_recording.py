"""The long-recording tab (webui/long_recording.py): a timeline streamed segment by segment, saved, and its
errors; on a server with jobs, each run a job: named in the page's URL, shown again on a reload, after a
restart of a real `emoserve serve`, cancelled from the page."""

from __future__ import annotations

import asyncio
import csv
import dataclasses
import gc
import json
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import gradio as gr
import httpx
import pytest
import soundfile as sf

from emoserve.audio.segments import Recording
from emoserve.inference.results import TimelineSegment
from emoserve.inference.timeline import score_segments
from emoserve.model.labels import EMOTION_COLOURS
from emoserve.serving.engine import Engine
from emoserve.serving.jobs.worker import Jobs
from emoserve.webui import long_recording
from emoserve.webui.saved import OutputStore, UIOutputs
from tests.support.jobs import long_recording as long_wav
from tests.support.jobs import wait_job
from tests.support.paths import MODEL
from tests.support.server import (
    LIVE,
    Live,
    assert_same_segments,
    first_answer,
    first_answer_with,
    gated_model,
    live_server,
    serve_process,
    wait_for,
)
from tests.support.webui import (
    RECORDING_CLIPS,
    FakeMetrics,
    build_timeline,
    joined_recording,
    make_service,
    open_page,
    run,
    table_rows,
    two_sided_call,
)

# Gradio's queue statistics (gradio/queueing.py) use pandas options and keywords that pandas 3
# deprecated; the warnings come from Gradio's server thread and are not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning")


def test_timeline_streams_segments_then_saves_json_and_csv(
    fast_engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(long_recording, "UPDATE_S", 0.0)  # every segment is sent as it comes
    recording = joined_recording(tmp_path / "meeting.wav")
    service = make_service(fast_engine, tmp_path / "outputs")
    updates = build_timeline(service, str(recording))

    expected = list(score_segments(fast_engine.recognizer, Recording(str(recording))))
    assert len(expected) >= len(RECORDING_CLIPS)
    progress, card, distribution, plot, table, files = updates[-1]
    assert 'data-state="done"' in progress and f"{len(expected)} segments" in progress
    assert [row[:4] for row in table_rows(table)] == [
        [round(s.start_s, 2), round(s.end_s, 2), "", f"{s.emoji} {s.emotion} · {s.label_zh}"]
        for s in expected
    ]
    assert [row[4] for row in table_rows(table)] == pytest.approx([s.confidence for s in expected], abs=2e-3)
    assert plot.count('class="tl-segment"') == len(expected)
    for s in expected:
        assert f'data-emotion="{s.emotion}"' in plot and EMOTION_COLOURS[s.emotion] in plot
    assert distribution["share"].sum() == pytest.approx(1.0, abs=1e-4)
    assert "RANDOM WEIGHTS" in card and "meeting.wav" in card

    # Streamed: the table grew one segment at a time, with the progress in seconds of the total.
    running = [u for u in updates[:-1] if isinstance(u[4], type(table))]
    assert [len(u[4]) for u in running] == list(range(len(expected) + 1))
    assert all('data-state="running"' in u[0] and " s of " in u[0] for u in updates[:-1])

    (folder,) = OutputStore(tmp_path / "outputs").folders()
    assert [Path(f) for f in files] == [folder / "timeline.json", folder / "timeline.csv"]
    saved = json.loads((folder / "timeline.json").read_text(encoding="utf-8"))
    assert saved["file"] == "meeting.wav" and saved["random_weights"] is True and saved["timestamp"]
    assert len(saved["segments"]) == len(expected) and saved["summary"]["segments"] == len(expected)
    assert saved["duration_s"] == pytest.approx(len(sf.read(str(recording))[0]) / 16_000)
    with open(folder / "timeline.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["emotion"] for row in rows] == [s.emotion for s in expected]
    assert {f"score_{label}" for label in expected[0].scores} <= set(rows[0])  # a column per score
    assert f"saved to: {folder}" in card
    metrics = service.metrics
    assert isinstance(metrics, FakeMetrics)
    assert service.timelines_closed == [len(expected)] and service.timelines_running == 0  # type: ignore[attr-defined]
    assert metrics.errors == []


def test_timeline_separate_channels_and_a_segments_file(fast_engine: Engine, tmp_path: Path) -> None:
    service = make_service(fast_engine, None)
    *_, (_, _, _, plot, table, files) = build_timeline(
        service, str(two_sided_call(tmp_path / "call.wav")), "separate"
    )
    assert {row[2] for row in table_rows(table)} == {"ch0", "ch1"}
    assert ">ch0</text>" in plot and ">ch1</text>" in plot  # a row per channel
    assert [Path(f).name for f in files] == ["timeline.json", "timeline.csv"]  # saving off: temporary

    spans = tmp_path / "diarization.rttm"
    spans.write_text(
        "SPEAKER meeting 1 2.0 3.0 <NA> <NA> alice <NA> <NA>\n"
        "SPEAKER meeting 1 7.0 3.0 <NA> <NA> bob <NA> <NA>\n",
        encoding="utf-8",
    )
    *_, (_, card, _, plot, table, _) = build_timeline(
        service, str(joined_recording(tmp_path / "meeting.wav")), "mix", str(spans)
    )
    assert [(row[0], row[1], row[2]) for row in table_rows(table)] == [
        (2.0, 5.0, "alice"),
        (7.0, 10.0, "bob"),
    ]
    assert ">alice</text>" in plot and "alice: mostly" in card


def test_timeline_errors_are_clear_and_counted(fast_engine: Engine, tmp_path: Path) -> None:
    service = make_service(fast_engine, None, max_timeline_s=10.0)
    recording = str(joined_recording(tmp_path / "meeting.wav"))  # 19 s
    garbage = tmp_path / "notes.wav"
    garbage.write_bytes(b"this is not audio" * 10)
    bad_segments = tmp_path / "segments.json"
    bad_segments.write_text('[{"start_s": 1}]', encoding="utf-8")
    good_segments = tmp_path / "ok.json"
    good_segments.write_text('[{"start_s": 1, "end_s": 2}]', encoding="utf-8")
    with pytest.raises(gr.Error, match="Upload a recording"):
        build_timeline(service, None)
    with pytest.raises(gr.Error, match=r"notes\.wav: could not decode"):
        build_timeline(service, str(garbage))
    with pytest.raises(gr.Error, match="the limit is 10 s"):
        build_timeline(service, recording)
    with pytest.raises(gr.Error, match=r"segments\.json: segment 0"):
        build_timeline(service, recording, segments=str(bad_segments))
    with pytest.raises(gr.Error, match="use channels=mix"):
        build_timeline(service, recording, "separate", str(good_segments))
    with pytest.raises(gr.Error, match="threshold"):
        build_timeline(service, recording, threshold=1.0)
    assert service.metrics.errors == [  # type: ignore[union-attr]
        "unsupported_audio",
        "audio_too_long",
        "invalid_parameter",
        "invalid_parameter",
        "invalid_parameter",
    ]
    assert service.timelines_closed == []  # type: ignore[attr-defined]  # nothing started

    service = make_service(None, None, phase="loading")
    with pytest.raises(gr.Error, match="still starting up"):
        build_timeline(service, recording)
    assert service.metrics.errors == ["not_ready"]  # type: ignore[union-attr]


def test_timeline_failing_part_way_keeps_what_was_shown(fast_engine: Engine, tmp_path: Path) -> None:
    service = make_service(fast_engine, None, timeline_fails_after=1)
    updates: list[tuple[Any, ...]] = []
    with pytest.raises(gr.Error, match="busy"):
        build_timeline(service, str(joined_recording(tmp_path / "meeting.wav")), updates=updates)
    assert updates and 'data-state="running"' in updates[-1][0]
    metrics = service.metrics
    assert isinstance(metrics, FakeMetrics)
    assert metrics.errors == ["queue_full"]
    assert service.timelines_closed == [1] and service.timelines_running == 0  # type: ignore[attr-defined]


def test_timeline_save_failure_still_shows_the_result(fast_engine: Engine, tmp_path: Path) -> None:
    service = make_service(fast_engine, tmp_path / "outputs")
    saving = UIOutputs.from_settings(service.settings)
    saving.store().root.rmdir()
    with pytest.warns(UserWarning, match="could not be saved"):
        *_, (progress, card, _, plot, table, files) = build_timeline(
            service, str(joined_recording(tmp_path / "meeting.wav", RECORDING_CLIPS[:1])), saving=saving
        )
    assert files is None and "not saved" in card
    assert len(table) == plot.count('class="tl-segment"') >= 1 and 'data-state="done"' in progress


def test_paced_ticks_through_silence_and_closes_early() -> None:
    """The progress moves while no segment comes; leaving early ends the source (its decoding)."""
    closed = asyncio.Event()

    async def slow() -> AsyncIterator[TimelineSegment]:
        try:
            await asyncio.sleep(0.25)
            yield TimelineSegment(0, 1, None, "sad", "", "", 1.0, {}, False)
            await asyncio.sleep(3600)
            yield TimelineSegment(1, 2, None, "sad", "", "", 1.0, {}, False)
        finally:
            closed.set()

    async def main() -> list[Any]:
        seen: list[Any] = []
        paced = long_recording._paced(slow(), 0.1)
        async for item in paced:
            seen.append(item)
            if len(seen) == 6:
                break
        await paced.aclose()
        return seen

    seen = run(main())
    assert seen[0] is None and seen.count(None) == 5  # ticks before and after the one segment
    assert closed.is_set()


# ------------------------------------------------------------------------------------ runs as jobs

# The UI mounted in the server's thread leaves Gradio's event loops behind (tests/api/test_warmup.py)
GRADIO_LEFTOVERS = pytest.mark.filterwarnings(
    "ignore::ResourceWarning", "ignore::pytest.PytestUnraisableExceptionWarning"
)
JOBS_UI = dataclasses.replace(
    LIVE, ui=True, jobs_poll_s=0.05, max_timeline_s=600.0, jobs_max_duration_s=600.0, jobs_max_upload_mb=40.0
)
SEGMENT_KEYS = ("start_s", "end_s", "emotion", "speaker", "split")


@pytest.fixture(scope="module")
def jobs_ui(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Live, str]]:
    """The server with its web UI and jobs (uvicorn in a thread, the tiny model), and the UI's URL."""
    settings = dataclasses.replace(JOBS_UI, outputs_dir=tmp_path_factory.mktemp("outputs"))
    with live_server(settings, tmp_path_factory.mktemp("home")) as live:
        assert live.service.ui_error is None
        yield live, f"{live.client.base_url}/"
    gc.collect()  # Gradio's leaked loops are reported here, under the last test's filter


def submit_in_the_tab(page: Any, recording: Path) -> str:
    """The recording uploaded in the Long-recording tab and Build clicked: the job's id, once the page's
    URL names it."""
    page.get_by_role("tab", name="Long recording").click()
    page.locator("#tl-audio input[type=file]").set_input_files(str(recording))
    page.locator("#tl-audio audio, #tl-audio [data-testid=waveform-controls]").first.wait_for(
        state="attached"
    )
    page.locator("#tl-start").click()
    page.wait_for_url("**?job=*")
    return job_in_url(page)


def job_in_url(page: Any) -> str:
    (job_id,) = parse_qs(urlparse(page.url).query)["job"]
    return str(job_id)


def shown_segments(page: Any) -> list[str]:
    return [row.inner_text() for row in page.locator("#tl-table [role=row]:has([role=gridcell])").all()]


def assert_shows(page: Any, result: dict[str, Any]) -> None:
    """The page shows the timeline `result`: a bar per segment, and the table's rows (those drawn: the
    table draws the rows in view) its segments in order, with their emotions."""
    rows = shown_segments(page)
    assert 1 <= len(rows) <= len(result["segments"])
    for row, segment in zip(rows, result["segments"], strict=False):
        assert f"{segment['emoji']} {segment['emotion']}" in row
    assert page.locator("#tl-svg rect.tl-segment").count() == len(result["segments"])
    assert f"{len(result['segments'])} segments" in page.locator("#tl-progress-state").inner_text()
    assert ("RANDOM WEIGHTS" in page.locator("#tl-summary").inner_text()) == result["random_weights"]


def saved_timeline(page: Any) -> dict[str, Any]:
    folder = Path(page.locator("#tl-saved").inner_text().removeprefix("saved to: "))
    saved: dict[str, Any] = json.loads((folder / "timeline.json").read_text(encoding="utf-8"))
    return saved


@GRADIO_LEFTOVERS
def test_a_run_is_a_job_named_in_the_url_and_a_reload_shows_it(
    browser: Any, jobs_ui: tuple[Live, str], tmp_path: Path
) -> None:
    """Build in the tab makes a job (GET /v1/jobs lists it), the page's URL names it, the page shows its
    result (the very JSON /v1/timeline gives, saved for the downloads); a reload shows the same job
    again, from the same saved folder (saved once)."""
    live, url = jobs_ui
    recording = joined_recording(tmp_path / "meeting.wav")
    page = open_page(browser, url)
    job_id = submit_in_the_tab(page, recording)
    page.locator('#tl-progress-state[data-state="done"]').wait_for()
    assert page.locator("#tl-job input, #tl-job textarea").first.input_value() == job_id

    (job,) = [j for j in live.client.get("/v1/jobs").json()["jobs"] if j["id"] == job_id]
    assert job["status"] == "succeeded" and job["file"] == "meeting.wav"
    assert job["metadata"] == {"source": "web-ui"}
    result = live.client.get(f"/v1/jobs/{job_id}/result").json()
    assert_shows(page, result)
    assert len(shown_segments(page)) == len(result["segments"])  # a few: all drawn
    saved = saved_timeline(page)
    assert saved.pop("job_id") == job_id and saved.pop("timestamp")
    assert saved == result  # the downloads are the job's result
    with recording.open("rb") as f:
        timeline = live.client.post("/v1/timeline", files={"file": ("meeting.wav", f, "audio/wav")}).json()
    assert_same_segments(result["segments"], timeline["segments"], SEGMENT_KEYS)
    folder = page.locator("#tl-saved").inner_text()
    outputs = OutputStore(live.service.settings.outputs_dir)
    folders = outputs.folders()

    page.reload()
    page.locator('#status-state[data-state="ready"]').wait_for()
    page.locator('#tl-progress-state[data-state="done"]').wait_for()  # the tab is selected, the job shown
    assert job_in_url(page) == job_id
    assert_shows(page, result)
    assert page.locator("#tl-saved").inner_text() == folder and outputs.folders() == folders
    downloads = page.locator("#tl-downloads").inner_text().replace("\n", "")
    assert "timeline.json" in downloads and "timeline.csv" in downloads
    page.close()


@GRADIO_LEFTOVERS
def test_the_gradio_api_submits_a_job_under_the_same_name(jobs_ui: tuple[Live, str], tmp_path: Path) -> None:
    """gradio_client's /timeline takes the same parameters as without jobs, makes a job with them (the
    channels, the VAD's, a segments file), and answers its result's views and, last, the job's id."""
    from gradio_client import Client, handle_file

    live, url = jobs_ui
    client = Client(url, verbose=False, analytics_enabled=False, download_files=False)
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    params = [p["parameter_name"] for p in endpoints["/timeline"]["parameters"]]
    assert params == ["audio", "channels", "max_segment_s", "threshold", "segments"]
    recording = joined_recording(tmp_path / "call.wav", RECORDING_CLIPS[:2])
    progress, summary, *_, job_id = client.predict(
        audio=handle_file(str(recording)),
        channels="separate",
        max_segment_s=15,
        threshold=0.5,
        segments=None,
        api_name="/timeline",
    )
    job = live.client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "succeeded" and job["options"]["channels"] == "separate"
    assert job["options"]["vad"]["max_segment_s"] == 15 and job["options"]["vad"]["threshold"] == 0.5
    result = live.client.get(f"/v1/jobs/{job_id}/result").json()
    assert f"{len(result['segments'])} segments" in progress and "call.wav" in summary
    assert ("RANDOM WEIGHTS" in summary) == result["random_weights"]

    spans = tmp_path / "diarization.rttm"  # the caller's own segments instead of the VAD
    spans.write_text(
        "SPEAKER call 1 2.0 3.0 <NA> <NA> alice <NA> <NA>\nSPEAKER call 1 7.0 2.5 <NA> <NA> bob <NA> <NA>\n",
        encoding="utf-8",
    )
    *_, job_id = client.predict(
        audio=handle_file(str(recording)),
        channels="mix",
        max_segment_s=15,
        threshold=0.5,
        segments=handle_file(str(spans)),
        api_name="/timeline",
    )
    assert live.client.get(f"/v1/jobs/{job_id}").json()["options"]["spans"] == [
        [2.0, 5.0, "alice"],
        [7.0, 9.5, "bob"],
    ]
    result = live.client.get(f"/v1/jobs/{job_id}/result").json()
    assert [(s["start_s"], s["end_s"], s["speaker"]) for s in result["segments"]] == [
        (2.0, 5.0, "alice"),
        (7.0, 9.5, "bob"),
    ]
    client.close()


@GRADIO_LEFTOVERS
def test_a_refused_upload_makes_no_job_and_leaves_no_file(jobs_ui: tuple[Live, str], tmp_path: Path) -> None:
    """Not audio: the page's error says so, no job is made, and the copy for the job is gone."""
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    live, url = jobs_ui
    jobs = live.server.config.app.state.jobs
    assert isinstance(jobs, Jobs)
    garbage = tmp_path / "notes.wav"
    garbage.write_bytes(b"this is not audio" * 50)
    before = (live.client.get("/v1/jobs").json()["jobs"], sorted(jobs.audio_dir.iterdir()))
    client = Client(url, verbose=False, analytics_enabled=False, download_files=False)
    with pytest.raises(AppError, match=r"notes\.wav: could not decode"):
        client.predict(
            audio=handle_file(str(garbage)),
            channels="mix",
            max_segment_s=15,
            threshold=0.5,
            segments=None,
            api_name="/timeline",
        )
    client.close()
    assert (live.client.get("/v1/jobs").json()["jobs"], sorted(jobs.audio_dir.iterdir())) == before


@GRADIO_LEFTOVERS
def test_an_unknown_job_in_the_url_is_said_so(browser: Any, jobs_ui: tuple[Live, str]) -> None:
    _, url = jobs_ui
    page = open_page(browser, f"{url}?job=no-such-job")
    message = page.locator('#tl-message[data-state="missing"]')  # visible: the tab was selected
    assert "no job 'no-such-job' here (never made, deleted, or expired)" in message.inner_text()
    assert page.locator('#tl-progress-state[data-state="missing"]').count() == 1
    page.close()


@GRADIO_LEFTOVERS
def test_another_window_follows_the_running_job_and_cancels_it(
    browser: Any, jobs_ui: tuple[Live, str], tmp_path: Path
) -> None:
    """While the job's first segment waits for the model, a second window opened at the job's URL shows
    it running; its Cancel ends the job at its next segment, and both windows say so."""
    live, url = jobs_ui
    jobs = live.server.config.app.state.jobs
    assert isinstance(jobs, Jobs)
    first = open_page(browser, url)
    with gated_model(live.service) as gate:
        job_id = submit_in_the_tab(first, joined_recording(tmp_path / "meeting.wav"))
        wait_job(live.client, job_id, until=("running",))
        second = open_page(browser, f"{url}?job={job_id}")
        for page in (first, second):
            page.locator('#tl-progress-state[data-state="running"]').wait_for()
        assert second.locator("#tl-job input, #tl-job textarea").first.input_value() == job_id
        second.locator("#tl-stop").click()
        wait_for(lambda: jobs.store.get(job_id).cancel_requested, 10, "the cancel to be asked")  # type: ignore[union-attr]
        gate.set()
        for page in (first, second):
            page.locator('#tl-progress-state[data-state="cancelled"]').wait_for()
            assert "cancelled" in page.locator("#tl-message").inner_text()
    job = live.client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "cancelled"
    assert len(shown_segments(second)) == job["progress"]["segments_done"] < job["progress"]["segments_total"]
    for page in (first, second):
        page.close()


@pytest.mark.slow
@GRADIO_LEFTOVERS
def test_a_job_survives_a_server_killed_under_the_page(browser: Any, tmp_path: Path) -> None:
    """`emoserve serve` with its web UI, killed (SIGKILL) while the page follows the tab's job; after the
    restart on the same home, the page opened at the job's URL follows the resumed job to its result."""
    args = (
        "--model", str(MODEL),
        "--jobs-lease-s", "2",  # the restarted server takes the killed one's job 2 s after its last write
        "--jobs-poll-s", "0.05",
        "--jobs-max-upload-mb", "100",
        "--outputs-dir", str(tmp_path / "outputs"),
    )  # fmt: skip
    recording = long_wav(tmp_path / "call.wav", 300.0)
    with serve_process(tmp_path, *args, ui=True) as (process, url):
        first_answer(f"{url}/healthz", time.monotonic(), 60)
        first_answer_with(f"{url}/readyz", 200, 180)
        page = open_page(browser, f"{url}/")
        job_id = submit_in_the_tab(page, recording)
        page.locator('#tl-progress-state[data-state="running"]').wait_for()
        deadline = time.monotonic() + 120
        while (progress := httpx.get(f"{url}/v1/jobs/{job_id}").json()["progress"])["segments_done"] < 1:
            assert time.monotonic() < deadline, progress
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        process.wait(30)
        page.close()
    assert progress["percent"] < 100, "the job ended before the kill: nothing was resumed"
    with serve_process(tmp_path, *args, ui=True) as (_, url):
        first_answer(f"{url}/healthz", time.monotonic(), 60)
        first_answer_with(f"{url}/readyz", 200, 180)
        page = open_page(browser, f"{url}/?job={job_id}")
        page.locator('#tl-progress-state[data-state="done"]').wait_for(timeout=300_000)
        with httpx.Client(base_url=url, timeout=60) as client:
            job = wait_job(client, job_id)
            result = client.get(f"/v1/jobs/{job_id}/result").json()
        assert job["status"] == "succeeded" and job["attempts"] == 2, job
        assert_shows(page, result)
        page.close()
