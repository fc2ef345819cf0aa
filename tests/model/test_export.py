"""The onnx backend: export at conversion, choosing a backend, no torch at run time, int8, the service.

Reference parity of both backends (one clip at a time and padded batches, both granularities) is in
test_recognizer.py."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from emoserve.cli import main
from emoserve.inference import backend
from emoserve.inference.recognizer import Recognizer, load_model
from emoserve.model import export as onnx_export
from emoserve.model.convert import convert
from emoserve.model.entry import read_entry
from tests.support.paths import FIXTURE
from tests.support.reference import SCORE_TOL, copy_fixture, wave

CLIP = FIXTURE / "audio" / "zh_3s_16k.wav"


def scores(result: Any) -> list[float]:
    return list(result.scores.values())


def test_conversion_records_a_checked_graph(tiny_onnx_entry: Path) -> None:
    info = read_entry(tiny_onnx_entry)
    record = info.onnx["float32"]
    assert info.onnx_graph("float32") == tiny_onnx_entry / "model.onnx"
    assert (tiny_onnx_entry / record["data"]).stat().st_size > 0  # the weights, beside the graph
    assert record["parity"]["scores"] <= onnx_export.SCORE_TOL
    assert record["parity"]["frame_scores"] <= onnx_export.SCORE_TOL
    assert record["parity"]["embeddings"] <= onnx_export.EMBEDDING_TOL
    assert not [p.name for p in tiny_onnx_entry.iterdir() if p.name.startswith(".")]  # no work files left


@pytest.mark.parametrize("runtime", ["onnx", "openvino"])
def test_the_graph_backends_never_import_torch(
    tiny_onnx_entry: Path, tiny_recognizer: Recognizer, runtime: str
) -> None:
    """As in an environment without torch: importing it fails, and load + predict (both granularities,
    embeddings, a padded batch) still work and give the torch backend's numbers at float32."""
    code = f"""
import importlib.abc, json, sys
class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is not installed here")
sys.meta_path.insert(0, NoTorch())
import numpy as np
import emoserve
rec = emoserve.load_model({str(tiny_onnx_entry)!r}, backend={runtime!r}, dtype="float32", threads=1)
frame = rec.predict({str(CLIP)!r}, "frame", embedding=True)
batch = rec.predict_many([(np.load({str(FIXTURE / "waves" / "en_1s_16k.wav.npz")!r})["wave"], 16000),
                          {str(CLIP)!r}], batch_size=2, max_padding=None)
print(json.dumps({{"backend": rec.backend.name, "torch": "torch" in sys.modules, "frame": frame.scores,
                  "frames": len(frame.frames), "emb": frame.embedding.shape,
                  "batch": [r.scores for r in batch]}}))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout.splitlines()[-1])
    assert got["backend"] == runtime and got["torch"] is False
    want = tiny_recognizer.predict(CLIP, "frame", embedding=True)
    assert got["frames"] == len(want.frames or []) and tuple(got["emb"]) == want.embedding.shape
    np.testing.assert_allclose(list(got["frame"].values()), scores(want), atol=SCORE_TOL)
    np.testing.assert_allclose(list(got["batch"][1].values()), scores(want), atol=SCORE_TOL)


def test_auto_picks_the_fastest_runtime_installed_on_a_cpu_when_the_graph_is_there(
    tiny_onnx_entry: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """float32: onnx, then openvino (backend.FASTEST); torch when asked for."""
    assert load_model(tiny_onnx_entry, dtype="float32", threads=1).backend.name == "onnx"
    assert load_model(tiny_onnx_entry, backend="torch", dtype="float32", threads=1).backend.name == "torch"
    monkeypatch.setattr(backend, "onnxruntime_installed", lambda: False)
    assert load_model(tiny_onnx_entry, dtype="float32", threads=1).backend.name == "openvino"


def test_an_entry_without_a_graph_runs_on_torch_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    entry = convert(FIXTURE / "model", tmp_path / "entry", onnx=False)
    with caplog.at_level(logging.WARNING, "emoserve"):
        rec = load_model(entry, dtype="float32")
    assert rec.backend.name == "torch"
    [line] = [
        r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "ONNX" in r.getMessage()
    ]
    assert "emoserve convert" in line


def test_without_a_graph_runtime_auto_falls_back_to_torch_with_one_line(
    tiny_onnx_entry: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(backend, "onnxruntime_installed", lambda: False)
    monkeypatch.setattr(backend, "openvino_installed", lambda: False)
    with caplog.at_level(logging.INFO, "emoserve"):
        rec = load_model(tiny_onnx_entry, dtype="float32", threads=1)
    assert rec.backend.name == "torch"
    lines = [r.getMessage() for r in caplog.records if "not installed" in r.getMessage()]
    assert len(lines) == 1 and "onnxruntime and openvino are not installed" in lines[0]
    with pytest.raises(ValueError, match="needs onnxruntime"):
        load_model(tiny_onnx_entry, backend="onnx")
    with pytest.raises(ValueError, match="needs openvino"):
        load_model(tiny_onnx_entry, backend="openvino")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"backend": "torch", "dtype": "int8"}, "int8 runs on the onnx backend"),
        ({"backend": "onnx", "device": "cuda"}, "runs on the CPU"),
        ({"backend": "openvino", "device": "cuda"}, "runs on the CPU"),
        ({"backend": "openvino", "dtype": "int8"}, "int8 runs on the onnx backend"),
        ({"backend": "onnx", "dtype": "bfloat16", "device": "cpu"}, "onnx backend runs float32 or int8"),
        ({"device": "cpu", "dtype": "float16"}, "float16 is for GPUs"),
        ({"backend": "tensorrt"}, "backend is 'tensorrt'"),
        ({"dtype": "int4"}, "dtype is 'int4'"),
    ],
)
def test_options_that_do_not_go_together_are_refused(
    tiny_onnx_entry: Path, options: dict[str, str], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        load_model(tiny_onnx_entry, **options)  # type: ignore[arg-type]


def test_int8_is_close_to_float32_and_its_deltas_are_reported(
    tiny_onnx_entry: Path, tiny_onnx: Recognizer, capsys: pytest.CaptureFixture[str]
) -> None:
    rec = load_model(tiny_onnx_entry, dtype="int8", threads=1)  # int8 only when asked for: onnx
    assert (rec.backend.name, rec.dtype) == ("onnx", "int8")
    for clip in ("en_1s_16k.wav", "zh_3s_16k.wav"):
        got, want = rec.predict((wave(clip), 16000)), tiny_onnx.predict((wave(clip), 16000))
        delta = np.abs(np.array(scores(got)) - np.array(scores(want))).max()
        assert 0 < delta < 0.05, clip  # quantized (not the float32 graph), and close to it
    assert main(["info", str(tiny_onnx_entry)]) == 0
    reported = json.loads(capsys.readouterr().out)["onnx"]["int8"]["parity"]
    assert 0 < reported["scores"] < 0.05 and reported["embeddings"] > 0


def test_an_entry_without_a_graph_gets_it_from_convert_or_when_onnx_is_asked_for(tmp_path: Path) -> None:
    entry = convert(FIXTURE / "model", tmp_path / "entry", onnx=False)
    assert read_entry(entry).onnx_graph() is None
    rec = load_model(entry, backend="onnx", dtype="float32", threads=1)  # exported once, into the entry
    assert rec.backend.name == "onnx" and read_entry(entry).onnx_graph() is not None
    assert main(["convert", str(entry)]) == 0  # already there: nothing to do, and it says where
    assert read_entry(entry).onnx_graph() is not None


def test_a_failed_export_leaves_a_working_entry_that_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(model: Any, path: Path) -> Path:
        raise RuntimeError("exporter exploded")

    monkeypatch.setattr(onnx_export, "export", broken)
    entry = convert(FIXTURE / "model", tmp_path / "entry", onnx=True)
    info = read_entry(entry)
    assert info.onnx_graph() is None and "exporter exploded" in info.onnx["float32"]["error"]
    assert not list(entry.glob("*.onnx*"))
    with caplog.at_level(logging.WARNING, "emoserve"):
        assert load_model(entry, dtype="float32").backend.name == "torch"
    assert any("exporter exploded" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="exporter exploded"):
        load_model(entry, backend="onnx")


def test_an_interrupted_export_leaves_no_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(model: Any, path: Path) -> Path:
        path.write_bytes(b"half a graph")
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx_export, "export", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert(FIXTURE / "model", tmp_path / "entry", onnx=True)
    assert list(tmp_path.iterdir()) == []


def test_a_changed_source_is_converted_and_exported_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    exports: list[Path] = []

    def fake_write(model: Any, dest: Path, dtype: str = "float32") -> dict[str, Any]:
        (dest / "model.onnx").write_bytes(f"graph {len(exports)}".encode())
        exports.append(dest)
        return {"file": "model.onnx"}

    monkeypatch.setattr(onnx_export, "write_onnx", fake_write)
    monkeypatch.setenv("EMOSERVE_EXPORT_ONNX", "1")
    model_dir = copy_fixture(tmp_path)
    entry = load_model(model_dir, backend="torch", dtype="float32").info.path
    assert (entry / "model.onnx").read_text() == "graph 0"
    os.utime(model_dir / "model.pt", ns=(1, 1))  # "changed": another mtime
    assert load_model(model_dir, backend="torch", dtype="float32").info.path == entry
    assert (entry / "model.onnx").read_text() == "graph 1" and len(exports) == 2


def test_the_service_runs_on_the_onnx_backend(
    tiny_onnx_entry: Path, tiny_recognizer: Recognizer, tmp_path: Path
) -> None:
    """Warm-up (with its output checks), the engine, the API and /v1/model, unchanged on onnx."""
    from tests.support.server import LIVE, assert_same_result, live_server

    settings = dataclasses.replace(LIVE, model=str(tiny_onnx_entry), backend="onnx")
    with live_server(settings, tmp_path / "home") as live:
        info = live.client.get("/v1/model").json()
        assert (info["backend"], info["device"], info["dtype"]) == ("onnx", "cpu", "float32")
        response = live.client.post(
            "/v1/recognize", files={"file": CLIP.read_bytes()}, params={"granularity": "frame"}
        )
        assert response.status_code == 200, response.text
        assert_same_result(response.json(), tiny_recognizer.predict(CLIP, "frame"))


def test_arbitrary_lengths_reach_onnx_runtime_as_a_bounded_set_of_widths(
    tiny_onnx_entry: Path, tiny_recognizer: Recognizer
) -> None:
    """ONNX Runtime keeps a memory plan per input shape for the session's life (~10 KB each): a batch
    is padded to one of 32 widths per octave, so traffic of any lengths makes few shapes; the results
    are those of the unpadded clips."""
    from emoserve.model.interface import bucket_width

    for n in (1, 319, 320, 321, 10_240, 16_001, 47_999, 959_999):
        assert n <= bucket_width(n) < max(n * 33 / 32, n + 320)
    assert len({bucket_width(n) for n in range(16_000, 60 * 16_000)}) < 200  # 1 s to 60 s

    model = load_model(tiny_onnx_entry, backend="onnx", dtype="float32", threads=1, progress=False)
    session, widths = model.backend.session, set()

    class Spy:
        def run(self, names: Any, feeds: dict[str, np.ndarray], options: Any = None) -> Any:
            widths.add(feeds["waves"].shape[1])
            return session.run(names, feeds, options)

    model.backend.session = Spy()
    full = wave("en_7s_16k.flac")
    lengths = np.random.default_rng(0).integers(48_000, 49_000, 12)  # 12 lengths around 3 s
    for n in lengths:
        clip = full[:n]
        got, want = model.predict(clip, sample_rate=16_000), tiny_recognizer.predict(clip, sample_rate=16_000)
        np.testing.assert_allclose(scores(got), scores(want), atol=SCORE_TOL)
    assert len(set(lengths.tolist())) == 12 and len(widths) <= 2  # 1,024-sample steps at 2-4 s
    assert all(w == bucket_width(w) for w in widths)
