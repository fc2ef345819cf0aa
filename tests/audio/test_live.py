"""Live streams: the cut of PCM as it arrives equals the timeline's cut of the same audio as a file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import soxr

from emoserve.audio.live import InterimWindow, LiveCutter, LiveEvent, SpeechStart, TurnPiece
from emoserve.audio.segments import Recording
from emoserve.audio.vad import Segment, VadSettings
from emoserve.errors import AudioError
from tests.support.audio import RATE, SPEECH

# message sizes in samples at 16 kHz: 10 ms, an odd 20.9 ms, a VAD frame and a bit, 100 ms, 1 s
SIZES = (160, 334, 517, 1600, 16_000)


def streamed(path: Path, message_bytes: int, **options: object) -> list[LiveEvent]:
    info = sf.info(path)
    pcm = sf.read(path, dtype="int16")[0].tobytes()
    cutter = LiveCutter(sample_rate=info.samplerate, channels=info.channels, **options)  # type: ignore[arg-type]
    events: list[LiveEvent] = []
    for at in range(0, len(pcm), message_bytes):
        events += cutter.feed(pcm[at : at + message_bytes])
    return events + cutter.end()


def segments(events: list[LiveEvent]) -> list[Segment]:
    return [e for e in events if isinstance(e, Segment)]


def assert_same_segments(got: list[Segment], want: list[Segment]) -> None:
    assert [(s.start, s.end, s.split) for s in got] == [(s.start, s.end, s.split) for s in want]
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a.samples, b.samples)


@pytest.mark.parametrize("samples", SIZES)
def test_a_stream_in_messages_of_any_size_is_cut_as_the_file(speech: Path, samples: int) -> None:
    want = list(Recording(speech).segments())
    assert len(want) == 2 * len(SPEECH)
    assert_same_segments(segments(streamed(speech, 2 * samples)), want)


def test_long_speech_is_cut_where_the_file_is_cut(speech: Path) -> None:
    vad = VadSettings(max_segment_s=2.0, min_silence_ms=2000)  # pauses of 0.8 s join: long speech
    want = list(Recording(speech, vad=vad).segments())
    assert any(s.split for s in want)
    for samples in (160, 517, 16_000):
        assert_same_segments(segments(streamed(speech, 2 * samples, vad=vad)), want)


def test_a_resampled_stereo_stream_with_frames_split_between_channels(tmp_path: Path, speech: Path) -> None:
    """44.1 kHz stereo, messages that end between the two samples of a frame: still the file's cut."""
    x, _ = sf.read(speech, dtype="float32")
    y = soxr.resample(x, RATE, 44_100)
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([y, 0.5 * y], axis=1), 44_100, subtype="PCM_16")
    want = list(Recording(path).segments())
    assert want
    for message_bytes in (6, 1002, 17_642):  # 6: one and a half frames
        assert_same_segments(segments(streamed(path, message_bytes)), want)


def test_float32_pcm_equals_the_same_audio_as_int16(speech: Path) -> None:
    pcm = sf.read(speech, dtype="int16")[0]
    cutter = LiveCutter(encoding="pcm_f32le")
    as_float = (pcm.astype(np.float32) / 32768).tobytes()
    got: list[LiveEvent] = []
    for at in range(0, len(as_float), 4 * 1600):
        got += cutter.feed(as_float[at : at + 4 * 1600])
    assert_same_segments(segments(got + cutter.end()), list(Recording(speech).segments()))


def test_events_come_in_order_start_interims_segment(speech: Path) -> None:
    """Each utterance: speech_start, then interims every hop_s of its speech over at most window_s,
    then its segment; the times only go forward."""
    hop, window = 0.5, 1.5
    events = streamed(speech, 2 * 517, hop_s=hop, window_s=window)
    utterances: list[list[LiveEvent]] = []
    for event in events:
        if isinstance(event, SpeechStart):
            utterances.append([event])
        else:
            assert utterances, f"{event} before any speech_start"
            utterances[-1].append(event)
    assert len(utterances) == len(segments(events))
    for start, *middle, last in utterances:
        assert isinstance(start, SpeechStart) and isinstance(last, Segment) and last.start == start.start
        interims = [e for e in middle if isinstance(e, InterimWindow)]
        assert middle == interims
        ends = [i.end for i in interims]
        # a reading may cover the pause that is about to close the utterance, never audio before it
        assert ends == sorted(ends) and all(i.start < last.end for i in interims)
        if last.end - last.start > (hop + 0.2) * RATE:
            assert interims, "speech longer than hop_s gets a reading before it ends"
        for interim, next_end in zip(interims, [*ends[1:], None], strict=True):
            assert interim.start >= start.start and interim.end - interim.start <= window * RATE
            assert len(interim.samples) == interim.end - interim.start
            if next_end is not None:  # a reading per hop_s of speech, to a VAD frame (32 ms)
                assert abs(next_end - interim.end - hop * RATE) <= 512


def test_a_huge_message_gives_one_reading_not_a_pile(speech: Path) -> None:
    """A client that sends a minute at once gets one reading, of the audio up to the end of it."""
    pcm = sf.read(speech, dtype="int16")[0].tobytes()
    cutter = LiveCutter(hop_s=0.25)
    first = cutter.feed(pcm[: len(pcm) // 2])  # many seconds at once
    assert sum(isinstance(e, InterimWindow) for e in first) <= 1
    assert isinstance(first[-1], InterimWindow) or not cutter.in_speech


def test_a_message_that_is_not_whole_samples_is_refused_and_the_stream_goes_on(speech: Path) -> None:
    pcm = sf.read(speech, dtype="int16")[0].tobytes()
    cutter = LiveCutter()
    cutter.feed(pcm[:3200])
    with pytest.raises(AudioError, match="3 bytes is not whole pcm_s16le samples") as error:
        cutter.feed(b"\x00\x01\x02")
    assert error.value.code == "invalid_frame"
    events = cutter.feed(pcm[3200:]) + cutter.end()
    assert_same_segments(segments(events), list(Recording(speech).segments()))
    with pytest.raises(RuntimeError, match="ended"):
        cutter.feed(pcm[:2])


def test_non_finite_samples_are_refused(speech: Path) -> None:
    cutter = LiveCutter(encoding="pcm_f32le")
    with pytest.raises(AudioError) as error:
        cutter.feed(np.array([0.0, np.nan], np.float32).tobytes())
    assert error.value.code == "invalid_audio"


def test_bad_parameters_say_what_to_change() -> None:
    with pytest.raises(ValueError, match="encoding is 'mp3'"):
        LiveCutter(encoding="mp3")
    with pytest.raises(ValueError, match="0 < hop_s <= window_s"):
        LiveCutter(hop_s=5, window_s=2)


# ------------------------------------------------------------------------------------- the library session

READING_FIELDS = {"emotion", "label_zh", "emoji", "confidence", "scores"}
# a timeline segment's fields
SEGMENT_FIELDS = {"start_s", "end_s", "speaker", "split", "head", "calibrated", *READING_FIELDS}


def test_recognizer_stream_gives_the_timeline_and_every_message(tiny_recognizer: Any, speech: Path) -> None:
    timeline = tiny_recognizer.timeline(speech)
    session = tiny_recognizer.stream(hop_s=0.5)
    pcm = sf.read(speech, dtype="int16")[0].tobytes()
    messages = [session.first]
    for at in range(0, len(pcm), 2 * 1600):
        messages += session.feed(pcm[at : at + 2 * 1600])
    messages += session.end()
    assert [m["seq"] for m in messages] == list(range(len(messages)))
    kinds = [m["type"] for m in messages]
    assert kinds[0] == "ready" and kinds[-1] == "summary" and "interim" in kinds
    ready = messages[0]
    assert ready["model"] == timeline.model and ready["random_weights"] is tiny_recognizer.random_weights
    assert (ready["backend"], ready["dtype"]) == (timeline.backend, timeline.dtype) == ("torch", "float32")
    assert (messages[-1]["backend"], messages[-1]["dtype"]) == ("torch", "float32")  # the summary
    assert [label["en"] for label in ready["labels"]] == [label.en for label in tiny_recognizer.labels]
    assert ready["parameters"]["hop_s"] == 0.5 and ready["parameters"]["encoding"] == "pcm_s16le"
    got = [m for m in messages if m["type"] == "segment"]
    assert len(got) == len(timeline.segments) == kinds.count("speech_start")
    for message, want in zip(got, timeline.segments, strict=True):
        assert set(message) == {"type", "seq", "skipped", *SEGMENT_FIELDS}
        got_at = (message["start_s"], message["end_s"], message["emotion"])
        assert got_at == (want.start_s, want.end_s, want.emotion)
        for label, score in want.scores.items():
            assert message["scores"][label] == pytest.approx(score, abs=1e-5)
        assert message["skipped"] == 0
    for interim in (m for m in messages if m["type"] == "interim"):
        assert set(interim) == {"type", "seq", "start_s", "end_s", "skipped", *READING_FIELDS}
        assert sum(interim["scores"].values()) == pytest.approx(1, abs=1e-4)
    summary = messages[-1]
    assert summary["summary"] == timeline.summary and summary["duration_s"] == timeline.duration_s
    assert summary["speech_s"] == timeline.speech_s


def test_client_turns_are_the_audio_between_flushes() -> None:
    """vad=off: every sample sent (the resampler's held-back ones too) is in its turn, unpadded; a turn
    past max_segment_s is cut there, and a flush with nothing since the last one gives nothing."""
    rng = np.random.default_rng(0)
    noise = rng.normal(0, 0.1, 6 * RATE).astype(np.float32)
    cutter = LiveCutter(client_turns=True, vad=VadSettings(max_segment_s=2.0))
    first = cutter.feed(noise[:RATE])  # 1 s: silero would hear no speech in it
    assert isinstance(first[0], SpeechStart) and first[0].start == 0
    (turn,) = segments(cutter.flush())
    assert (turn.start, turn.end, turn.split) == (0, RATE, False)
    np.testing.assert_array_equal(turn.samples, noise[:RATE])
    assert cutter.flush() == []
    events = [e for at in range(RATE, 6 * RATE, 333) for e in cutter.feed(noise[at : at + 333])]
    events += cutter.flush()  # 5 s in odd messages: cut at 2 s and 4 s
    assert [type(e).__name__ for e in events if not isinstance(e, InterimWindow)] == [
        "SpeechStart", "Segment", "Segment", "Segment",
    ]  # fmt: skip
    assert [(s.start, s.end, s.split) for s in segments(events)] == [
        (RATE, 3 * RATE, True), (3 * RATE, 5 * RATE, True), (5 * RATE, 6 * RATE, True),
    ]  # fmt: skip
    np.testing.assert_array_equal(np.concatenate([s.samples for s in segments(events)]), noise[RATE:])


def test_a_turn_read_in_pieces_gives_every_sample_to_one_piece_with_a_second_before_as_context() -> None:
    """chunk_s: a piece every chunk_s of the turn (whatever the message sizes), the rest at its end as the
    last piece before the turn's segment; each piece's window reaches 1 s back into its turn (not before
    it), and no interim windows are cut."""
    rng = np.random.default_rng(1)
    noise = rng.normal(0, 0.1, 9 * RATE).astype(np.float32)
    cutter = LiveCutter(client_turns=True, chunk_s=2.0, vad=VadSettings(max_segment_s=6.0))
    events = [
        e
        for at in range(0, 5 * RATE + 3000, 777)
        for e in cutter.feed(noise[at : min(at + 777, 5 * RATE + 3000)])
    ]
    events += cutter.flush()
    assert [type(e).__name__ for e in events] == [
        "SpeechStart", "TurnPiece", "TurnPiece", "TurnPiece", "Segment",
    ]  # fmt: skip
    pieces = [e for e in events if isinstance(e, TurnPiece)]
    end = 5 * RATE + 3000
    assert [(p.start, p.end) for p in pieces] == [(0, 2 * RATE), (2 * RATE, 4 * RATE), (4 * RATE, end)]
    assert [p.window_start for p in pieces] == [0, RATE, 3 * RATE]
    assert [p.context for p in pieces] == [0, RATE, RATE]
    for p in pieces:
        np.testing.assert_array_equal(p.samples, noise[p.window_start : p.end])
    (turn,) = segments(events)
    assert (turn.start, turn.end) == (0, end)  # the turn's segment is still the whole turn
    # a turn no longer than chunk_s: no pieces, its segment alone (scored whole)
    short = cutter.feed(noise[end : end + RATE]) + cutter.flush()
    assert [type(e).__name__ for e in short] == ["SpeechStart", "Segment"]
    # past max_segment_s: the part cut there ends its pieces, and the next part's start afresh
    rest = cutter.feed(noise[: 7 * RATE]) + cutter.flush()
    kinds = [type(e).__name__ for e in rest]
    assert kinds == ["SpeechStart", "TurnPiece", "TurnPiece", "TurnPiece", "Segment", "Segment"], kinds
    second = [e for e in rest if isinstance(e, Segment)][1]
    assert second.split and second.end - second.start == RATE


def test_pieces_need_client_turns() -> None:
    with pytest.raises(ValueError, match="client_turns"):
        LiveCutter(chunk_s=2.0)


def test_a_flush_with_the_vad_on_closes_the_open_utterance_at_the_audio_received(speech: Path) -> None:
    pcm = sf.read(speech, dtype="int16")[0].tobytes()
    whole = segments(streamed(speech, 3200))
    cut = (whole[0].start + RATE) // 160 * 160  # a second into the first utterance, on a 10 ms message
    cutter = LiveCutter()
    events = cutter.feed(pcm[: 2 * cut])
    (flushed,) = segments(cutter.flush())
    assert (flushed.start, flushed.end) == (whole[0].start, cut)
    assert cutter.flush() == []  # nothing open now
    events = cutter.feed(pcm[2 * cut :]) + cutter.end()
    rest = segments(events)
    assert rest[0].start >= cut and rest[0].end == whole[0].end
    assert_same_segments(rest[1:], whole[1:])
