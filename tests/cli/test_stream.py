"""`emoserve stream`: a file or stdin's PCM, in-process or to a server's /v1/stream, against
`predict --segments` for the same audio."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from emoserve.cli import main, parser
from emoserve.cli.stream import api_key, file_frames, paced
from emoserve.inference.protocol import StreamMessage, StreamOptions
from emoserve.inference.stream_client import StreamClient, StreamRefused, stream_url
from tests.support.audio import RATE, SPEECH, joined
from tests.support.paths import FIXTURE
from tests.support.server import LIVE, Live, assert_same_segments, live_server

MODEL = str(FIXTURE / "model")


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def jsonl(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines()]


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Speech, pauses, speech: 16 kHz 16-bit, so stdin's s16le can be the file's very samples."""
    x, _ = joined(SPEECH, gap_s=0.8)
    path = tmp_path_factory.mktemp("cli-stream") / "speech.wav"
    sf.write(path, x, RATE, subtype="PCM_16")
    return path


@pytest.fixture(scope="module")
def timeline(speech: Path) -> list[dict[str, Any]]:
    """`predict --segments --format jsonl`'s segment rows for the same file."""
    capture = io.StringIO()
    stdout, sys.stdout = sys.stdout, capture
    try:
        argv = [
            "predict",
            str(speech),
            "--segments",
            "--format",
            "jsonl",
            "--model",
            MODEL,
            "--dtype",
            "float32",
        ]
        assert main(argv) == 0  # float32 as asked: a module fixture runs before the autouse pin
    finally:
        sys.stdout = stdout
    rows = jsonl(capture.getvalue())
    return [r for r in rows if r["type"] == "segment"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    settings = dataclasses.replace(LIVE, max_streams=2)
    with live_server(settings, tmp_path_factory.mktemp("cli-stream-home")) as live:
        yield live


def assert_stream_of(timeline: list[dict[str, Any]], messages: list[Any]) -> None:
    assert [m["seq"] for m in messages] == list(range(len(messages)))
    assert messages[0]["type"] == "ready" and messages[-1]["type"] == "summary"
    segments = [m for m in messages if m["type"] == "segment"]
    assert len(segments) == len(timeline) == len(SPEECH)
    assert_same_segments(segments, timeline, ("start_s", "end_s", "emotion", "split"))


def test_a_file_in_process_gives_predict_segments(
    capsys: pytest.CaptureFixture[str], speech: Path, timeline: list[dict[str, Any]]
) -> None:
    code, out, err = run(capsys, "stream", str(speech), "--fast", "--model", MODEL)  # piped: jsonl
    assert code == 0, err
    messages = jsonl(out)
    assert_stream_of(timeline, messages)
    kinds = {m["type"] for m in messages}
    assert kinds == {"ready", "speech_start", "interim", "segment", "summary"}
    assert messages[0]["random_weights"] is False and "RANDOM" not in err


def test_pcm_on_stdin(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    speech: Path,
    timeline: list[dict[str, Any]],
) -> None:
    pcm = sf.read(speech, dtype="int16")[0].tobytes()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(pcm)))
    code, out, err = run(
        capsys, "stream", "-", "--sample-rate", "16000", "--encoding", "pcm_s16le", "--model", MODEL
    )
    assert code == 0, err
    assert_stream_of(timeline, jsonl(out))


class Interrupted(io.RawIOBase):
    """stdin that gives `data`, then Ctrl-C (as a microphone piped in is stopped)."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if not self.data:
            raise KeyboardInterrupt
        n = min(len(buffer), len(self.data))
        buffer[:n], self.data = self.data[:n], self.data[n:]
        return n


def test_ctrl_c_ends_the_source_and_the_summary_still_comes(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, speech: Path
) -> None:
    pcm = sf.read(speech, dtype="int16")[0].tobytes()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BufferedReader(Interrupted(pcm))))
    code, out, err = run(capsys, "stream", "-", "--model", MODEL)
    assert code == 0, err
    messages = jsonl(out)
    assert messages[-1]["type"] == "summary" and messages[-1]["summary"]["segments"] == len(SPEECH)


def test_a_server_gives_the_same_segments(
    capsys: pytest.CaptureFixture[str], server: Live, speech: Path, timeline: list[dict[str, Any]]
) -> None:
    url = str(server.client.base_url).replace("http://", "ws://")
    code, out, err = run(capsys, "stream", str(speech), "--fast", "--url", url, "--format", "jsonl")
    assert code == 0, err
    messages = jsonl(out)
    assert_stream_of(timeline, messages)
    assert messages[0]["parameters"]["encoding"] == "pcm_f32le"  # a file's decoded samples as they are


def test_a_wrong_api_key_is_a_clear_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, speech: Path
) -> None:
    settings = dataclasses.replace(LIVE, api_key="the-key")
    with live_server(settings, tmp_path) as keyed:
        url = str(keyed.client.base_url).replace("http://", "ws://")
        code, out, err = run(capsys, "stream", str(speech), "--fast", "--url", url, "--api-key", "wrong")
        assert code == 2 and out == ""
        assert "refused the stream: HTTP 401" in err and "api key" in err.lower()
        code, out, err = run(capsys, "stream", str(speech), "--fast", "--url", url, "--api-key", "the-key")
        assert code == 0, err
        assert jsonl(out)[-1]["type"] == "summary"


def test_a_float_file_streams_its_samples_unquantised(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A 32-bit float source: the stream carries its samples as they are, so its segments and scores are
    predict's for that file (s16 would round each sample to 1/32768)."""
    x, _ = joined(SPEECH, gap_s=0.8)
    path = tmp_path / "float.wav"
    sf.write(path, (x * 0.7 + 1e-5).astype(np.float32), RATE, subtype="FLOAT")
    code, out, err = run(capsys, "predict", str(path), "--segments", "--format", "jsonl", "--model", MODEL)
    assert code == 0, err
    want = [r for r in jsonl(out) if r["type"] == "segment"]
    code, out, err = run(capsys, "stream", str(path), "--fast", "--model", MODEL, "--format", "jsonl")
    assert code == 0, err
    assert_stream_of(want, jsonl(out))


def test_a_server_that_refuses_is_a_clear_error(capsys: pytest.CaptureFixture[str], speech: Path) -> None:
    code, _, err = run(capsys, "stream", str(speech), "--url", "ws://127.0.0.1:9", "--fast")
    assert code == 2 and "cannot connect to ws://127.0.0.1:9" in err


def test_random_weights_are_labelled_on_a_terminal(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, speech: Path
) -> None:
    assert main(["make-test-model", "--out", str(tmp_path / "m"), "--seed", "1"]) == 0
    capsys.readouterr()
    code, out, err = run(
        capsys, "stream", str(speech), "--fast", "--model", str(tmp_path / "m"), "--format", "text"
    )
    assert code == 0, err
    assert "RANDOM weights" in err
    lines = out.splitlines()
    assert "(RANDOM WEIGHTS)" in lines[0] and lines[-1].startswith("summary: ")
    assert any("[segment]" in line and line.endswith("(RANDOM WEIGHTS)") for line in lines)
    assert any("speech starts" in line for line in lines)


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--hop-s", "0.1"], "hop_s is 0.1"),
        (["--sample-rate", "5"], "sample_rate is 5"),
        (["--vad-threshold", "2"], "threshold is 2"),
    ],
)
def test_bad_flags_fail_before_any_work(
    capsys: pytest.CaptureFixture[str], speech: Path, argv: list[str], says: str
) -> None:
    code, out, err = run(capsys, "stream", "-" if "--sample-rate" in argv else str(speech), *argv)
    assert code == 2 and says in err and out == ""


def test_a_missing_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run(capsys, "stream", str(tmp_path / "nothing.wav"), "--model", MODEL)
    assert code == 2 and "nothing.wav: no such file" in err


def test_real_time_pace_sleeps_until_each_frames_time() -> None:
    now = [100.0]
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(s)
        now[0] += s

    frames = [b"\x00" * 3200] * 5  # 0.1 s each at 16 kHz s16
    sent = []
    for _frame in paced(iter(frames), 32_000, clock=lambda: now[0], sleep=sleep):
        sent.append(now[0])
        now[0] += 0.01  # sending takes 10 ms
    assert sent == pytest.approx([100.0, 100.1, 100.2, 100.3, 100.4])
    assert slept == pytest.approx([0.09] * 4)


def test_file_frames_are_the_files_samples(speech: Path) -> None:
    frames = list(file_frames(speech))
    assert {len(f) for f in frames[:-1]} == {6400}  # 0.1 s of 16 kHz f32
    pcm = np.frombuffer(b"".join(frames), "<f4")
    np.testing.assert_array_equal(pcm, sf.read(speech, dtype="float32")[0])


def test_the_stream_client_is_a_library(server: Live, speech: Path, timeline: list[dict[str, Any]]) -> None:
    """`inference/stream_client.py` without the command line: one task sends, another receives."""
    url = str(server.client.base_url)  # http://: taken as ws://

    async def stream() -> tuple[list[StreamMessage], int | None]:
        async with await StreamClient.connect(url, StreamOptions(encoding="pcm_f32le")) as client:

            async def send() -> None:
                for frame in file_frames(speech):
                    await client.send(frame)
                await client.end()

            sending = asyncio.create_task(send())
            messages = [message async for message in client]
            await sending
        return messages, client.close_code

    messages, closed = asyncio.run(stream())
    assert closed == 1000
    assert_stream_of(timeline, messages)


def test_the_stream_client_says_why_a_server_refuses(tmp_path: Path) -> None:
    settings = dataclasses.replace(LIVE, api_key="the-key")
    with live_server(settings, tmp_path) as keyed, pytest.raises(StreamRefused) as refused:
        asyncio.run(StreamClient.connect(str(keyed.client.base_url), api_key="wrong"))
    assert refused.value.status == 401 and "api key" in refused.value.body.lower()


def test_stream_urls() -> None:
    options = StreamOptions(sample_rate=8000, hop_s=0.5, embedding=True)
    url = stream_url("http://h:1", options)
    assert url.startswith("ws://h:1/v1/stream?sample_rate=8000&encoding=pcm_s16le&channels=1&hop_s=0.5&")
    assert url.endswith("&granularity=utterance&embedding=true&vad=on")  # head: not set, not sent
    assert stream_url("wss://h/emo/v1/stream/") == "wss://h/emo/v1/stream"
    with pytest.raises(ValueError, match="give ws://HOST:PORT"):
        stream_url("h:1")


def test_the_api_key_falls_back_to_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMOSERVE_API_KEY", "from-the-variable")
    assert api_key(parser().parse_args(["stream", "-"])) == "from-the-variable"
    assert api_key(parser().parse_args(["stream", "-", "--api-key", "flag"])) == "flag"
    monkeypatch.setenv("EMOSERVE_API_KEY", "")  # empty: no key, as for the server
    assert api_key(parser().parse_args(["stream", "-"])) is None
