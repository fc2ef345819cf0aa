"""Long recordings: streamed decoding, the silero VAD block by block, segment rules, cuts of long speech,
caller segments, scoring equal to predict(), the summary, and flat memory on a long generated file."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from emoserve.audio.decode import load_audio
from emoserve.audio.segments import Cut, Recording, Segmenter, Span, quietest, read_spans
from emoserve.audio.stream import AudioStream
from emoserve.audio.vad import FRAME, SileroVad, VadSettings
from emoserve.errors import AudioError
from emoserve.inference.results import summarise
from tests.support.audio import RATE, SPEECH, clip, joined
from tests.support.paths import FIXTURE
from tests.support.reference import SCORE_TOL

AUDIO = FIXTURE / "audio"
EDGE_TOL_S = 0.3  # segment bounds vs where a clip was put: silero's frames, padding, quiet clip edges


@pytest.fixture(scope="module")
def speech_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[tuple[float, float]]]:
    x, truth = joined(SPEECH)
    path = tmp_path_factory.mktemp("timeline") / "joined.wav"
    sf.write(path, x, RATE, subtype="PCM_16")
    return path, truth


def bounds(segments: Any) -> list[tuple[float, float]]:
    return [(s.start_s, s.end_s) for s in segments]


# ------------------------------------------------------------------------------------------- the VAD


def test_one_segment_per_clip_at_the_right_place(speech_file: tuple[Path, list[tuple[float, float]]]) -> None:
    path, truth = speech_file
    segments = list(Recording(path).segments())
    assert len(segments) == len(truth), bounds(segments)
    for segment, (start, end) in zip(segments, truth, strict=True):
        assert abs(segment.start_s - start) < EDGE_TOL_S, (segment, start)
        assert abs(segment.end_s - end) < EDGE_TOL_S, (segment, end)
        assert not segment.split


def test_vad_blockwise_equals_silero_whole_file(speech_file: tuple[Path, list[tuple[float, float]]]) -> None:
    """Our block-by-block probabilities equal silero's own whole-file sequence path, and our streamed
    segment rules give what its get_speech_timestamps_from_probs gives on them."""
    import torch

    threads = torch.get_num_threads()
    import silero_vad  # its import sets torch's threads to 1 for the process: only here, and undone

    torch.set_num_threads(threads)
    x = sf.read(speech_file[0], dtype="float32")[0]
    theirs = silero_vad.load_silero_vad(onnx=True, sequence=True).audio_forward(x)
    vad = SileroVad()
    ours = np.concatenate(
        [vad.probabilities(x[i : i + 7_777]) for i in range(0, len(x), 7_777)] + [vad.flush()]
    )
    np.testing.assert_allclose(ours, theirs, atol=1e-6)

    settings = VadSettings(max_segment_s=1000.0)
    reference = silero_vad.get_speech_timestamps_from_probs(
        theirs,
        threshold=settings.threshold,
        min_speech_duration_ms=settings.min_speech_ms,
        min_silence_duration_ms=settings.min_silence_ms,
        speech_pad_ms=settings.pad_ms,
        audio_length_samples=len(x),
    )
    segmenter = Segmenter(settings)
    ours_segments = segmenter.push(x, ours[:-1]) + segmenter.finish(ours[-1:])
    assert [(s.start, s.end) for s in ours_segments] == [(r["start"], r["end"]) for r in reference]


@pytest.mark.parametrize("block_s", [0.05, 0.7, 3.0])
def test_blockwise_segments_equal_whole_file(
    speech_file: tuple[Path, list[tuple[float, float]]], block_s: float
) -> None:
    path = speech_file[0]
    settings = VadSettings(max_segment_s=2.0)  # cuts too, which must not depend on the blocks either
    whole = list(Recording(path, vad=settings).segments())

    job = Recording(path, vad=settings)
    job.stream = AudioStream(path, block_s=block_s)
    blocks = list(job.segments())
    assert [(s.start, s.end, s.split) for s in blocks] == [(s.start, s.end, s.split) for s in whole]
    for a, b in zip(blocks, whole, strict=True):
        np.testing.assert_array_equal(a.samples, b.samples)


def test_a_stub_vad_drives_the_segment_rules(tmp_path: Path) -> None:
    """Probabilities alone decide: speech frames 10..39 -> one segment, padded by 100 ms each side."""

    class Stub:
        def __init__(self) -> None:
            self.frame = 0

        def probabilities(self, samples: np.ndarray) -> np.ndarray:
            n = len(samples) // FRAME
            p = np.array([0.9 if 10 <= self.frame + i < 40 else 0.1 for i in range(n)], np.float32)
            self.frame += n
            return p

        def flush(self) -> np.ndarray:
            return np.zeros(0, np.float32)

    path = tmp_path / "quiet.wav"
    sf.write(path, np.zeros(100 * FRAME, np.float32), RATE)
    segments = list(Recording(path, vad_factory=Stub).segments())
    assert [(s.start, s.end) for s in segments] == [(10 * FRAME - 1600, 40 * FRAME + 1600)]


def test_long_speech_is_cut_under_the_limit_at_quiet_points(tmp_path: Path) -> None:
    """Clips joined by 150 ms pauses make 28 s of continuous speech (min_silence 1 s: no pause ends a
    segment): the pieces stay under max_segment_s, are marked split, and the cuts land in the pauses
    (which the clips' own quiet edges widen by up to EDGE_TOL_S)."""
    names = ("en_3s_8k.wav", "zh_3s_16k.wav", "en_3s_44k_stereo.wav") * 3
    x, truth = joined(names, gap_s=0.15, seed=1)
    path = tmp_path / "continuous.wav"
    sf.write(path, x, RATE, subtype="PCM_16")
    settings = VadSettings(max_segment_s=8.0, min_silence_ms=1000)
    segments = list(Recording(path, vad=settings).segments())
    assert len(segments) >= 4, bounds(segments)
    assert all(s.split for s in segments), bounds(segments)
    assert all(s.end_s - s.start_s <= settings.max_segment_s for s in segments)
    assert all(a.end == b.start for a, b in itertools.pairwise(segments)), bounds(segments)
    pauses = [(end - EDGE_TOL_S, start + EDGE_TOL_S) for (_, end), (start, _) in itertools.pairwise(truth)]
    for a in segments[:-1]:
        assert any(lo <= a.end_s <= hi for lo, hi in pauses), (a.end_s, pauses)


def test_a_cut_in_the_closing_pause_leaves_no_empty_piece(speech_file: tuple[Path, Any]) -> None:
    """With 2 s pieces and threshold 0.4, a cut lands after silero's provisional end: the tail after it
    is dropped, never emitted with its end before its start."""
    segments = list(Recording(speech_file[0], vad=VadSettings(max_segment_s=2.0, threshold=0.4)).segments())
    assert all(s.end - s.start >= 250 * 16 for s in segments), [(s.start, s.end) for s in segments]
    assert all(a.end <= b.start for a, b in itertools.pairwise(segments))


def test_quietest_prefers_a_pause_silero_heard() -> None:
    loud = np.full(1600, 0.5, np.float32)
    x = np.concatenate([loud, np.full(800, 0.01, np.float32), loud, np.zeros(800, np.float32), loud])
    hops = len(x) // 160
    # the digital silence at 4000-4800 is quieter, but silero called only the 1600-2400 stretch a pause
    probs = np.ones(hops, np.float32)
    probs[10:15] = 0.0
    at = quietest(x, probs, 0, 0.5)
    assert 1600 <= at <= 2400
    assert 4000 <= quietest(x, None, 0, 0.5) <= 4800


def test_silence_only_gives_no_segments(tmp_path: Path) -> None:
    path = tmp_path / "silence.wav"
    sf.write(path, np.random.default_rng(0).normal(0, 1e-3, 5 * RATE).astype(np.float32), RATE)
    job = Recording(path)
    assert list(job.segments()) == []
    assert job.duration_s == pytest.approx(5.0)


def test_importing_emoserve_timeline_leaves_torch_threads_alone(tmp_path: Path) -> None:
    """silero_vad's import sets torch's thread count to 1 for the whole process; ours never imports it."""
    code = (
        "import torch; torch.set_num_threads(2); "
        "import emoserve.inference.timeline, emoserve.audio.vad; "
        "from emoserve.audio.vad import SileroVad; SileroVad(); "
        "import sys; print(torch.get_num_threads(), 'silero_vad' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["2", "False"]


# ----------------------------------------------------------------------------------- decoding, channels


def test_streamed_samples_equal_load_audio() -> None:
    for name in ("en_3s_44k_stereo.wav", "en_3s_8k.wav", "en_7s_16k.flac", "zh_1s_16k.ogg"):
        with AudioStream(AUDIO / name, block_s=0.3) as stream:
            streamed = np.concatenate(list(stream.blocks()))[:, 0]
        np.testing.assert_array_equal(streamed, load_audio(AUDIO / name).samples, err_msg=name)


def test_channels_separate_gives_a_timeline_per_channel(tmp_path: Path) -> None:
    """Call-centre stereo: the agent on the left, the customer on the right, taking turns."""
    a, b = clip("en_3s_8k.wav"), clip("zh_3s_16k.wav")
    gap = np.zeros(RATE, np.float32)
    left = np.concatenate([gap, a, gap, np.zeros(len(b), np.float32), gap])
    right = np.concatenate([gap, np.zeros(len(a), np.float32), gap, b, gap])
    path = tmp_path / "call.wav"
    sf.write(path, np.stack([left, right], axis=1), RATE)
    segments = list(Recording(path, channels="separate").segments())
    assert [s.speaker for s in segments] == ["ch0", "ch1"]
    assert segments[0].end_s < segments[1].start_s
    mixed = list(Recording(path).segments())
    assert [s.speaker for s in mixed] == [None, None]


def test_limit_and_bad_files_fail_before_any_work(tmp_path: Path, speech_file: tuple[Path, Any]) -> None:
    with pytest.raises(AudioError) as too_long:
        Recording(speech_file[0], max_seconds=5.0)
    assert too_long.value.code == "audio_too_long"
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not audio at all" * 10)
    with pytest.raises(AudioError) as undecodable:
        Recording(bad)
    assert undecodable.value.code == "unsupported_audio"


# ------------------------------------------------------------------------------------- caller segments


def test_caller_segments_skip_the_vad(speech_file: tuple[Path, Any]) -> None:
    spans = [Span(0.5, 2.0, "A"), Span(1.5, 3.0, "B"), Span(4.0, 30.0, "A")]  # overlapping; past the end
    job = Recording(speech_file[0], spans=spans, vad=VadSettings(max_segment_s=5.0))
    segments = list(job.segments())
    x = load_audio(speech_file[0]).samples
    assert [(s.start, s.speaker) for s in segments[:2]] == [(8000, "A"), (24000, "B")]
    assert segments[-1].end == len(x)  # cut at the end of the recording
    for s in segments:
        np.testing.assert_array_equal(s.samples, x[s.start : s.end])
    assert all(s.split for s in segments[2:]) and all(s.end_s - s.start_s <= 5.0 for s in segments)


@pytest.mark.parametrize("channels", ["mix", "separate"])
def test_a_stored_plan_cuts_the_very_segments_again(tmp_path: Path, channels: str) -> None:
    """A resumed job's segments: the cuts of a first pass, cut again from the audio without the VAD, from
    any point of the plan on, equal the first pass's sample for sample (each channel its own; the
    channels' segments interleave in the plan)."""
    x, _ = joined(SPEECH)
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([x, x[::-1]], axis=1), RATE, subtype="FLOAT")
    first = Recording(path, channels=channels)
    segments = list(first.segments())
    plan = [Cut.of(segment) for segment in segments]
    assert len(plan) >= 3 and (channels == "mix" or {c.speaker for c in plan} == {"ch0", "ch1"})
    for skip in range(len(plan) + 1):
        again = Recording(path, channels=channels, plan=plan[skip:])
        replayed = list(again.segments())
        assert [Cut.of(s) for s in replayed] == plan[skip:]
        for want, got in zip(segments[skip:], replayed, strict=True):
            np.testing.assert_array_equal(got.samples, want.samples)
        assert again.duration_s == first.duration_s


def test_read_spans_json_and_rttm() -> None:
    assert read_spans('[{"start_s": 1, "end_s": 2.5, "speaker": "A"}]') == [Span(1.0, 2.5, "A")]
    assert read_spans('{"segments": [{"start_s": 0, "end_s": 1}]}') == [Span(0.0, 1.0, None)]
    rttm = (
        "SPEAKER call 1 0.50 1.25 <NA> <NA> spk1 <NA> <NA>\n"
        "SPEAKER call 1 2.00 1.00 <NA> <NA> spk2 <NA> <NA>\n"
    )
    assert read_spans(rttm) == [Span(0.5, 1.75, "spk1"), Span(2.0, 3.0, "spk2")]
    for bad, why in (
        ('[{"start": 1}]', "segment 0"),
        ("hello", "RTTM"),
        ('[{"start_s": 1, "end_s": 1.01}]', "shorter"),
    ):
        with pytest.raises(AudioError, match=why) as error:
            read_spans(bad)
        assert error.value.status == 422


def test_a_segments_file_is_read_within_its_limit_and_named_in_errors(tmp_path: Path) -> None:
    """The CLI's --segments-from and the web UI's upload read it alike (read_spans_file)."""
    from emoserve.audio.segments import read_spans_file
    from emoserve.constants import MAX_SPANS_BYTES

    turns = tmp_path / "turns.json"
    turns.write_text('[{"start_s": 1, "end_s": 2.5, "speaker": "A"}]')
    assert read_spans_file(turns) == [Span(1.0, 2.5, "A")]
    turns.write_text(" " * MAX_SPANS_BYTES + "[]")
    with pytest.raises(AudioError, match=r"^turns\.json: over 1 MB"):
        read_spans_file(turns, "turns.json")
    turns.write_bytes(b"\xff[]")
    with pytest.raises(AudioError, match="cannot read"):
        read_spans_file(turns)


# -------------------------------------------------------------------------------------------- scoring


def test_each_segment_scores_as_predict_on_its_slice(
    tiny_recognizer: Any, speech_file: tuple[Path, Any]
) -> None:
    path = speech_file[0]
    x = load_audio(path).samples
    progress: list[tuple[float, float | None]] = []
    timeline = tiny_recognizer.timeline(path, progress=lambda done, total: progress.append((done, total)))
    assert len(timeline.segments) == len(SPEECH)
    for segment in timeline.segments:
        alone = tiny_recognizer.predict(
            (x[round(segment.start_s * RATE) : round(segment.end_s * RATE)], RATE)
        )
        assert segment.emotion == alone.emotion
        for label, p in alone.scores.items():
            assert abs(segment.scores[label] - p) < SCORE_TOL
    assert timeline.random_weights == tiny_recognizer.random_weights
    assert timeline.model == tiny_recognizer.info.name
    assert timeline.duration_s == pytest.approx(len(x) / RATE)
    assert progress[-1][0] == pytest.approx(timeline.duration_s)
    streamed = list(tiny_recognizer.iter_timeline(path))
    assert [s.to_dict() for s in streamed] == [s.to_dict() for s in timeline.segments]


def test_a_one_clip_file_equals_predict(tiny_recognizer: Any) -> None:
    """A file that is one utterance, start to end (no silence around it): one segment, the whole clip."""
    path = AUDIO / "zh_3s_16k.wav"
    timeline = tiny_recognizer.timeline(path, vad=VadSettings(pad_ms=0))
    whole = tiny_recognizer.predict(path)
    (segment,) = timeline.segments
    x = load_audio(path).samples
    alone = tiny_recognizer.predict((x[round(segment.start_s * RATE) : round(segment.end_s * RATE)], RATE))
    assert segment.emotion == alone.emotion
    assert max(abs(segment.scores[k] - v) for k, v in alone.scores.items()) < SCORE_TOL
    assert segment.end_s - segment.start_s > 0.8 * whole.duration_s


def test_summary_is_time_weighted() -> None:
    from emoserve.inference.results import TimelineSegment

    def seg(start: float, end: float, emotion: str, p: float, speaker: str | None) -> TimelineSegment:
        scores = {"happy": p, "sad": 1 - p}
        return TimelineSegment(start, end, speaker, emotion, "", "", max(p, 1 - p), scores, False)

    summary = summarise([seg(0, 3, "happy", 0.9, "A"), seg(3, 4, "sad", 0.2, "B")])
    assert summary["speech_s"] == 4.0
    assert summary["distribution"] == {
        "happy": pytest.approx((3 * 0.9 + 1 * 0.2) / 4),
        "sad": pytest.approx(0.275),
    }
    assert summary["seconds"] == {"happy": 3.0, "sad": 1.0}
    assert summary["dominant"] == "happy"
    assert summary["speakers"]["B"]["dominant"] == "sad"
    assert summarise([])["dominant"] is None


def test_timeline_json_round_trips(tiny_recognizer: Any, speech_file: tuple[Path, Any]) -> None:
    body = json.loads(json.dumps(tiny_recognizer.timeline(speech_file[0]).to_dict()))
    assert set(body) >= {
        "file",
        "duration_s",
        "speech_s",
        "model",
        "random_weights",
        "vad",
        "segments",
        "summary",
    }
    assert set(body["segments"][0]) == {
        "start_s",
        "end_s",
        "speaker",
        "emotion",
        "label_zh",
        "emoji",
        "confidence",
        "scores",
        "split",
        "head",  # None: no head of your own labels was asked for
        "calibrated",  # False: no calibration is served
    }
    assert body["segments"][0]["head"] is None and body["segments"][0]["calibrated"] is False


# ------------------------------------------------------------------------------------------------ memory

# VmHWM: this process's own peak (ru_maxrss would carry pytest's across fork and exec)
PEAK_RSS = """
import sys
from emoserve.audio.segments import Recording
job = Recording(sys.argv[1])
n = sum(1 for _ in job.segments())
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1]
print(n, job.duration_s, int(hwm) // 1024)
"""


def long_file(path: Path, minutes: float) -> Path:
    """Speech and pauses written block by block (never whole in memory): 3 s of clip, 2 s of quiet."""
    speech = clip("zh_3s_16k.wav")[: 3 * RATE]
    pause = np.zeros(2 * RATE, np.float32)
    unit = np.concatenate([speech, pause]) + np.random.default_rng(0).normal(0, 1e-3, 5 * RATE).astype(
        np.float32
    )
    with sf.SoundFile(path, "w", RATE, 1, subtype="PCM_16") as out:
        for _ in range(int(minutes * 60 / 5)):
            out.write(unit)
    return path


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_file(tmp_path: Path) -> None:
    """1 and 20 minutes through decode + VAD + segmentation in fresh processes: the same peak RSS
    (within 30 MB); the 20-minute file alone is 38 MB of PCM, 77 MB as float32."""
    peaks = {}
    for minutes in (1, 20):
        path = long_file(tmp_path / f"{minutes}.wav", minutes)
        out = subprocess.run(
            [sys.executable, "-c", PEAK_RSS, str(path)], capture_output=True, text=True, check=True
        )
        segments, duration, peak_mb = out.stdout.split()
        assert int(segments) == minutes * 12 and float(duration) == pytest.approx(minutes * 60)
        peaks[minutes] = int(peak_mb)
    assert peaks[20] - peaks[1] < 30, peaks


# ------------------------------------------------------------------------------- one reader of inputs


def test_a_timeline_takes_every_input_form_predict_takes(
    tiny_recognizer: Any, speech_file: tuple[Path, Any]
) -> None:
    """`timeline((samples, 16000))` failed with "unsupported input type tuple; pass ... or an (array,
    sample_rate) tuple": the streaming reader knew only files. Every form gives the file's timeline."""
    path, _ = speech_file
    want = tiny_recognizer.timeline(path).to_dict()
    samples, rate = sf.read(path, dtype="float32")
    forms: list[tuple[Any, dict[str, Any]]] = [
        ((samples, rate), {}),
        (samples, {"sample_rate": rate}),
        (sf.read(path, dtype="int16")[0], {"sample_rate": rate}),
        (path.read_bytes(), {}),
        (str(path), {}),
    ]
    for source, options in forms:
        got = tiny_recognizer.timeline(source, **options).to_dict()
        assert bounds_of(got) == bounds_of(want)
        for a, b in zip(got["segments"], want["segments"], strict=True):
            assert a["emotion"] == b["emotion"]
            assert max(abs(a["scores"][k] - b["scores"][k]) for k in a["scores"]) < SCORE_TOL


def bounds_of(timeline: dict[str, Any]) -> list[tuple[float, float]]:
    return [(s["start_s"], s["end_s"]) for s in timeline["segments"]]


def test_an_unsupported_input_names_the_same_accepted_forms_everywhere(tiny_recognizer: Any) -> None:
    from emoserve.audio.decode import ACCEPTED_INPUTS

    for call in (tiny_recognizer.predict, tiny_recognizer.timeline, load_audio):
        with pytest.raises(AudioError) as refused:
            call(12345)
        assert ACCEPTED_INPUTS in str(refused.value) and refused.value.code == "invalid_parameter"
    with pytest.raises(AudioError, match="applies to arrays only"):
        tiny_recognizer.timeline(b"RIFF", sample_rate=16000)
