"""The `emoserve` command line, run in-process through `main` and once as a real process."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from emoserve.cli import main
from tests.support.paths import FIXTURE
from tests.support.reference import SCORE_TOL, expected

MODEL = str(FIXTURE / "model")


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A folder tree with three good clips, one bad one and a non-audio file."""
    root = tmp_path / "clips"
    (root / "sub").mkdir(parents=True)
    shutil.copy(FIXTURE / "audio" / "en_1s_16k.wav", root / "a.wav")
    shutil.copy(FIXTURE / "audio" / "zh_1s_16k.ogg", root / "sub" / "b.ogg")
    shutil.copy(FIXTURE / "audio" / "en_7s_16k.flac", root / "sub" / "c.flac")
    (root / "sub" / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    (root / "notes.txt").write_text("not audio, not picked up by a folder walk")
    return root


def test_help_does_not_import_torch() -> None:
    code = (
        "import json, sys; from emoserve.cli import main\ntry: main(['--help'])\nexcept SystemExit: pass\n"
        "print(json.dumps(sorted(sys.modules)))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    imported = json.loads(done.stdout.splitlines()[-1])
    assert "torch" not in imported


def test_predict_folder_scores_all_but_the_bad_file(
    capsys: pytest.CaptureFixture[str], folder: Path, tmp_path: Path
) -> None:
    code, out, err = run(
        capsys,
        "predict",
        str(folder),
        "--model",
        MODEL,
        "--format",
        "jsonl",
        "--embeddings",
        str(tmp_path / "emb"),
    )
    assert code == 1, err  # one file failed
    rows = {Path(r["file"]).name: r for r in map(json.loads, out.splitlines())}
    assert set(rows) == {"a.wav", "b.ogg", "c.flac", "broken.wav"}
    assert rows["broken.wav"]["error"] and "broken.wav" in rows["broken.wav"]["error"]
    assert "broken.wav" in err and "1 of 4 files failed" in err
    good = rows["a.wav"]
    assert good["error"] is None and good["random_weights"] is False and good["granularity"] == "utterance"
    assert (good["backend"], good["dtype"]) == ("torch", "float32")  # EMOSERVE_DTYPE pinned; no ONNX graph
    assert set(good) >= {
        "file",
        "emotion",
        "label_zh",
        "emoji",
        "confidence",
        "scores",
        "duration_s",
        "frames",
        "embedding",
        "model",
        "random_weights",
        "error",
    }
    np.testing.assert_allclose(
        list(good["scores"].values()), expected("en_1s_16k.wav", "utterance")["scores"], atol=SCORE_TOL
    )
    emb = np.load(good["embedding"])
    np.testing.assert_allclose(emb, expected("en_1s_16k.wav", "utterance")["feats"], atol=1e-4)
    assert sorted(p.name for p in (tmp_path / "emb").iterdir()) == ["a.npy", "b.npy", "c.npy"]


def test_predict_glob_writes_csv(capsys: pytest.CaptureFixture[str], folder: Path, tmp_path: Path) -> None:
    (folder / "sub" / "broken.wav").unlink()
    target = tmp_path / "out.csv"
    code, out, _ = run(
        capsys,
        "predict",
        str(folder / "**" / "*.*"),
        "--model",
        MODEL,
        "--output",
        str(target),
        "--format",
        "csv",
        "--granularity",
        "frame",
        "--batch-size",
        "2",
    )
    assert code == 1 and out == ""  # notes.txt, named by the glob, is tried and fails
    rows = list(csv.DictReader(target.read_text(encoding="utf-8").splitlines()))
    assert sorted(Path(r["file"]).name for r in rows) == ["a.wav", "b.ogg", "c.flac", "notes.txt"]
    by_name = {Path(r["file"]).name: r for r in rows}
    assert by_name["notes.txt"]["error"]  # named by the glob, so tried and reported
    assert by_name["a.wav"]["emotion"] and len(by_name["a.wav"]["frames"].split()) == 49
    assert float(by_name["a.wav"]["score_happy"]) >= 0 and by_name["a.wav"]["error"] == ""
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.csv")]  # no temp file left


def test_interrupted_output_leaves_no_half_written_file(
    monkeypatch: pytest.MonkeyPatch, folder: Path, tmp_path: Path
) -> None:
    from emoserve.inference import corpus as batch

    def explode(*_args: object, **_kw: object):  # type: ignore[no-untyped-def]
        yield batch.Outcome("x.wav", error="first")
        raise KeyboardInterrupt

    monkeypatch.setattr(batch, "score_files", explode)
    target = tmp_path / "out.jsonl"
    assert main(["predict", str(folder), "--model", MODEL, "--output", str(target)]) == 130
    assert list(tmp_path.iterdir()) == [folder]


def test_output_to_a_device_writes_to_it_and_leaves_it_a_device(
    capsys: pytest.CaptureFixture[str], folder: Path, tmp_path: Path
) -> None:
    """`-o /dev/null` renamed its temporary file over /dev/null (as root, /dev/null became a regular file:
    a full test run left it so, through benchmarks/timeline.py). A target that is not a regular file is
    written to as it is; checked on a FIFO here, so that a regression cannot damage the machine's /dev."""
    import os
    import stat

    out = tmp_path / "out"
    out.mkdir()
    fifo = out / "results.fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # held open: the CLI's writer never blocks
    try:
        code, _, _ = run(capsys, "predict", str(folder / "a.wav"), "--model", MODEL, "-o", str(fifo))
        received = os.read(reader, 1 << 16)  # one jsonl line: well inside the pipe's buffer
    finally:
        os.close(reader)
    assert code == 0 and stat.S_ISFIFO(fifo.stat().st_mode)
    assert json.loads(received)["file"] == str(folder / "a.wav")
    assert [p.name for p in out.iterdir()] == ["results.fifo"]  # no temporary file left beside it


def test_missing_path_is_reported(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, _ = run(
        capsys,
        "predict",
        str(tmp_path / "nope.wav"),
        str(FIXTURE / "audio" / "en_1s_16k.wav"),
        "--model",
        MODEL,
        "--format",
        "jsonl",
    )
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 1 and rows[0]["error"] and "nope.wav" in rows[0]["error"] and rows[1]["error"] is None


def test_random_weights_are_labelled(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, _ = run(capsys, "make-test-model", "--out", str(tmp_path / "m"), "--seed", "1")
    assert code == 0 and "RANDOM" in out
    predict = [
        "predict",
        str(FIXTURE / "audio" / "en_1s_16k.wav"),
        "--model",
        str(tmp_path / "m"),
        "--format",
    ]
    code, out, err = run(capsys, *predict, "table")
    assert code == 0 and "RANDOM weights" in err and "(RANDOM WEIGHTS)" in out
    code, out, _ = run(capsys, *predict, "jsonl")
    assert json.loads(out)["random_weights"] is True


def test_info_and_convert(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, _ = run(capsys, "info", MODEL)
    info = json.loads(out)
    assert code == 0 and info["config"]["embed_dim"] == 64 and "model.pt" in info["files"]
    code, out, _ = run(capsys, "convert", MODEL, "--out", str(tmp_path / "entry"))
    assert code == 0 and (tmp_path / "entry" / "model.safetensors").is_file()
    code, out, _ = run(capsys, "info", str(tmp_path / "entry"))
    assert json.loads(out)["parameters"] == info["parameters"]


def test_bad_model_is_a_clear_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run(
        capsys, "predict", str(FIXTURE / "audio" / "en_1s_16k.wav"), "--model", "no-such-model"
    )
    assert code == 2 and "neither a directory nor a known name" in err


# ------------------------------------------------------------------------------------- --segments


@pytest.fixture
def recording(tmp_path: Path) -> Path:
    import soundfile as sf

    from tests.support.audio import SPEECH, joined

    x, _ = joined(SPEECH)
    path = tmp_path / "call.wav"
    sf.write(path, x, 16_000, subtype="PCM_16")
    return path


def test_segments_jsonl_is_a_line_per_segment_then_a_summary(
    capsys: pytest.CaptureFixture[str], recording: Path, tmp_path: Path, tiny_recognizer: object
) -> None:
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not audio" * 10)
    code, out, err = run(
        capsys,
        "predict",
        str(recording),
        str(bad),
        "--segments",
        "--model",
        MODEL,
        "--format",
        "jsonl",
        "--max-seconds",
        "5",  # a file longer than --max-seconds is fine in --segments mode
    )
    assert code == 1 and "1 of 2 files failed" in err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["type"] for line in lines] == ["segment"] * 4 + ["summary", "error"]
    want = tiny_recognizer.timeline(recording)  # type: ignore[attr-defined]
    for line, segment in zip(lines, want.segments, strict=False):
        assert line["file"] == str(recording) and line["start_s"] == segment.start_s
        assert line["emotion"] == segment.emotion
        assert abs(line["confidence"] - segment.confidence) < SCORE_TOL
    assert lines[4]["file"] == str(recording) and lines[4]["summary"]["segments"] == 4
    assert lines[5]["file"] == str(bad) and "could not decode" in lines[5]["error"]["message"]
    assert lines[5]["error"]["code"] == "unsupported_audio"


class NanOnFirstCall:
    """A backend whose first model call gives NaN logits (the first file's segments), then the truth."""

    def __init__(self, backend: Any) -> None:
        self.backend, self.calls = backend, 0
        self.name, self.device, self.dtype = backend.name, backend.device, backend.dtype

    def run(self, waves: np.ndarray, lengths: np.ndarray, frames: bool) -> Any:
        out = self.backend.run(waves, lengths, frames)
        self.calls += 1
        if self.calls == 1:
            out.logits[:] = np.nan
        return out


def test_segments_isolate_a_file_whose_model_output_is_not_finite(
    capsys: pytest.CaptureFixture[str], recording: Path, monkeypatch: pytest.MonkeyPatch, tiny_recognizer: Any
) -> None:
    """A non-finite model output aborted the whole `predict --segments` run (only AudioError was caught);
    now, as in plain `predict`, it is one error line for that file, the others go on, exit status 1."""
    from emoserve.inference import recognizer as recognizers

    nan = recognizers.Recognizer(NanOnFirstCall(tiny_recognizer.backend), tiny_recognizer.info)
    monkeypatch.setattr(recognizers, "load_model", lambda *args, **kwargs: nan)
    second = recording.with_name("second.wav")
    shutil.copy(recording, second)
    code, out, err = run(
        capsys, "predict", str(recording), str(second), "--segments", "--model", MODEL, "--format", "jsonl"
    )
    lines = [json.loads(line) for line in out.splitlines()]
    assert code == 1 and "1 of 2 files failed" in err
    assert lines[0] == {"type": "error", "file": str(recording), "error": lines[0]["error"]}
    assert lines[0]["error"]["code"] == "invalid_model_output"
    assert [line["type"] for line in lines[1:]] == ["segment"] * 4 + ["summary"]
    assert {line["file"] for line in lines[1:]} == {str(second)}


def test_segments_csv_table_and_options(
    capsys: pytest.CaptureFixture[str], recording: Path, tmp_path: Path
) -> None:
    out_csv = tmp_path / "out.csv"
    code, _, _ = run(
        capsys,
        "predict",
        str(recording),
        "--segments",
        "--model",
        MODEL,
        "--format",
        "csv",
        "-o",
        str(out_csv),
        "--max-segment-s",
        "2",
        "--vad-threshold",
        "0.4",
    )
    rows = list(csv.DictReader(out_csv.read_text(encoding="utf-8").splitlines()))
    assert code == 0 and len(rows) > 4  # the 3 s clips are cut under 2 s
    assert all(float(r["end_s"]) - float(r["start_s"]) <= 2.0 for r in rows)
    assert {r["split"] for r in rows} == {"True", "False"} and "score_happy" in rows[0]

    segments = tmp_path / "turns.rttm"
    segments.write_text("SPEAKER call 1 1.0 2.0 <NA> <NA> agent <NA> <NA>\n")
    code, out, _ = run(
        capsys,
        "predict",
        str(recording),
        "--segments-from",
        str(segments),
        "--model",
        MODEL,
        "--format",
        "table",
    )
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == 2 and "1.00-    3.00 s  [agent]" in lines[0] and "summary" in lines[1]

    code, _, err = run(
        capsys, "predict", str(recording), "--segments", "--model", MODEL, "--vad-threshold", "7"
    )
    assert code == 2 and "threshold" in err


def test_predict_reads_out_with_labels_a_threshold_and_a_calibration(
    tmp_path: Path, tiny_recognizer: Any
) -> None:
    """--labels, --min-confidence and --calibration: the rows say what the library says with the same."""
    from emoserve.inference.confidence import Calibration, save_calibration
    from emoserve.model.head import model_identity
    from tests.support.paths import CLIP

    labels = tuple(label.en for label in tiny_recognizer.labels)
    meta = {"model": model_identity(tiny_recognizer.info)}
    save_calibration(tmp_path / "cal", Calibration("temperature", labels, 3.0, meta=meta), {})
    model = ["-m", str(FIXTURE / "model"), "--backend", "torch"]
    rows = tmp_path / "rows.jsonl"
    argv = ["predict", str(CLIP), "--labels", "iemocap4", "--min-confidence", "1", "-o", str(rows), *model]
    assert main(argv) == 0
    row = json.loads(rows.read_text())
    expected_scores = tiny_recognizer.predict(CLIP, labels="iemocap4").scores
    assert row["emotion"] == "uncertain" and list(row["scores"]) == list(expected_scores)
    assert np.allclose(list(row["scores"].values()), list(expected_scores.values()), atol=SCORE_TOL)
    table = tmp_path / "rows.csv"
    assert (
        main(["predict", str(CLIP), "--labels", "angry,sad", "--format", "csv", "-o", str(table), *model])
        == 0
    )
    header = table.read_text().splitlines()[0].split(",")
    assert [c for c in header if c.startswith("score_")] == ["score_angry", "score_sad"]
    assert main(["predict", str(CLIP), "--calibration", str(tmp_path / "cal"), "-o", str(rows), *model]) == 0
    calibrated = json.loads(rows.read_text())
    raw = np.array(list(tiny_recognizer.predict(CLIP).scores.values()))
    z = np.log(raw) / 3.0
    assert calibrated["calibrated"] is True
    assert np.allclose(list(calibrated["scores"].values()), np.exp(z) / np.exp(z).sum(), atol=SCORE_TOL)
    assert main(["predict", str(CLIP), "--labels", "joy,anger", *model]) == 2  # a clear error, exit 2
