"""The web UI mounted (webui/app.py): its Gradio API, and the real page in headless Chromium."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI

from emoserve.audio.segments import Recording
from emoserve.inference.recognizer import Recognizer
from emoserve.inference.timeline import score_segments
from emoserve.model.labels import PUBLISHED_LABELS, parse_label
from emoserve.serving.engine import Engine
from emoserve.webui.app import mount_ui
from emoserve.webui.saved import OutputStore
from tests.support.environment import gradio_loops_closed
from tests.support.server import free_port
from tests.support.webui import (
    BROWSER_ARGS,
    CHROMIUM,
    EXAMPLE,
    OTHER_EXAMPLE,
    PAGE_TIMEOUT_MS,
    RECORDING_CLIPS,
    FakeService,
    joined_recording,
    open_page,
    ui_settings,
)

# Gradio's queue statistics (gradio/queueing.py) use pandas options and keywords that pandas 3
# deprecated; the warnings come from Gradio's server thread and are not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning")


@pytest.fixture(scope="module")
def live_ui(engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, FakeService]]:
    """The UI mounted on a FastAPI app, served by uvicorn in a thread."""
    import uvicorn

    service = FakeService(engine, ui_settings(tmp_path_factory.mktemp("outputs")))
    app = FastAPI()
    with gradio_loops_closed():
        mount_ui(app, service, path="/")
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the UI server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/", service
    server.should_exit = True
    thread.join(10)


def upload(page: Any, clip: Path) -> None:
    page.locator("#audio-input input[type=file]").set_input_files(str(clip))
    # the value is set once the upload finished and the player shows the clip
    page.locator("#audio-input audio, #audio-input [data-testid=waveform-controls]").first.wait_for(
        state="attached"
    )


def result_text(page: Any) -> str:
    page.locator("#result-emotion").wait_for()
    return str(page.locator("#result-card").inner_text())


def saved_folder(page: Any) -> str:
    log_text = page.locator("#log textarea").input_value()
    (line,) = [line for line in log_text.splitlines() if line.startswith("saved to: ")]
    return line.removeprefix("saved to: ")


def test_the_gradio_api_names_its_parameters_and_answers_a_client(
    live_ui: tuple[str, FakeService], tmp_path: Path, tiny_recognizer: Recognizer
) -> None:
    """As a user of the Gradio API calls it (gradio_client): both events take named parameters (a handler
    taking *args made /timeline's param_0..param_4), by which they are called, and both answer: the
    model's result, and the warning when the service says its weights are random."""
    from gradio_client import Client, handle_file

    url, _ = live_ui
    client = Client(url, verbose=False, analytics_enabled=False, download_files=False)
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    names = {
        api: [p["parameter_name"] for p in endpoints[api]["parameters"]]
        for api in ("/recognize", "/timeline")
    }
    assert names == {
        "/recognize": ["audio", "granularity", "embedding"],
        "/timeline": ["audio", "channels", "max_segment_s", "threshold", "segments"],
    }
    card, _, _, log_text, files = client.predict(
        audio=handle_file(str(EXAMPLE)), granularity="utterance", embedding=False, api_name="/recognize"
    )
    expected = tiny_recognizer.predict(EXAMPLE)
    assert expected.emotion in card and f"{expected.confidence:.1%}" in card and len(files) == 2
    assert f"model: {expected.model}" in log_text
    assert ("RANDOM WEIGHTS" in log_text) == ("Random weights" in card) == expected.random_weights
    recording = joined_recording(tmp_path / "meeting.wav", RECORDING_CLIPS[:2])
    progress, summary, *_ = client.predict(
        audio=handle_file(str(recording)),
        channels="mix",
        max_segment_s=15,
        threshold=0.5,
        segments=None,
        api_name="/timeline",
    )
    assert 'data-state="done"' in progress and "RANDOM WEIGHTS" in summary and "meeting.wav" in summary


def test_browser_recognises_the_example_clip(
    browser: Any, live_ui: tuple[str, FakeService], tiny_recognizer: Recognizer
) -> None:
    url, service = live_ui
    page = open_page(browser, url)
    assert "RANDOM WEIGHTS" in page.locator("#random-weights-warning").inner_text()

    upload(page, EXAMPLE)
    page.locator("#start-button").click()
    expected = tiny_recognizer.predict(EXAMPLE)
    text = result_text(page)
    assert expected.emotion in text and expected.label_zh in text
    assert f"{expected.confidence:.1%}" in text
    assert Path(saved_folder(page)).parent == service.settings.outputs_dir
    page.close()


def test_two_windows_recognise_at_once_into_their_own_folders(
    browser: Any, live_ui: tuple[str, FakeService]
) -> None:
    url, service = live_ui
    store = OutputStore(service.settings.outputs_dir)  # the UI's own store saves into the same folder
    before = set(store.folders())
    pages = [open_page(browser, url) for _ in range(2)]
    for page, audio in zip(pages, (EXAMPLE, OTHER_EXAMPLE), strict=True):
        upload(page, audio)
    for page in pages:
        page.locator("#start-button").click()
    for page in pages:
        result_text(page)
    folders = {saved_folder(page) for page in pages}
    assert len(folders) == 2
    assert {str(f) for f in set(store.folders()) - before} == folders
    # Both in one model call: Gradio let the two windows run at once and the engine batched them.
    for page in pages:
        assert "(batch of 2)" in page.locator("#log textarea").input_value()
        page.close()


def test_browser_follows_start_up_reports_bad_input_and_draws_the_timeline(
    browser: Any, live_ui: tuple[str, FakeService], tmp_path: Path
) -> None:
    url, service = live_ui
    service.phase = "warming"
    try:
        page = browser.new_page()
        page.set_default_timeout(PAGE_TIMEOUT_MS)
        page.goto(url)
        page.locator('#status-state[data-state="warming"]').wait_for()
    finally:
        service.phase = "ready"
    page.locator('#status-state[data-state="ready"]').wait_for()  # the timer refreshed the banner

    garbage = tmp_path / "notes.wav"
    garbage.write_bytes(b"this is not audio" * 50)
    upload(page, garbage)
    page.locator("#start-button").click()
    assert "notes.wav: could not decode audio" in page.get_by_text("could not decode audio").inner_text()

    page.locator("#audio-input").get_by_role("button", name="Clear").first.click()
    upload(page, EXAMPLE)  # the page keeps working after the error
    page.get_by_text("frame: a 20 ms timeline").click()
    page.locator("#embedding input").check()
    page.locator("#start-button").click()
    result_text(page)
    page.locator("#timeline").wait_for()
    downloads = page.locator("#downloads").inner_text().replace("\n", "")  # name and extension are split
    assert all(name in downloads for name in ("result.json", "processed_audio.wav", "embedding.npy"))
    assert "frame, 151 frames" in page.locator("#log textarea").input_value()
    page.close()


def test_browser_builds_the_timeline_of_a_long_recording(
    browser: Any, live_ui: tuple[str, FakeService], tmp_path: Path, tiny_recognizer: Recognizer
) -> None:
    url, service = live_ui
    recording = joined_recording(tmp_path / "meeting.wav")
    expected = list(score_segments(tiny_recognizer, Recording(str(recording))))
    page = open_page(browser, url)
    page.get_by_role("tab", name="Long recording").click()
    page.locator("#tl-audio input[type=file]").set_input_files(str(recording))
    page.locator("#tl-audio audio, #tl-audio [data-testid=waveform-controls]").first.wait_for(
        state="attached"
    )
    page.locator("#tl-start").click()
    page.locator('#tl-progress-state[data-state="done"]').wait_for()

    rows = page.locator("#tl-table [role=row]:has([role=gridcell])")
    assert rows.count() == len(expected)
    for row, segment in zip(rows.all(), expected, strict=True):
        assert f"{segment.emoji} {segment.emotion}" in row.inner_text()
    assert page.locator("#tl-svg rect.tl-segment").count() == len(expected)
    assert "RANDOM WEIGHTS" in page.locator("#tl-summary").inner_text()
    downloads = page.locator("#tl-downloads").inner_text().replace("\n", "")
    assert "timeline.json" in downloads and "timeline.csv" in downloads
    saved = page.locator("#tl-saved").inner_text().removeprefix("saved to: ")
    assert Path(saved).parent == service.settings.outputs_dir
    assert service.timelines_running == 0

    # Stop part-way: the run is cancelled and its timeline closed (which stops the decoding).
    page.locator("#tl-start").click()
    page.locator('#tl-progress-state[data-state="running"]').wait_for()
    page.locator("#tl-stop").click()
    deadline = time.monotonic() + 10
    while service.timelines_running:
        assert time.monotonic() < deadline, "the stopped run was not closed"
        time.sleep(0.05)
    assert service.timelines_closed[-1] < len(expected)
    page.close()


@pytest.fixture(scope="module")
def microphone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What Chromium's fake microphone plays, again and again: two utterances, each with a pause after."""
    return joined_recording(tmp_path_factory.mktemp("microphone") / "speech.wav", RECORDING_CLIPS[:2])


@pytest.fixture
def browser_with_microphone(playwright: Any, microphone: Path) -> Iterator[Any]:
    """Chromium whose microphone is `microphone` (a WAV file, looped), allowed without asking."""
    args = [
        *BROWSER_ARGS,
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={microphone}",
    ]
    browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=args)
    yield browser
    browser.close()


def test_browser_live_tab_reads_the_microphone_while_it_plays(
    browser_with_microphone: Any, live_ui: tuple[str, FakeService]
) -> None:
    """The Live tab in a real browser, its microphone fed from a WAV file: readings appear while the
    audio plays, each utterance joins the strip when its pause comes, Stop gives the summary and frees
    the stream."""
    url, service = live_ui
    opened = service.streams_opened
    page = open_page(browser_with_microphone, url)
    page.get_by_role("tab", name="Live").click()
    page.locator("#live-audio").get_by_role("button", name="Record").click()

    page.locator('#live-emotion[data-state="interim"]').wait_for()  # a reading while the person speaks
    labels = {parse_label(token).en for token in PUBLISHED_LABELS}
    assert page.locator("#live-emotion").get_attribute("data-emotion") in labels
    assert "RANDOM WEIGHTS" in page.locator("#live-random").inner_text()
    page.locator("#live-svg rect.tl-segment").first.wait_for()  # the first utterance's pause came
    assert service.streams_open == 1 and service.streams_opened == opened + 1
    assert "Streaming 48000 Hz" in page.locator("#live-state").inner_text()

    page.locator("#live-audio").get_by_role("button", name="Stop").click()
    page.locator('#live-state[data-state="done"]').wait_for()
    assert "Stream ended" in page.locator("#live-state").inner_text()
    deadline = time.monotonic() + 10
    while service.streams_open:
        assert time.monotonic() < deadline, "the stopped stream was not closed"
        time.sleep(0.05)
    page.close()
