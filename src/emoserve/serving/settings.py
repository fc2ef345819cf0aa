"""Service settings: command-line flags over `EMOSERVE_*` environment variables over defaults, read once
into a frozen dataclass. A bad value fails at start-up with an error that names the key it came from:

    EMOSERVE_MAX_BATCH_SIZE: 'x' is not an integer
    --port: 70000 is out of range; it must be at most 65535

Light on purpose (standard library only): `emoserve serve` reads it before uvicorn starts.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emoserve.constants import (
    BATCHING_CHOICES,
    FALSE_WORDS,
    MAX_BATCH_SECONDS,
    MAX_BATCH_SIZE,
    MAX_QUEUE,
    MAX_WAIT_MS,
    TRUE_WORDS,
    Backend,
    Dtype,
    Hub,
)
from emoserve.errors import SettingsError
from emoserve.inference.options import ModelOptions, env_name, option_fields

MB = 1_000_000  # bytes; upload limits are in decimal megabytes, as HTTP clients and proxies count them
# Attention cost grows with the square of the length (spec section 6): on a CPU a 60 s clip of the large
# model already takes seconds, and on a GPU 120 s (6,000 frames) keeps the attention scores near 2 GB.
CPU_MAX_AUDIO_S = 60.0
GPU_MAX_AUDIO_S = 120.0
# Timelines cost time linear in the length (segments of at most max_segment_s), not memory: the default is
# what a CPU scores in a few minutes with the large model (~0.1 x real time), and 3 h on a GPU.
CPU_MAX_TIMELINE_S = 1800.0
GPU_MAX_TIMELINE_S = 10800.0
# Warm-up batch sizes. A CPU runs any batch shape at full speed once it has run one (no per-shape kernels
# to choose), and a batch of 4 x 3 s costs the large model ~4.5 s there; a GPU picks kernels per shape
# and runs these batches in milliseconds.
CPU_WARMUP_BATCH_SIZES = (1,)
GPU_WARMUP_BATCH_SIZES = (1, 2, 4, 8)
LOG_LEVELS = ("debug", "info", "warning", "error")
OUTPUTS_DIR = Path("outputs")  # relative to the working directory, as the original app saved them


# ------------------------------------------------------------------------------------------ value parsers


def _integer(raw: str) -> int:
    try:
        return int(raw.strip())
    except ValueError:
        raise ValueError(f"{raw!r} is not an integer") from None


def _number(raw: str) -> float:
    try:
        value = float(raw.strip())
    except ValueError:
        raise ValueError(f"{raw!r} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"{raw!r} is not a finite number")
    return value


def _boolean(raw: str) -> bool:
    word = raw.strip().lower()
    if word in TRUE_WORDS | FALSE_WORDS:
        return word in TRUE_WORDS
    raise ValueError(f"{raw!r} is not a boolean (use true/false, 1/0, yes/no or on/off)")


def _sizes(sizes: tuple[int, ...]) -> str:
    return ",".join(map(str, sizes))


def _text(raw: str) -> str:
    return raw


def _optional(parse: Callable[[str], Any], *none_words: str) -> Callable[[str], Any]:
    """`parse`, except that an empty value (or one of `none_words`) means "not set"."""

    def parse_optional(raw: str) -> Any:
        return None if raw.strip().lower() in {"", *none_words} else parse(raw)

    return parse_optional


def _integers(raw: str) -> tuple[int, ...]:
    parts = [p for p in raw.replace(" ", ",").split(",") if p]
    if not parts:
        raise ValueError(f"{raw!r} is not a list of integers (e.g. 1,4)")
    return tuple(_integer(p) for p in parts)


def _head_specs(raw: str) -> tuple[tuple[str, str], ...]:
    """`NAME=DIR[,NAME=DIR...]` (a bare DIR is named after its folder) -> ((name, dir), ...); each DIR must
    hold a head (head.json), each name once."""
    specs: dict[str, str] = {}
    for part in (p.strip() for p in raw.split(",")):
        if not part:
            continue
        name, sep, folder = part.partition("=")
        if not sep:
            name, folder = Path(part).name, part
        name, folder = name.strip(), folder.strip()
        if not name or not folder:
            raise ValueError(f"{part!r} is not NAME=DIR (a head directory from `emoserve train-head`)")
        if name in specs:
            raise ValueError(f"the head name {name!r} is given twice")
        if not (Path(folder) / "head.json").is_file():
            raise ValueError(f"{folder} is not a head directory (no head.json; see `emoserve train-head`)")
        specs[name] = folder
    return tuple(specs.items())


def _calibration_dir(raw: str) -> str:
    if not (Path(raw.strip()) / "calibration.json").is_file():
        raise ValueError(
            f"{raw.strip()} is not a calibration directory (no calibration.json; see `emoserve calibrate`)"
        )
    return raw.strip()


def _database_url(raw: str) -> str:
    if not raw.strip().startswith(("postgresql://", "postgres://")):
        raise ValueError("is not a postgresql:// URL (without it, jobs use SQLite in jobs_dir)")
    return raw.strip()


def _choice(*choices: str) -> Callable[[str], str]:
    def parse_choice(raw: str) -> str:
        if raw.strip().lower() not in choices:
            raise ValueError(f"{raw!r} is not one of {', '.join(choices)}")
        return raw.strip().lower()

    return parse_choice


# ---------------------------------------------------------------------------------------- value checks


def _at_least(low: float) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        return f"{value} is out of range; it must be at least {low:g}" if value < low else None

    return check


def _share(value: float) -> str | None:
    return f"{value} is out of range; it must be 0..1" if not 0 <= value <= 1 else None


def _positive(value: Any) -> str | None:
    return f"{value} is out of range; it must be positive" if not value > 0 else None


def _port(value: int) -> str | None:
    return f"{value} is out of range; it must be 0..65535" if not 0 <= value <= 65535 else None


def _batch_sizes(value: tuple[int, ...]) -> str | None:
    return f"{value} holds a size below 1" if min(value) < 1 else None


def _setting(
    default: Any,
    parse: Callable[[str], Any],
    help: str,
    *,
    check: Callable[[Any], str | None] | None = None,
    metavar: str | None = None,
    flag: str | None = None,
) -> Any:
    """`flag`: the command-line flag when it is not the field's name (a repeatable one: --head)."""
    metadata = {"parse": parse, "help": help, "check": check, "metavar": metavar, "flag": flag}
    return field(default=default, metadata=metadata)


def _model_setting(
    name: str, parse: Callable[[str], Any] | None = None, *, check: Callable[[Any], str | None] | None = None
) -> Any:
    """A setting declared in `ModelOptions` (inference/options.py): its default, help and metavar come from
    there; said here is only how a string becomes its value (default: one of its choices)."""
    f, option = next((f, option) for f, option in option_fields() if f.name == name)
    parse = parse or _choice(*option.choices)
    return _setting(f.default, parse, option.help, check=check, metavar=option.metavar)


@dataclass(frozen=True)
class Settings:
    # The model: each option declared in ModelOptions (inference/options.py)
    model: str | None = _model_setting("model", _optional(_text))
    hub: Hub = _model_setting("hub")  # noqa: RUF009
    backend: Backend = _model_setting("backend")  # noqa: RUF009
    device: str = _model_setting("device", _text)
    dtype: Dtype = _model_setting("dtype")  # noqa: RUF009
    threads: int | None = _model_setting("threads", _optional(_integer, "auto"), check=_at_least(1))
    heads: tuple[tuple[str, str], ...] = _setting(
        (),
        _head_specs,
        "serve a head of your own labels beside the nine emotions (`emoserve train-head`): NAME=DIR, "
        "repeatable; the variable takes NAME=DIR,NAME=DIR. Asked for with ?head=NAME",
        metavar="NAME=DIR",
        flag="--head",
    )
    min_confidence: float | None = _setting(
        None,
        _optional(_number, "none"),
        "abstain threshold: a result whose top score is under it says `uncertain` as its emotion (its "
        "scores unchanged); a request's `min_confidence` wins, a head's own threshold applies to its labels",
        check=_share,
    )
    calibration: str | None = _setting(
        None,
        _optional(_calibration_dir),
        "serve calibrated scores: a directory from `emoserve calibrate` (results then say `calibrated`)",
        metavar="DIR",
    )
    # Listening
    host: str = _setting("127.0.0.1", _text, "interface to listen on; 0.0.0.0 for all (only when asked)")
    port: int = _setting(7860, _integer, "TCP port", check=_port)
    api_key: str | None = _setting(
        None,
        _optional(_text),
        "require this key for /v1/* and the UI (header 'Authorization: Bearer KEY' or 'X-API-Key: KEY'; "
        "browsers: HTTP basic auth with the key as password); never for /healthz, /readyz, /metrics",
        metavar="KEY",
    )
    ui: bool = _setting(True, _boolean, "mount the Gradio web UI at /")
    access_log: bool = _setting(True, _boolean, "log every HTTP request")
    log_level: str = _setting("info", _choice(*LOG_LEVELS), "log level of emoserve and uvicorn")
    # Limits
    max_upload_mb: float = _setting(50.0, _number, "largest request body in MB (1e6 bytes)", check=_positive)
    max_audio_s: float | None = _setting(
        None,
        _optional(_number, "auto"),
        f"longest audio accepted in seconds (default: {CPU_MAX_AUDIO_S:g} on a CPU, {GPU_MAX_AUDIO_S:g} on a "
        "GPU; attention cost grows with the square of the length)",
        check=_positive,
    )
    max_timeline_s: float | None = _setting(
        None,
        _optional(_number, "auto"),
        f"longest recording /v1/timeline accepts in seconds (default: {CPU_MAX_TIMELINE_S:g} on a CPU, "
        f"{GPU_MAX_TIMELINE_S:g} on a GPU)",
        check=_positive,
    )
    max_timeline_upload_mb: float = _setting(
        500.0,
        _number,
        "largest /v1/timeline upload in MB (spooled to a temporary file, not held in memory)",
        check=_positive,
    )
    # Live streams (GET /v1/stream)
    max_streams: int = _setting(
        16, _integer, "live streams open at once; beyond it a new one is refused (503)", check=_at_least(0)
    )
    max_stream_s: float = _setting(
        4 * 3600.0, _number, "longest live stream in seconds of audio, then closed", check=_positive
    )
    stream_idle_s: float = _setting(
        60.0, _number, "a live stream that sends nothing this long is closed", check=_positive
    )
    # The batching engine (engine.EngineConfig)
    max_batch_size: int = _setting(MAX_BATCH_SIZE, _integer, "clips per model call", check=_at_least(1))
    batching: str = _setting(
        "auto",
        _choice(*BATCHING_CHOICES),
        "batch clips in one model call: auto (only where it pays on the backend and device: measured, "
        "docs/benchmarks.md), on, off",
    )
    max_wait_ms: float = _setting(
        MAX_WAIT_MS, _number, "how long the first request of a batch waits for company", check=_at_least(0)
    )
    max_batch_seconds: float = _setting(
        MAX_BATCH_SECONDS,
        _number,
        "padded audio seconds per model call (bounds attention memory)",
        check=_positive,
    )
    max_queue: int = _setting(
        MAX_QUEUE, _integer, "waiting requests; beyond it 503 + Retry-After", check=_at_least(1)
    )
    # Lifecycle
    ready_wait_s: float = _setting(
        10.0, _number, "how long a request that arrives before ready waits, then 503", check=_at_least(0)
    )
    warmup_batch_sizes: tuple[int, ...] | None = _setting(
        None,
        _optional(_integers, "auto"),
        f"batch sizes the warm-up runs, capped at max_batch_size (default: {_sizes(CPU_WARMUP_BATCH_SIZES)} "
        f"on a CPU, {_sizes(GPU_WARMUP_BATCH_SIZES)} on a GPU)",
        check=_batch_sizes,
        metavar="N,N,...",
    )
    keep_warm_s: float = _setting(
        0.0, _number, "run a tiny inference after this many idle seconds (0: never)", check=_at_least(0)
    )
    verify_model: bool = _setting(
        True,
        _boolean,
        "after ready, check the model files' content hashes in the background (a mismatch: /readyz failed)",
    )
    drain_timeout_s: float = _setting(
        30.0, _number, "on SIGTERM, how long to wait for in-flight requests", check=_at_least(0)
    )
    stay_up: bool = _setting(
        False,
        _boolean,
        "if the model cannot be loaded, keep serving /healthz (and /readyz 503) instead of exiting",
    )
    # Jobs (/v1/jobs: serving/jobs/)
    jobs_dir: Path | None = _setting(  # noqa: RUF009 - _setting returns a dataclasses.field
        None,
        _optional(Path),
        "where jobs keep their audio and, by default, their SQLite database (default: $EMOSERVE_HOME/jobs)",
        metavar="DIR",
    )
    jobs_db: str | None = _setting(
        None,
        _optional(_database_url),
        "the jobs' database: a postgresql:// URL, shared by several replicas (their jobs_dir then on a "
        "shared path); default: SQLite in jobs_dir",
        metavar="URL",
    )
    jobs_max_queued: int = _setting(
        100, _integer, "jobs waiting at once; beyond it a new job is refused (429)", check=_at_least(1)
    )
    jobs_max_duration_s: float = _setting(
        4 * 3600.0, _number, "longest recording a job accepts, in seconds", check=_positive
    )
    jobs_max_upload_mb: float = _setting(
        1000.0, _number, "largest job upload in MB (written to jobs_dir as it arrives)", check=_positive
    )
    jobs_max_disk_mb: float = _setting(
        10_000.0,
        _number,
        "most MB of audio the unfinished jobs keep in jobs_dir; beyond it a new job is refused (507)",
        check=_positive,
    )
    jobs_lease_s: float = _setting(
        60.0,
        _number,
        "a worker's hold on its job, renewed with each scored segment; a job whose worker is silent this "
        "long is taken by another (after a crash: by the restarted server)",
        check=_positive,
    )
    jobs_max_attempts: int = _setting(
        3, _integer, "a job whose worker died this many times fails (worker_lost)", check=_at_least(1)
    )
    jobs_poll_s: float = _setting(
        0.5, _number, "how often an idle worker looks for a queued job", check=_positive
    )
    jobs_ttl_h: float = _setting(
        168.0, _number, "hours a finished job and its result are kept, then purged", check=_positive
    )
    jobs_keep_audio: bool = _setting(
        False, _boolean, "keep a job's audio after it ends (default: deleted when the job ends)"
    )
    jobs_workers: int = _setting(
        1,
        _integer,
        "jobs this server scores at once (0: none; it still accepts and answers them)",
        check=_at_least(0),
    )
    allow_private_callbacks: bool = _setting(
        False,
        _boolean,
        "allow job callbacks (webhooks) to loopback, private and link-local addresses",
    )
    jobs_webhook_max_age_s: float = _setting(
        86_400.0,
        _number,
        "how long a webhook is retried (5xx, timeouts) before it is given up",
        check=_positive,
    )
    # What the web UI saves (read by webui/saved.py)
    save_outputs: bool = _setting(True, _boolean, "save each UI recognition under outputs_dir")
    outputs_dir: Path = _setting(  # noqa: RUF009 - _setting returns a dataclasses.field
        OUTPUTS_DIR, Path, "where the UI saves outputs_YYYYMMDD_HHMMSS_<id>/"
    )
    outputs_max_count: int = _setting(
        1000, _integer, "keep at most this many saved UI outputs (0: no limit)", check=_at_least(0)
    )
    outputs_max_age_h: float = _setting(
        168.0, _number, "delete saved UI outputs older than this many hours (0: never)", check=_at_least(0)
    )

    @property
    def jobs_max_upload_bytes(self) -> int:
        return int(self.jobs_max_upload_mb * MB)

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * MB)

    def model_options(self) -> ModelOptions:
        return ModelOptions(**{f.name: getattr(self, f.name) for f, _ in option_fields()})

    def effective_max_audio_s(self, device_type: str = "cpu") -> float:
        """`max_audio_s`, or the default sized for the hardware when it was not set."""
        if self.max_audio_s is not None:
            return self.max_audio_s
        return GPU_MAX_AUDIO_S if device_type == "cuda" else CPU_MAX_AUDIO_S

    @property
    def max_timeline_upload_bytes(self) -> int:
        return int(self.max_timeline_upload_mb * MB)

    def effective_max_timeline_s(self, device_type: str = "cpu") -> float:
        """`max_timeline_s`, or the default sized for the hardware when it was not set."""
        if self.max_timeline_s is not None:
            return self.max_timeline_s
        return GPU_MAX_TIMELINE_S if device_type == "cuda" else CPU_MAX_TIMELINE_S

    def effective_warmup_batch_sizes(self, device_type: str = "cpu") -> tuple[int, ...]:
        """`warmup_batch_sizes`, or the default for the hardware, capped at max_batch_size."""
        sizes = self.warmup_batch_sizes
        if sizes is None:
            sizes = GPU_WARMUP_BATCH_SIZES if device_type == "cuda" else CPU_WARMUP_BATCH_SIZES
        return tuple(sorted({min(size, self.max_batch_size) for size in sizes}))


# ----------------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class SettingInfo:
    """One setting as the command line shows it."""

    name: str
    flag: str  # --max-batch-size
    env: str  # EMOSERVE_MAX_BATCH_SIZE
    default: Any
    is_bool: bool
    help: str
    metavar: str | None
    repeatable: bool = False  # the flag may be given more than once (its values are joined with commas)


def setting_infos() -> Iterator[SettingInfo]:
    for f in dataclasses.fields(Settings):
        yield SettingInfo(
            name=f.name,
            flag=f.metadata["flag"] or "--" + f.name.replace("_", "-"),
            env=env_name(f.name),
            default=f.default,
            is_bool=f.metadata["parse"] is _boolean,
            help=f.metadata["help"],
            metavar=f.metadata["metavar"],
            repeatable=f.metadata["flag"] is not None,
        )


def load_settings(
    flags: Mapping[str, object] | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Settings from `flags` (setting name -> raw string, a bool for switches, or None when not given),
    then `environ` (default: os.environ), then the defaults. Raises SettingsError naming the key."""
    return Settings(**read_settings([f.name for f in dataclasses.fields(Settings)], flags, environ))


def read_settings(
    names: Iterable[str], flags: Mapping[str, object] | None = None, environ: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Some settings only, read as `load_settings` reads them all: the values set by a flag or a variable,
    by name (the rest keep their defaults). For a command's own copies of some settings: `emoserve
    predict`'s model flags, `emoserve stream`'s --api-key."""
    flags = flags or {}
    environ = os.environ if environ is None else environ
    wanted = set(names)
    values: dict[str, Any] = {}
    for f, info in zip(dataclasses.fields(Settings), setting_infos(), strict=True):
        if f.name not in wanted:
            continue
        flag_value = flags.get(f.name)
        if flag_value is not None:
            values[f.name] = _read(f, info.flag, flag_value)
        elif info.env in environ:
            values[f.name] = _read(f, info.env, environ[info.env])
    return values


def _read(f: dataclasses.Field[Any], key: str, raw: object) -> Any:
    if isinstance(raw, list | tuple) and all(isinstance(item, str) for item in raw):
        raw = ",".join(raw)  # a repeatable flag's values
    try:
        value = raw if isinstance(raw, bool) or not isinstance(raw, str) else f.metadata["parse"](raw)
    except ValueError as err:
        raise SettingsError(f"{key}: {err}") from None
    check = f.metadata["check"]
    if value is not None and check is not None and (problem := check(value)):
        raise SettingsError(f"{key}: {problem}")
    return value
