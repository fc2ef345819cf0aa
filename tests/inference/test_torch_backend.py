"""The CUDA decisions of the torch backend, on a CPU: `torch.cuda` patched for what only a GPU answers
(is_available, device_count, get_device_capability, is_initialized), the decisions themselves real. What no
CPU can show (that the allocator obeys the variable, the kernels' precision) is the GPU run's
(docs/benchmarks.md section 10)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pytest
import torch

import emoserve.inference.backend as backend
import emoserve.inference.gpu as gpu
import emoserve.inference.torch_backend as torch_backend
from emoserve.inference.torch_backend import (
    ALLOCATOR_VARIABLES,
    EXPANDABLE_SEGMENTS,
    TorchBackend,
    pick_device,
    pick_dtype,
    use_expandable_segments,
)
from emoserve.model.checkpoint import read_published
from emoserve.model.network import Emotion2vec
from tests.support.paths import FIXTURE


class FakeCuda:
    """The answers of a machine with `count` GPUs of compute capability `capability`; records the order of
    the calls that initialise CUDA, and what the allocator variables were at that moment."""

    def __init__(
        self, monkeypatch: pytest.MonkeyPatch, count: int = 1, capability: tuple[int, int] = (9, 0)
    ) -> None:
        self.initialized = False
        self.allocator_at_init: dict[str, str | None] | None = None
        monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "is_initialized", lambda: self.initialized)
        monkeypatch.setattr(torch.cuda, "get_device_capability", self.capability)
        self._capability = capability

    def capability(self, device: Any = None) -> tuple[int, int]:
        self.init()  # torch: get_device_properties -> _lazy_init()
        return self._capability

    def init(self) -> None:
        if not self.initialized:
            self.allocator_at_init = {name: os.environ.get(name) for name in ALLOCATOR_VARIABLES}
        self.initialized = True


@pytest.fixture
def no_allocator_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ALLOCATOR_VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def float32_math_restored() -> Any:
    cudnn = torch.backends.cudnn
    matmul, conv, rnn = (
        torch.backends.cuda.matmul.fp32_precision,
        cudnn.conv.fp32_precision,
        cudnn.rnn.fp32_precision,
    )
    yield
    torch.backends.cuda.matmul.fp32_precision = matmul
    cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision = conv, rnn


# ------------------------------------------------------------------------------------------------ device


def test_auto_takes_the_gpu_when_torch_sees_one(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeCuda(monkeypatch)
    assert pick_device("auto") == torch.device("cuda")
    assert pick_device("cuda:0") == torch.device("cuda:0")


def test_a_device_index_past_the_gpus_is_refused_in_one_sentence(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeCuda(monkeypatch, count=2)
    assert pick_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(
        ValueError, match=r"^device is 'cuda:3' but this machine has 2 CUDA GPUs \(cuda:0 to cuda:1\)"
    ):
        pick_device("cuda:3")


def test_cuda_without_a_gpu_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeCuda(monkeypatch, count=0)
    monkeypatch.setattr(gpu, "gpu_driver_files", lambda: [])
    with pytest.raises(ValueError, match="no CUDA GPU is available"):
        pick_device("cuda")
    assert pick_device("auto") == torch.device("cpu")


# ------------------------------------------------------------------------------------------------- dtype


@pytest.mark.parametrize(
    ("capability", "allowed"), [((7, 5), False), ((7, 0), False), ((8, 0), True), ((9, 0), True)]
)
def test_bfloat16_needs_compute_capability_8(
    monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int], allowed: bool
) -> None:
    FakeCuda(monkeypatch, capability=capability)
    cuda, (major, minor) = torch.device("cuda:0"), capability
    assert pick_dtype("float16", cuda) == torch.float16  # every CUDA GPU torch supports has float16
    if allowed:
        assert pick_dtype("bfloat16", cuda) == torch.bfloat16
    else:
        with pytest.raises(
            ValueError,
            match=rf"^dtype bfloat16 needs .* 8.0 or newer, and cuda:0 is {major}\.{minor}; use --dtype",
        ):
            pick_dtype("bfloat16", cuda)


def test_half_precision_stays_refused_on_the_cpu() -> None:
    with pytest.raises(ValueError, match="on the CPU use float32"):
        pick_dtype("float16", torch.device("cpu"))


# -------------------------------------------------------------------------------------------- allocator


def test_expandable_segments_are_set_under_both_names_before_cuda_starts(
    monkeypatch: pytest.MonkeyPatch, no_allocator_variables: None
) -> None:
    FakeCuda(monkeypatch)
    assert use_expandable_segments()
    assert all(os.environ[name] == EXPANDABLE_SEGMENTS for name in ALLOCATOR_VARIABLES)


@pytest.mark.parametrize("name", ALLOCATOR_VARIABLES)
def test_a_users_allocator_setting_under_either_name_wins(
    monkeypatch: pytest.MonkeyPatch, no_allocator_variables: None, name: str
) -> None:
    FakeCuda(monkeypatch)
    monkeypatch.setenv(name, "expandable_segments:False")
    assert not use_expandable_segments()
    assert {n: os.environ.get(n) for n in ALLOCATOR_VARIABLES} == {
        n: "expandable_segments:False" if n == name else None for n in ALLOCATOR_VARIABLES
    }


def test_too_late_for_the_allocator_is_said(
    monkeypatch: pytest.MonkeyPatch, no_allocator_variables: None, caplog: pytest.LogCaptureFixture
) -> None:
    FakeCuda(monkeypatch).init()
    with caplog.at_level(logging.WARNING, logger=torch_backend.__name__):
        assert not use_expandable_segments()
    assert not any(name in os.environ for name in ALLOCATOR_VARIABLES)
    assert "expandable segments stay off" in caplog.text


def tiny_model(entry: Path, device: Any, dtype: torch.dtype) -> tuple[Emotion2vec, None]:
    config, _, state = read_published(FIXTURE / "model")
    model = Emotion2vec(config)
    model.load_state_dict(state)
    return model.eval(), None


def test_load_on_cuda_sets_the_allocator_before_reading_the_capability(
    monkeypatch: pytest.MonkeyPatch, no_allocator_variables: None, float32_math_restored: None
) -> None:
    """The order inside `TorchBackend.load`: the capability check (bfloat16) initialises CUDA, so the
    allocator variable must already be set then (review B2 found the benchmark initialising first)."""
    cuda = FakeCuda(monkeypatch, capability=(8, 9))
    loaded: list[tuple[Any, torch.dtype]] = []

    def load_entry(entry: Path, device: Any, dtype: torch.dtype) -> tuple[Emotion2vec, None]:
        loaded.append((device, dtype))
        return tiny_model(entry, device, dtype)

    monkeypatch.setattr(torch_backend, "load_entry", load_entry)  # the weights' .to(cuda) needs a GPU
    TorchBackend.load(FIXTURE / "model", device="cuda", dtype="bfloat16", threads=1)
    assert cuda.allocator_at_init == dict.fromkeys(ALLOCATOR_VARIABLES, EXPANDABLE_SEGMENTS)
    assert loaded == [(torch.device("cuda"), torch.bfloat16)]


# ------------------------------------------------------------------------------------------------- TF32


def test_float32_on_cuda_is_ieee_for_matmuls_and_convolutions(
    monkeypatch: pytest.MonkeyPatch, no_allocator_variables: None, float32_math_restored: None
) -> None:
    """torch's defaults are TF32 convolutions and IEEE matmuls (review B3): loading onto CUDA chooses."""
    FakeCuda(monkeypatch)
    torch.backends.cudnn.conv.fp32_precision = "tf32"
    monkeypatch.setattr(torch_backend, "load_entry", tiny_model)
    TorchBackend.load(FIXTURE / "model", device="cuda", dtype="float32", threads=1)
    assert torch_backend.float32_math() == {"matmul": "ieee", "conv": "ieee"}
    assert torch.backends.cudnn.rnn.fp32_precision == "ieee"  # the cuDNN flags agree


def test_the_cpu_leaves_float32_math_alone(
    monkeypatch: pytest.MonkeyPatch, float32_math_restored: None
) -> None:
    torch.backends.cudnn.conv.fp32_precision = "tf32"
    monkeypatch.setattr(torch_backend, "load_entry", tiny_model)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # the test process keeps its threads
    TorchBackend.load(FIXTURE / "model", device="cpu", dtype="float32", threads=1)
    assert torch_backend.float32_math()["conv"] == "tf32"


# ------------------------------------------------------------------------------------ detection


@pytest.fixture
def driver_files(monkeypatch: pytest.MonkeyPatch) -> Any:
    """`Path.exists` answering for the driver files listed; `_warned` fresh."""
    present: set[str] = set()
    real_exists = Path.exists

    def exists(path: Path) -> bool:
        return str(path) in present if str(path) in gpu.GPU_DRIVER_FILES else real_exists(path)

    monkeypatch.setattr(Path, "exists", exists)
    monkeypatch.setattr(gpu, "_warned", [])
    return present


def test_wsl2_counts_as_a_gpu_driver(monkeypatch: pytest.MonkeyPatch, driver_files: set[str]) -> None:
    """WSL2 has /dev/dxg and no /dev/nvidiactl (review A3)."""
    FakeCuda(monkeypatch)
    assert not gpu.gpu_present()
    driver_files.add("/dev/dxg")
    assert gpu.gpu_present()


def test_a_driver_without_usable_cuda_is_said_loudly_once(
    monkeypatch: pytest.MonkeyPatch, driver_files: set[str], caplog: pytest.LogCaptureFixture
) -> None:
    """A container without the compute capability, or a driver older than torch's CUDA (review A2)."""
    FakeCuda(monkeypatch, count=0)
    driver_files.add("/dev/nvidiactl")
    with caplog.at_level(logging.WARNING, logger=backend.__name__):
        assert not gpu.gpu_present()
        assert pick_device("auto") == torch.device("cpu")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "a GPU driver is present (/dev/nvidiactl) but torch" in warnings[0].getMessage()
    assert "NVIDIA_DRIVER_CAPABILITIES" in warnings[0].getMessage()


def test_auto_chooses_torch_on_a_gpu_and_the_fastest_cpu_runtime_without(
    monkeypatch: pytest.MonkeyPatch, driver_files: set[str], tiny_onnx_entry: Path
) -> None:
    from emoserve.model.entry import read_entry

    FakeCuda(monkeypatch)
    info = read_entry(tiny_onnx_entry)
    cpu_runtime = backend.choose_backend("auto", "auto", "float32", info)
    assert cpu_runtime in backend.GRAPH_BACKENDS and cpu_runtime == backend.fastest_backend("float32", info)
    driver_files.add("/dev/dxg")
    assert backend.choose_backend("auto", "auto", "float32", info) == "torch"
