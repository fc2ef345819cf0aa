"""Never a wrong number: verified cache entries, damaged ones rebuilt or refused, non-finite outputs
refused everywhere, summarised mismatches, and test models in the complete published layout."""

from __future__ import annotations

import dataclasses
import logging
import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from emoserve.cli import main
from emoserve.errors import ModelOutputError, WeightsError
from emoserve.inference.corpus import score_files
from emoserve.inference.recognizer import Recognizer, load_model
from emoserve.model.config import PRESETS, ModelConfig
from emoserve.model.convert import convert
from emoserve.model.entry import check_entry, read_manifest
from emoserve.model.interface import Outputs
from emoserve.model.testing import published_config_yaml
from tests.support.paths import FIXTURE
from tests.support.reference import copy_fixture, wave

CLIP = FIXTURE / "audio" / "zh_3s_16k.wav"


def flip_last_byte(path: Path) -> None:
    """A change of the same size: the lowest mantissa bit of the last float (the head's last bias)."""
    data = bytearray(path.read_bytes())
    data[-4] ^= 1
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------------------------------------- entries


def test_conversion_records_content_hashes_and_verify_passes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    entry = convert(FIXTURE / "model", tmp_path / "entry")
    files = read_manifest(entry)["files"]
    assert set(files) == {"model.safetensors", "config.json", "tokens.txt"}
    assert check_entry(entry, full=True) == []
    assert main(["verify", str(entry)]) == 0
    assert "ok" in capsys.readouterr().out


def test_verify_finds_a_changed_byte_that_the_cheap_check_cannot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    entry = convert(FIXTURE / "model", tmp_path / "entry")
    flip_last_byte(entry / "model.safetensors")
    assert check_entry(entry) == []  # same size, same header: only the hash tells
    assert main(["verify", str(entry)]) == 1
    assert "DAMAGED" in capsys.readouterr().err
    assert main(["info", str(entry), "--verify"]) == 1
    assert "model.safetensors has changed" in capsys.readouterr().out


def test_a_damaged_entry_is_rebuilt_from_its_source(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, tiny_recognizer: Recognizer
) -> None:
    model_dir = copy_fixture(tmp_path)
    entry = load_model(model_dir, backend="torch", dtype="float32").info.path
    with (entry / "model.safetensors").open("r+b") as f:
        f.truncate(1000)  # a download or disk that stopped half-way
    with caplog.at_level(logging.WARNING, "emoserve"):
        rebuilt = load_model(model_dir, backend="torch", dtype="float32")
    warned = [r.getMessage() for r in caplog.records]
    assert any("damaged" in m and "converting it again" in m for m in warned)
    assert check_entry(rebuilt.info.path, full=True) == []
    got, want = rebuilt.predict(CLIP), tiny_recognizer.predict(CLIP)
    np.testing.assert_allclose(list(got.scores.values()), list(want.scores.values()), atol=1e-6)


def test_a_damaged_entry_without_its_source_is_refused_in_one_sentence(tmp_path: Path) -> None:
    model_dir = copy_fixture(tmp_path)
    entry = load_model(model_dir, backend="torch", dtype="float32").info.path
    shutil.rmtree(model_dir)
    (entry / "tokens.txt").write_text("garbage")
    with pytest.raises(WeightsError) as caught:
        load_model(entry, backend="torch", dtype="float32")
    message = str(caught.value)
    assert "tokens.txt is 7 bytes" in message and "delete this directory" in message
    assert "\n" not in message


def test_a_mismatched_config_is_summarised(tmp_path: Path) -> None:
    model_dir = copy_fixture(tmp_path)
    raw = yaml.safe_load((model_dir / "config.yaml").read_text())
    raw["model_conf"]["embed_dim"] = 96  # says 96, the checkpoint holds 64
    (model_dir / "config.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(WeightsError) as caught:
        convert(model_dir, tmp_path / "entry")
    message = str(caught.value)
    assert "tensors differ" in message and "wrong shape" in message and "expected (" in message
    assert len(message) < 700 and message.count("d2v_model") <= 3


# ------------------------------------------------------------------------------- non-finite outputs


class NanFor:
    """A backend wrapper whose outputs are NaN for clips of one length."""

    def __init__(self, backend: Any, samples: int) -> None:
        self.backend, self.samples = backend, samples
        self.name, self.device, self.dtype = backend.name, backend.device, backend.dtype

    def run(self, waves: np.ndarray, lengths: np.ndarray, frames: bool) -> Outputs:
        out = self.backend.run(waves, lengths, frames)
        for i, n in enumerate(lengths):
            if n == self.samples:
                out.logits[i] = np.nan
        return out


def nan_recognizer(recognizer: Recognizer, samples: int) -> Recognizer:
    return Recognizer(NanFor(recognizer.backend, samples), recognizer.info)  # type: ignore[arg-type]


def test_non_finite_outputs_are_an_error_never_a_result(tiny_recognizer: Recognizer) -> None:
    bad = wave("en_1s_16k.wav")
    rec = nan_recognizer(tiny_recognizer, len(bad))
    with pytest.raises(ModelOutputError, match=r"non-finite outputs.*bad\.wav"):
        rec.predict(_audio(bad, "bad.wav"))
    assert rec.predict((wave("zh_3s_16k.wav"), 16000)).emotion  # other clips are fine


def test_the_cli_fails_only_the_file_with_non_finite_outputs(tiny_recognizer: Recognizer) -> None:
    files = [str(FIXTURE / "audio" / name) for name in ("en_1s_16k.wav", "zh_3s_16k.wav")]
    rec = nan_recognizer(tiny_recognizer, len(wave("en_1s_16k.wav")))
    outcomes = list(score_files(rec, files, batch_size=2))
    assert outcomes[0].result is None and "non-finite" in (outcomes[0].error or "")
    assert outcomes[1].result is not None and outcomes[1].error is None


def test_the_server_answers_500_with_a_code_for_non_finite_outputs(tmp_path: Path) -> None:
    from tests.support.server import LIVE, assert_error, live_server

    with live_server(LIVE, tmp_path / "home") as live:
        engine = live.service.engine
        assert engine is not None
        good = engine.recognizer
        engine.recognizer = nan_recognizer(good, len(wave("zh_3s_16k.wav")))
        try:
            response = live.client.post("/v1/recognize", content=CLIP.read_bytes())
            assert_error(response, 500, "invalid_model_output")
            ok = live.client.post("/v1/recognize", content=(FIXTURE / "audio" / "en_1s_16k.wav").read_bytes())
            assert ok.status_code == 200
        finally:
            engine.recognizer = good


@pytest.fixture
def hold_verification(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """The server's background hash waits for the returned event: the tiny model hashes in microseconds,
    and a test must see "ready" first (the cheap check of /readyz goes through)."""
    from emoserve.model import entry as entries

    release = threading.Event()

    def check_after_ready(path: Path, *, full: bool = False) -> list[str]:
        if full:
            release.wait(30)
        return check_entry(path, full=full)

    monkeypatch.setattr(entries, "check_entry", check_after_ready)
    return release


def test_the_server_turns_failed_when_its_model_files_change_and_their_source_is_gone(
    tmp_path: Path, hold_verification: threading.Event
) -> None:
    from tests.support.server import LIVE, assert_error, live_server, wait_for

    entry = convert(copy_fixture(tmp_path), tmp_path / "entry")
    shutil.rmtree(tmp_path / "model")
    settings = dataclasses.replace(LIVE, model=str(entry), verify_model=True)
    flip_last_byte(entry / "model.safetensors")  # loads and warms up fine: only the hash tells
    with live_server(settings, tmp_path / "home") as live:
        assert live.client.get("/readyz").status_code == 200
        hold_verification.set()
        wait_for(lambda: live.service.phase == "failed", 30, "the background verification")
        ready = live.client.get("/readyz")
        assert ready.status_code == 503 and "model files damaged" in ready.text
        assert_error(live.client.post("/v1/recognize", content=CLIP.read_bytes()), 503, "start_up_failed")


def test_the_server_converts_changed_model_files_again_from_their_source_and_serves_again(
    tmp_path: Path, hold_verification: threading.Event, tiny_recognizer: Recognizer
) -> None:
    from tests.support.server import LIVE, live_server, wait_for

    entry = convert(copy_fixture(tmp_path), tmp_path / "entry")
    settings = dataclasses.replace(LIVE, model=str(entry), verify_model=True)
    flip_last_byte(entry / "model.safetensors")
    with live_server(settings, tmp_path / "home") as live:
        first_engine = live.service.engine
        states: list[str] = []
        hold_verification.set()

        def serving_again() -> bool:
            states.append(live.service.state)
            return live.service.ready and live.service.engine is not first_engine

        wait_for(serving_again, 60, "the rebuilt model to be served")
        assert any(s.startswith("loading: model files damaged") for s in states), states
        assert first_engine is not None and not first_engine.accepting  # its numbers are served no more
        assert check_entry(entry, full=True) == []
        assert live.client.get("/readyz").status_code == 200
        got = live.client.post("/v1/recognize", content=CLIP.read_bytes())
        assert got.status_code == 200, got.text
        want = tiny_recognizer.predict(CLIP).scores  # the fixture's weights, not the changed ones
        assert list(got.json()["scores"]) == list(want)
        np.testing.assert_allclose(list(got.json()["scores"].values()), list(want.values()), atol=1e-5)


# ------------------------------------------------------------------------------- published layout


def keys(tree: Any, prefix: str = "") -> set[str]:
    if not isinstance(tree, dict):
        return set()
    return {f"{prefix}{k}" for k in tree} | {x for k, v in tree.items() for x in keys(v, f"{prefix}{k}.")}


@pytest.mark.parametrize("preset", ["tiny", "base", "large"])
def test_make_test_model_writes_the_complete_published_config(preset: str) -> None:
    written = yaml.safe_load(published_config_yaml(PRESETS[preset], preset))
    published = yaml.safe_load((FIXTURE / "model" / "config.yaml").read_text())
    assert keys(written) == keys(published)  # every key FunASR reads, training ones included
    assert written["model_conf"]["start_drop_path_rate"] == 0.0
    assert ModelConfig.from_yaml_dict(written) == PRESETS[preset]


def _audio(samples: np.ndarray, source: str) -> Any:
    from emoserve.audio.decode import Audio

    return Audio(samples, source, 16000, 1, "array", None, False)


def test_a_conversion_killed_midway_leaves_nothing_that_loads(tmp_path: Path) -> None:
    """SIGKILL during the ONNX export (the longest step): no entry, and the next conversion works."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "entry"
    process = subprocess.Popen(
        [sys.executable, "-m", "emoserve.cli", "convert", str(FIXTURE / "model"), "--out", str(out)],
        env={**os.environ, "EMOSERVE_HOME": str(tmp_path / "home")},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".entry.*/entry/model.safetensors")):  # the weights are written: exporting
        assert process.poll() is None and time.monotonic() < deadline, "the conversion ended too early"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait(10)
    assert not out.exists() and list(tmp_path.glob(".entry.*"))  # only the hidden work directory
    with pytest.raises(WeightsError, match="neither a directory nor a known name"):
        load_model(out, dtype="float32")
    assert convert(FIXTURE / "model", out, onnx=False) == out and check_entry(out, full=True) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry"]  # the killed one's work is gone


def test_only_the_work_directories_of_dead_processes_are_swept(tmp_path: Path) -> None:
    import subprocess
    import sys

    from emoserve.files import sweep, work_dir

    child = (  # a download's work directory whose process is killed (it prints the path, then hangs)
        "import sys, time, pathlib; from emoserve.files import work_dir\n"
        "with work_dir(pathlib.Path(sys.argv[1]), suffix='.partial') as w:\n"
        "    (w / 'model.pt').write_bytes(b'x' * 1000); print(w, flush=True); time.sleep(60)\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", child, str(tmp_path / "model")], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    dead = Path(process.stdout.readline().strip())
    assert (dead / "model.pt").is_file()
    (tmp_path / ".other.lock").write_text("another program's lock\n")  # not ours: left alone
    (tmp_path / ".other").mkdir()
    with work_dir(tmp_path / "model") as alive:
        assert sweep(tmp_path) == []  # both working: nothing to remove
        process.kill()
        process.communicate(timeout=10)
        assert sweep(tmp_path) == [dead]
        assert alive.is_dir() and not dead.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other", ".other.lock"]


def test_a_model_deleted_while_serving_keeps_serving_and_readyz_says_so(tmp_path: Path) -> None:
    from tests.support.server import LIVE, live_server

    entry = convert(FIXTURE / "model", tmp_path / "entry")
    settings = dataclasses.replace(LIVE, model=str(entry))
    with live_server(settings, tmp_path / "home") as live:
        assert "model_files" not in live.client.get("/readyz").json()
        (entry / "model.safetensors").unlink()  # the weights stay mapped in memory
        assert live.client.post("/v1/recognize", content=CLIP.read_bytes()).status_code == 200
        ready = live.client.get("/readyz")
        assert ready.status_code == 200
        assert ready.json()["model_files"] == ["model.safetensors is missing"]
