"""`--dtype auto` and bfloat16 on the CPU: the CPU's flags (fixtures of /proc/cpuinfo, so the choice is
tested on any machine), the agreement check with float32 (a precision that fails it is never chosen), and
bfloat16's real agreement on the fixture where this machine's CPU has native bf16."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from emoserve.cli import main
from emoserve.inference import backend as backend_module
from emoserve.inference import gpu, precision
from emoserve.inference.backend import open_backend
from emoserve.inference.openvino_backend import CACHE_DIR
from emoserve.inference.precision import Agreement, check_cpu_dtype, choose_dtype, compare, native_bf16
from emoserve.inference.recognizer import Recognizer, load_model
from emoserve.model.entry import read_entry, read_manifest, write_manifest
from emoserve.model.interface import Outputs
from emoserve.system import cpu_flags
from tests.support.paths import FIXTURE
from tests.support.reference import CLIPS, wave

CPUINFO = FIXTURE.parent / "cpuinfo"
AMD_ZEN4 = cpu_flags(CPUINFO / "amd-epyc-zen4.txt")  # AVX512-BF16
INTEL_SPR = cpu_flags(CPUINFO / "intel-xeon-spr.txt")  # AMX and AVX512-BF16
INTEL_SKYLAKE = cpu_flags(CPUINFO / "intel-xeon-skylake.txt")  # AVX-512, no bf16
THIS_CPU_BF16 = native_bf16()


def entry_copy(tiny_onnx_entry: Path, tmp_path: Path) -> Path:
    """The converted fixture (graph included) in a folder of the test's own: its manifest gets written."""
    return Path(
        shutil.copytree(tiny_onnx_entry, tmp_path / "entry", ignore=shutil.ignore_patterns(CACHE_DIR))
    )


def test_the_cpu_flags_say_which_cpus_have_native_bf16() -> None:
    assert native_bf16(INTEL_SPR) == "amx_bf16"
    assert native_bf16(AMD_ZEN4) == "avx512_bf16"
    assert native_bf16(INTEL_SKYLAKE) is None and "avx512f" in INTEL_SKYLAKE
    assert cpu_flags(CPUINFO / "not-there.txt") == frozenset()


def test_bf16_is_refused_with_its_reason_on_a_cpu_without_it(
    tiny_onnx_entry: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ValueError, match=r"needs a CPU with native bf16.*has neither"):
        check_cpu_dtype("bfloat16", INTEL_SKYLAKE)
    check_cpu_dtype("bfloat16", AMD_ZEN4)
    with pytest.raises(ValueError, match="float16 is for GPUs"):
        check_cpu_dtype("float16", INTEL_SPR)
    monkeypatch.setattr(precision, "cpu_flags", lambda: INTEL_SKYLAKE)
    for backend in ("openvino", "torch", "auto"):
        with pytest.raises(ValueError, match="needs a CPU with native bf16"):
            load_model(tiny_onnx_entry, backend=backend, device="cpu", dtype="bfloat16", threads=1)


def test_auto_takes_float32_on_a_cpu_without_bf16(
    tiny_onnx_entry: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    info = read_entry(tiny_onnx_entry)
    assert choose_dtype("auto", "cpu", info, 1, flags=INTEL_SKYLAKE)[:2] == ("float32", None)
    monkeypatch.setattr(precision, "cpu_flags", lambda: INTEL_SKYLAKE)
    rec = load_model(tiny_onnx_entry, device="cpu", dtype="auto", threads=1)
    assert (rec.backend.name, rec.dtype) == ("onnx", "float32")  # the first float32 runtime (FASTEST)
    assert "no native bfloat16" in rec.reason


def passing_record(backend: str) -> dict[str, Any]:
    return Agreement(
        backend, "bfloat16", True, 1e-3, 9, 0, 0, 0, 1e-2, "ok", runtime=precision.runtime_version(backend)
    ).to_dict()


@pytest.mark.parametrize("flags", [AMD_ZEN4, INTEL_SPR], ids=["avx512_bf16", "amx_bf16"])
def test_auto_takes_bf16_on_a_bf16_cpu_when_its_agreement_passed(
    tiny_onnx_entry: Path, tmp_path: Path, flags: frozenset[str]
) -> None:
    """On the fastest bf16 runtime installed (openvino); on torch when asked for where torch's bf16 beats
    float32 (AMX: measured), not where it was measured slower (AVX512-BF16 alone); onnx keeps float32."""
    entry = entry_copy(tiny_onnx_entry, tmp_path)
    manifest = read_manifest(entry)
    manifest["agreement"] = {f"{b}/bfloat16": passing_record(b) for b in ("openvino", "torch")}
    write_manifest(entry, manifest)
    info = read_entry(entry)
    dtype, runtime, why = choose_dtype("auto", "cpu", info, 1, flags=flags)
    assert (dtype, runtime) == ("bfloat16", "openvino") and native_bf16(flags) in why
    torch_bf16 = choose_dtype("torch", "cpu", info, 1, flags=flags)
    if flags is INTEL_SPR:
        assert torch_bf16[:2] == ("bfloat16", "torch")
    else:
        assert torch_bf16[:2] == ("float32", None) and "only on openvino" in torch_bf16[2]
    assert choose_dtype("onnx", "cpu", info, 1, flags=flags)[:2] == ("float32", None)


def test_auto_keeps_float32_where_no_installed_runtime_runs_bf16_faster(
    tiny_onnx_entry: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without OpenVINO, an AVX512-BF16 CPU keeps float32 (torch's bf16 is slower there); an AMX one
    takes torch's bf16."""
    entry = entry_copy(tiny_onnx_entry, tmp_path)
    manifest = read_manifest(entry)
    manifest["agreement"] = {"torch/bfloat16": passing_record("torch")}
    write_manifest(entry, manifest)
    monkeypatch.setattr(backend_module, "openvino_installed", lambda: False)
    info = read_entry(entry)
    dtype, runtime, why = choose_dtype("auto", "cpu", info, 1, flags=AMD_ZEN4)
    assert (dtype, runtime) == ("float32", None) and "none is installed" in why
    assert choose_dtype("auto", "cpu", info, 1, flags=INTEL_SPR)[:2] == ("bfloat16", "torch")


@pytest.mark.parametrize(
    ("capability", "half"), [((7, 5), "float16"), ((9, 0), "bfloat16")], ids=["turing", "hopper"]
)
def test_auto_takes_half_precision_on_a_gpu_by_capability_when_its_agreement_passed(
    tiny_onnx_entry: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capability: tuple[int, int],
    half: str,
) -> None:
    """The GPU's record is its own (torch@cuda), apart from torch's on the CPU; a failed one keeps float32."""
    entry = entry_copy(tiny_onnx_entry, tmp_path)
    record = passing_record("torch") | {"dtype": half}
    manifest = read_manifest(entry)
    manifest["agreement"] = {f"torch@cuda/{half}": record, f"torch/{half}": record | {"passed": False}}
    write_manifest(entry, manifest)
    monkeypatch.setattr(gpu, "half_precision", lambda device: (half, f"{capability[0]}.{capability[1]}"))
    info = read_entry(entry)
    dtype, runtime, why = choose_dtype("auto", "cuda:0", info, 1)
    assert (dtype, runtime) == (half, "torch") and f"capability {capability[0]}.{capability[1]}" in why
    assert choose_dtype("onnx", "cuda:0", info, 1)[:2] == ("float32", None)
    manifest["agreement"][f"torch@cuda/{half}"]["passed"] = False
    write_manifest(entry, manifest)
    dtype, runtime, why = choose_dtype("auto", "cuda:0", read_entry(entry), 1)
    assert (dtype, runtime) == ("float32", None) and "failed its agreement check" in why


def test_a_record_of_another_runtime_version_is_measured_again(tiny_onnx_entry: Path, tmp_path: Path) -> None:
    entry = entry_copy(tiny_onnx_entry, tmp_path)
    manifest = read_manifest(entry)
    manifest["agreement"] = {"openvino/bfloat16": passing_record("openvino") | {"runtime": "openvino 1.0"}}
    write_manifest(entry, manifest)
    assert precision.recorded_agreement(read_entry(entry), "openvino", "bfloat16") is None


class Disagreeing:
    """A bfloat16 runner that moves one logit: its top emotion differs from float32's on clear leads."""

    def __init__(self, runner: Any) -> None:
        self.runner, self.name, self.device, self.dtype = runner, runner.name, "cpu", "bfloat16"

    def run(self, waves: np.ndarray, lengths: np.ndarray, frames: bool) -> Outputs:
        out = self.runner.run(waves, lengths, frames)
        logits = out.logits.copy()
        logits[:, 0] += 3.0
        return out._replace(logits=logits)


def test_a_precision_that_fails_its_agreement_is_never_chosen(
    tiny_onnx_entry: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The check runs once, on first load; its failure is recorded, logged with why, and shown by
    `emoserve info`; auto runs float32, now and at the next load (without measuring again)."""
    entry = entry_copy(tiny_onnx_entry, tmp_path)
    opened: list[str] = []

    def opener(name: str, dtype: str, *args: Any) -> Any:
        opened.append(dtype)
        runner = open_backend(name, "float32", *args)
        return Disagreeing(runner) if dtype == "bfloat16" else runner

    monkeypatch.setattr(precision, "cpu_flags", lambda: AMD_ZEN4)
    monkeypatch.setattr(precision, "open_backend", opener)
    with caplog.at_level(logging.INFO, "emoserve"):
        rec = load_model(entry, device="cpu", dtype="auto", threads=1)
    assert (rec.backend.name, rec.dtype) == ("onnx", "float32") and opened == ["float32", "bfloat16"]
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert (
        "bfloat16 on openvino failed its agreement check" in warning and "largest score difference" in warning
    )
    assert "failed its agreement check" in rec.reason
    record = read_manifest(entry)["agreement"]["openvino/bfloat16"]
    assert record["passed"] is False and record["max_score_diff"] > precision.MAX_SCORE_DIFF
    assert record["clips"] == len(precision.GENERATED_SECONDS) + 3  # and the bundled examples
    assert (
        load_model(entry, device="cpu", dtype="auto", threads=1).dtype == "float32" and len(opened) == 2
    )  # recorded
    assert main(["info", str(entry)]) == 0


def test_the_agreement_rule_counts_near_ties_and_fails_clear_flips() -> None:
    f32 = [np.array([0.50, 0.30, 0.20]), np.array([0.402, 0.398, 0.2])]
    pooled = [np.ones(4), np.ones(4)]
    near_tie_flip = [np.array([0.501, 0.299, 0.20]), np.array([0.399, 0.401, 0.2])]
    agreement = compare("openvino", "bfloat16", f32, near_tie_flip, pooled, [p * 1.001 for p in pooled])
    assert agreement.passed and (agreement.near_ties, agreement.near_tie_flips, agreement.flips) == (1, 1, 0)
    assert agreement.max_embedding_rel_diff == pytest.approx(1e-3)
    too_far = [np.array([0.494, 0.306, 0.20]), f32[1]]
    assert not compare("openvino", "bfloat16", f32, too_far, pooled, pooled).passed
    clear_flip = [np.array([0.30, 0.50, 0.20]), f32[1]]
    failed = compare("openvino", "bfloat16", f32, clear_flip, pooled, pooled)
    assert not failed.passed and failed.flips == 1 and "top emotion changed on 1 clip" in failed.reason


@pytest.mark.skipif(THIS_CPU_BF16 is None, reason="this CPU has no native bf16 (amx_bf16, avx512_bf16)")
@pytest.mark.parametrize("backend", ["openvino", "torch"])
def test_bf16_agrees_with_float32_on_the_fixture(
    tiny_onnx_entry: Path, tiny_onnx: Recognizer, tmp_path: Path, backend: str
) -> None:
    """Measured for real on this CPU: the agreement check passes, auto takes bfloat16 where that runtime's
    bf16 is faster than float32 on this CPU (BF16_RUNTIMES), and every fixture clip's scores are within
    MAX_SCORE_DIFF of float32's with the same top emotion where the lead is clear."""
    entry = entry_copy(tiny_onnx_entry, tmp_path)
    auto = load_model(entry, backend=backend, device="cpu", dtype="auto", threads=1)
    assert THIS_CPU_BF16 is not None
    if backend in precision.BF16_RUNTIMES[THIS_CPU_BF16]:
        assert (auto.backend.name, auto.dtype) == (backend, "bfloat16"), auto.reason
    else:
        assert auto.dtype == "float32" and "only on" in auto.reason
    assert precision.agreement_for(read_entry(entry), backend, "bfloat16", 1).passed
    assert read_manifest(entry)["agreement"][f"{backend}/bfloat16"]["passed"] is True
    rec = load_model(entry, backend=backend, device="cpu", dtype="bfloat16", threads=1)
    for clip in CLIPS:
        got, want = rec.predict((wave(clip), 16000)), tiny_onnx.predict((wave(clip), 16000))
        diff = np.abs(np.array(list(got.scores.values())) - np.array(list(want.scores.values()))).max()
        assert 0 < diff <= precision.MAX_SCORE_DIFF, clip
        lead = np.diff(sorted(want.scores.values())[-2:])[0]
        assert got.emotion == want.emotion or lead <= precision.NEAR_TIE_LEAD, clip
    assert json.loads(json.dumps(read_manifest(entry)))  # the record is plain JSON
