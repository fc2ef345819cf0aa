"""Which precision a model runs in: the CPU's native bfloat16, and the agreement with float32 that `--dtype
auto` requires before it takes a lower precision.

    dtype auto -> on a GPU: half precision by capability (bfloat16 from compute capability 8.0, Ampere;
                  float16 before), on torch, if its agreement with float32 on this entry passed
               -> on a CPU with native bf16 (AMX or AVX512-BF16 in its flags): bfloat16 on the fastest
                  runtime that runs it faster than float32 on that ISA (BF16_RUNTIMES, measured), if its
                  agreement with float32 on this entry passed
               -> otherwise float32. Never int8 (opt-in: `--dtype int8`).

Each agreement is measured once, the first time it is wanted, and recorded in the entry's manifest
(`emoserve info` shows it); a failed check means float32, and the log says why.

The agreement check: generated speech-like clips and the bundled examples, each scored by the same
runtime in float32 and in the lower precision. It passes when the largest score difference is at most
MAX_SCORE_DIFF and the top emotion is the same on every clip where float32's lead over the second emotion
is more than NEAR_TIE_LEAD (a near tie may flip without meaning anything: such clips are counted and
reported, not failed). The embeddings' largest relative difference is reported beside it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from emoserve.constants import EXAMPLES_DIR, SAMPLE_RATE
from emoserve.inference.backend import Backend, choose_backend, open_backend
from emoserve.inference.gpu import gpu_present
from emoserve.model.entry import ModelInfo, read_manifest, write_manifest
from emoserve.model.interface import pad, softmax, speech_like
from emoserve.system import cpu_flags

log = logging.getLogger(__name__)

NATIVE_BF16_FLAGS = (
    "amx_bf16",
    "avx512_bf16",
)  # /proc/cpuinfo: Intel AMX tiles, AVX512-BF16 (Intel, AMD Zen 4+)
# The runtimes whose bfloat16 beats float32 on each native-bf16 ISA, fastest first (measured: issue 23 on
# an Intel Xeon with AMX, 5 s clip against onnx float32: openvino bf16 0.39x, torch bf16 0.61x;
# docs/benchmarks.md section 16 on an AMD EPYC with AVX512-BF16 and no AMX: openvino bf16 0.49x, torch bf16
# 3.1x - slower than float32, so `auto` never takes torch's bf16 there; `--dtype bfloat16` still runs it).
BF16_RUNTIMES: dict[str, tuple[str, ...]] = {"amx_bf16": ("openvino", "torch"), "avx512_bf16": ("openvino",)}
MAX_SCORE_DIFF = 5e-3  # the bound on any score's difference from float32
NEAR_TIE_LEAD = 2 * MAX_SCORE_DIFF  # float32's top-two lead at or under this: a near tie, may flip
GENERATED_SECONDS = (1.0, 2.0, 3.0, 5.0, 8.0, 12.0)  # the generated clips (seeded: the same every time)
MANIFEST_KEY = "agreement"  # manifest["agreement"][record_key(...)] = Agreement.to_dict()


def native_bf16(flags: frozenset[str] | None = None) -> str | None:
    """The CPU flag that gives native bfloat16 (`amx_bf16` before `avx512_bf16`), or None."""
    flags = cpu_flags() if flags is None else flags
    return next((flag for flag in NATIVE_BF16_FLAGS if flag in flags), None)


def check_cpu_dtype(dtype: str, flags: frozenset[str] | None = None) -> None:
    """A ValueError saying why `dtype` cannot run on this CPU (bfloat16 without native bf16, float16)."""
    if dtype == "float16":
        raise ValueError("dtype float16 is for GPUs; on the CPU use float32 or bfloat16 (where it is native)")
    if dtype == "bfloat16" and native_bf16(flags) is None:
        raise ValueError(
            "dtype bfloat16 needs a CPU with native bf16 (AMX or AVX512-BF16: amx_bf16 or avx512_bf16 in "
            "/proc/cpuinfo's flags); this CPU has neither, and emulated bf16 is slower than float32: "
            "use float32"
        )


def choose_precision(
    backend: str, device: str, dtype: str, info: ModelInfo, threads: int
) -> tuple[str, str, str]:
    """The dtype and backend for these options (never "auto"), and why the dtype; a dtype this CPU cannot
    run, or options that do not go together, are refused (ValueError)."""
    if dtype == "auto":
        # options that do not go together are said first (float32 runs on every backend)
        float32 = choose_backend(backend, device, "float32", info)
        dtype, runtime, why = choose_dtype(backend, device, info, threads)
        return dtype, runtime or float32, why
    chosen = choose_backend(backend, device, dtype, info)  # options that do not go together: said first
    if chosen != "torch" or on_cpu(device):
        check_cpu_dtype(dtype)
    return dtype, chosen, f"{dtype} as asked"


def on_cpu(device: str) -> bool:
    return device == "cpu" or (device == "auto" and not gpu_present())


@dataclass(frozen=True)
class Agreement:
    """How one runtime's lower precision agreed with its float32 on the check's clips."""

    backend: str
    dtype: str
    passed: bool
    max_score_diff: float
    clips: int
    near_ties: int  # clips whose float32 lead was at most NEAR_TIE_LEAD
    near_tie_flips: int  # of those, the clips whose top emotion changed (allowed)
    flips: int  # clips with a clear float32 lead whose top emotion changed (fails the check)
    max_embedding_rel_diff: float  # largest |low - f32| / largest |f32| of a pooled embedding
    reason: str
    measured_at: str = ""
    seconds: float = 0.0
    runtime: str = ""  # the runtime's package and version it was measured with (another: measured again)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> Agreement:
        return cls(**{k: record[k] for k in cls.__dataclass_fields__ if k in record})


def compare(
    backend: str,
    dtype: str,
    scores: Sequence[np.ndarray],
    low_scores: Sequence[np.ndarray],
    pooled: Sequence[np.ndarray],
    low_pooled: Sequence[np.ndarray],
) -> Agreement:
    """The agreement of per-clip `low_scores` (labels,) with float32's `scores`, and of the embeddings."""
    diff = max(float(np.abs(a - b).max()) for a, b in zip(scores, low_scores, strict=True))
    near_ties = near_tie_flips = flips = 0
    for want, got in zip(scores, low_scores, strict=True):
        top2 = np.sort(want)[-2:]
        flipped = int(want.argmax()) != int(got.argmax())
        if top2[1] - top2[0] <= NEAR_TIE_LEAD:
            near_ties += 1
            near_tie_flips += flipped
        else:
            flips += flipped
    embedding = max(
        float(np.abs(b - a).max() / max(float(np.abs(a).max()), 1e-12))
        for a, b in zip(pooled, low_pooled, strict=True)
    )
    problems = []
    if not np.isfinite(diff) or diff > MAX_SCORE_DIFF:
        problems.append(f"largest score difference {diff:.2e} > {MAX_SCORE_DIFF:g}")
    if flips:
        problems.append(f"the top emotion changed on {flips} clip(s) with a lead over {NEAR_TIE_LEAD:g}")
    reason = "; ".join(problems) or (
        f"largest score difference {diff:.2e} <= {MAX_SCORE_DIFF:g}, the same top emotion on every clip "
        f"with a lead over {NEAR_TIE_LEAD:g} ({near_tie_flips} of {near_ties} near ties flipped)"
    )
    return Agreement(
        backend,
        dtype,
        not problems,
        float(f"{diff:.3g}"),
        len(scores),
        near_ties,
        near_tie_flips,
        flips,
        float(f"{embedding:.3g}"),
        reason,
    )


def agreement_clips() -> list[np.ndarray]:
    """The check's clips: generated speech-like signals of GENERATED_SECONDS and the bundled examples."""
    from emoserve.audio.decode import load_audio

    rng = np.random.default_rng(23)
    clips = [speech_like(rng, int(seconds * SAMPLE_RATE)) for seconds in GENERATED_SECONDS]
    examples = sorted(p for p in EXAMPLES_DIR.iterdir() if p.is_file() and not p.name.startswith("."))
    return clips + [load_audio(path).samples for path in examples]


def measure(
    float32: Backend, low: Backend, kept: np.ndarray, clips: Sequence[np.ndarray] | None = None
) -> Agreement:
    """Score every clip alone on both runners (`kept`: the label indices the recognizer keeps)."""
    started = time.perf_counter()
    runs: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = {}
    for runner in (float32, low):
        scores, pooled = [], []
        for clip in agreement_clips() if clips is None else clips:
            out = runner.run(*pad([clip]), frames=False)
            scores.append(softmax(out.logits[0, kept]))
            pooled.append(out.pooled[0])
        runs[runner.dtype] = (scores, pooled)
    (scores, pooled), (low_scores, low_pooled) = runs[float32.dtype], runs[low.dtype]
    result = compare(low.name, low.dtype, scores, low_scores, pooled, low_pooled)
    return Agreement(
        **result.to_dict()
        | {
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "seconds": round(time.perf_counter() - started, 2),
            "runtime": runtime_version(low.name),
        }
    )


def runtime_version(backend: str) -> str:
    """ "openvino 2026.4.1": the package that computes `backend`'s numbers, and its version."""
    from importlib.metadata import PackageNotFoundError, version

    package = {"onnx": "onnxruntime"}.get(backend, backend)
    try:
        return f"{package} {version(package)}"
    except PackageNotFoundError:
        return package


def record_key(backend: str, dtype: str, device: str = "cpu") -> str:
    """The manifest's key of an agreement: "openvino/bfloat16" on the CPU, "torch@cuda/float16" on a GPU."""
    return f"{backend}/{dtype}" if device == "cpu" else f"{backend}@cuda/{dtype}"


def recorded_agreement(info: ModelInfo, backend: str, dtype: str, device: str = "cpu") -> Agreement | None:
    """The entry's record for `backend` at `dtype`, if it was measured with the runtime installed now."""
    record = read_manifest(info.path).get(MANIFEST_KEY, {}).get(record_key(backend, dtype, device))
    if not isinstance(record, dict) or record.get("runtime") != runtime_version(backend):
        return None
    return Agreement.from_dict(record)


def record_agreement(info: ModelInfo, agreement: Agreement, device: str = "cpu") -> None:
    """Into the entry's manifest; an entry that cannot be written (a read-only image) keeps none, and the
    check runs again at the next start."""
    try:
        manifest = read_manifest(info.path)
        key = record_key(agreement.backend, agreement.dtype, device)
        manifest.setdefault(MANIFEST_KEY, {})[key] = agreement.to_dict()
        write_manifest(info.path, manifest)
    except OSError as err:
        log.warning(
            "%s: the agreement check could not be recorded (%s): it runs again next time", info.name, err
        )


def agreement_for(
    info: ModelInfo,
    backend: str,
    dtype: str,
    threads: int,
    opener: Callable[..., Backend] | None = None,
    device: str = "cpu",
) -> Agreement:
    """The entry's recorded agreement of `backend` at `dtype` on `device` ("cpu", or a GPU: one record for
    every GPU), measured now (and recorded) when missing."""
    found = recorded_agreement(info, backend, dtype, device)
    if found is not None:
        return found
    open_runner = opener or open_backend
    log.info("%s: measuring %s %s against float32 once (the agreement check)", info.name, backend, dtype)
    kept = np.array([i for i, label in enumerate(info.labels) if not label.masked])
    agreement = measure(
        open_runner(backend, "float32", info, device, threads),
        open_runner(backend, dtype, info, device, threads),
        kept,
    )
    record_agreement(info, agreement, device)
    return agreement


def choose_dtype(
    backend: str, device: str, info: ModelInfo, threads: int, flags: frozenset[str] | None = None
) -> tuple[str, str | None, str]:
    """`--dtype auto`: the precision for these options, the runtime when it took a lower precision (None:
    not chosen yet), and why (for the log and GET /v1/model)."""
    if not on_cpu(device):
        return gpu_dtype(backend, device, info, threads)
    flag = native_bf16(flags)
    if flag is None:
        return "float32", None, "float32: this CPU has no native bfloat16 (no amx_bf16 or avx512_bf16 flag)"
    runtime = bf16_runtime(backend, flag, info)
    if runtime is None:
        fast = " or ".join(BF16_RUNTIMES[flag])
        why = f"float32: bfloat16 is faster than float32 here ({flag}) only on {fast}"
        if backend == "auto":
            why += ", and none is installed with the entry's ONNX graph"
        return "float32", None, why
    return checked("bfloat16", runtime, "cpu", f"native here ({flag})", info, threads)


def bf16_runtime(backend: str, flag: str, info: ModelInfo) -> str | None:
    """The runtime `auto` runs bfloat16 on for `backend` on a CPU with `flag`: one of BF16_RUNTIMES[flag]
    that can run the entry, or None (float32 is faster than anything left)."""
    fast = BF16_RUNTIMES[flag]
    if backend != "auto":
        return backend if backend in fast else None
    chosen = choose_backend("auto", "cpu", "bfloat16", info)  # torch when no graph runtime can
    return chosen if chosen in fast else None


def gpu_dtype(backend: str, device: str, info: ModelInfo, threads: int) -> tuple[str, str | None, str]:
    """On a GPU: bfloat16 from compute capability 8.0, float16 before (torch), if its agreement passed."""
    from emoserve.inference.gpu import half_precision

    if backend not in ("auto", "torch"):
        return "float32", None, "float32: on a GPU only the torch backend runs half precision"
    dtype, capability = half_precision(device)
    return checked(dtype, "torch", device, f"compute capability {capability}", info, threads)


def checked(
    dtype: str, runtime: str, device: str, native: str, info: ModelInfo, threads: int
) -> tuple[str, str | None, str]:
    """`dtype` on `runtime` if its agreement with float32 on this entry passed, else float32 (logged)."""
    agreement = agreement_for(info, runtime, dtype, threads, device=device)
    if not agreement.passed:
        log.warning(
            "%s: %s on %s failed its agreement check with float32 (%s): running float32",
            info.name,
            dtype,
            runtime,
            agreement.reason,
        )
        why = f"float32: {dtype} on {runtime} failed its agreement check with float32 ({agreement.reason})"
        return "float32", None, why
    why = f"{dtype}: {native}, its agreement with float32 on {runtime} passed ({agreement.reason})"
    return dtype, runtime, why
