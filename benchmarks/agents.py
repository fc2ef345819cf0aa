"""Voice agents: the latency from "user stopped" to a turn's emotion reading (emoserve.agents.TurnReader),
in process and from a server, for one and 4 concurrent sessions. CPU only.

Each session is an asyncio task that plays user turns of TURNS_S seconds (the bundled example clips one
after another, cut to length; TURN_PAUSE_S of silence between turns) into a TurnReader as 20 ms 16-bit
frames at real-time pace, telling it "started" at each turn's first frame and "stopped" after its last.
The reader waits WAIT_S for a turn's own reading, so that its true latency is measured however late;
what a reader with the default timeout (TIMEOUT_S) would have handed over is known from the same run:
the turn's own reading when it came within TIMEOUT_S, else the newest interim reading the turn had at
that moment (a stand-in, marked interim), else none ("lost"). The sessions start STAGGER_S apart.

Figures per level: the latency from "stopped" to the turn's own reading (`latency_s`), p50 and p95, for
turns up to 8 s and for all; the share of turns whose own reading met TIMEOUT_S; the turns that would
have got an interim stand-in, and those that would have got nothing; CPU per session: the process's
user + system time over the level's wall time (in process: this process; remote: the server's),
divided by the sessions.

Backends: in process (`LocalBackend`: one model, the sessions share its engine) at the default precision
(dtype auto) and at float32; remote (`RemoteBackend`) on an `emoserve serve --no-ui` process at float32.
Each with the reader's default, turns read in pieces (`chunk_s` 2 s: at "stopped" only the last piece is
left), and at the default precision also with every turn scored whole (`chunk_s` 0: exact, one call on
the whole turn after "stopped"). Baseline measured in the same run: the model time of each turn length at
idle (`Recognizer.predict` in this process, median of 3), against which the latencies are printed as
ratios. What reading in pieces changes in the reading itself: each turn's pooled reading against the same
audio scored whole (the library's stream with chunk_s against `predict`), the largest score difference
and whether the top emotion is the same.

Targets (issue 25, this 2-core CPU): in process, one session, large model: p95 <= 0.3 s for turns up to
8 s; 4 sessions: p95 <= 0.5 s with no reading lost.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common import (
    bench_model,
    free_port,
    header,
    load_recognizer,
    median,
    parser,
    percentile,
    running_server,
    serve_argv,
    table,
    verdict,
)

TURNS_S = (1.5, 3.0, 5.0, 8.0, 12.0, 15.0)  # a session's turns, in this order
QUICK_TURNS_S = (1.5, 3.0)
SHORT_TURN_S = 8.0  # the target's "turns up to 8 s"
TURN_PAUSE_S = 1.0  # silence between turns (the agent's reply, in a real call)
FRAME_S = 0.02
STAGGER_S = 0.53
TIMEOUT_S = 0.3  # the TurnReader's default
CHUNK_S = 2.0  # the TurnReader's default (agents/turns.py DEFAULT_CHUNK_S)
WAIT_S = 60.0  # the benchmark's reader waits this long: the true latency of a late reading
SESSIONS = (1, 4)
TARGETS = {"p95_one": 0.3, "p95_four": 0.5}
EXAMPLES = Path(__file__).resolve().parent.parent / "src" / "emoserve" / "examples"


def speech(seconds: float) -> bytes:
    """The bundled clips one after another (no pauses), cut to `seconds`, as 16 kHz 16-bit PCM."""
    from emoserve.audio.decode import load_audio

    clips = [load_audio(path, max_seconds=None).samples for path in sorted(EXAMPLES.iterdir())]
    n, parts = int(seconds * 16_000), []
    while sum(map(len, parts)) < n:
        parts += clips
    audio = np.concatenate(parts)[:n]
    return np.clip(np.round(audio * 32768.0), -32768, 32767).astype("<i2").tobytes()


@dataclass
class TurnResult:
    seconds: float
    latency_s: float | None  # of the turn's own reading (None: it never came)
    stand_in: bool  # at TIMEOUT_S the turn had an interim reading to stand in
    lost: bool  # at TIMEOUT_S the turn had neither its own reading nor an interim one

    @property
    def met(self) -> bool:
        return self.latency_s is not None and self.latency_s <= TIMEOUT_S


@dataclass
class Level:
    name: str
    sessions: int
    turns: list[TurnResult] = field(default_factory=list)
    wall_s: float = 0.0
    cpu_s: float = 0.0

    def latencies(self, longest_s: float = float("inf")) -> list[float]:
        return [t.latency_s for t in self.turns if t.latency_s is not None and t.seconds <= longest_s]

    def met(self) -> float:
        return sum(t.met for t in self.turns) / len(self.turns)

    def interims(self) -> int:
        return sum(1 for t in self.turns if not t.met and t.stand_in)

    def lost(self) -> int:
        return sum(1 for t in self.turns if not t.met and t.lost)


async def session(
    backend: Any, turns: list[bytes], start_at: float, out: list[TurnResult], chunk_s: float
) -> None:
    from emoserve.agents import TurnReader

    reader = TurnReader(backend, timeout=WAIT_S, chunk_s=chunk_s)
    loop = asyncio.get_running_loop()
    await asyncio.sleep(max(0.0, start_at - loop.time()))
    size = int(FRAME_S * 16_000) * 2
    t0, sent = loop.time(), 0
    pause = b"\x00\x00" * int(TURN_PAUSE_S * 16_000)
    waits = []

    async def play(pcm: bytes) -> None:
        nonlocal sent
        for at in range(0, len(pcm), size):
            due = t0 + sent * FRAME_S
            if (wait := due - loop.time()) > 0:
                await asyncio.sleep(wait)
            reader.feed(pcm[at : at + size], 16_000)
            sent += 1

    async def result(turn: Any, seconds: float) -> None:
        if turn is None:
            out.append(TurnResult(seconds, None, False, True))
            return
        await asyncio.sleep(max(0.0, turn.stopped_at + TIMEOUT_S - time.monotonic()))
        stand_in = turn.interim is not None or (turn._final.done() and turn._final.result()[0] is not None)
        reading = await turn.reading()
        own = reading is not None and not reading.interim
        out.append(TurnResult(seconds, reading.latency_s if own else None, stand_in, not stand_in))

    await play(pause)
    for pcm in turns:
        reader.speech_started()
        await play(pcm)
        waits.append(asyncio.ensure_future(result(reader.speech_stopped(), len(pcm) / 32_000)))
        await play(pause)
    await asyncio.gather(*waits)
    await reader.close()


def run_level(
    name: str, make_backend: Any, sessions: int, turns: list[bytes], cpu: Any, chunk_s: float = CHUNK_S
) -> Level:
    level = Level(name, sessions)

    async def main() -> None:
        backend = make_backend()
        loop = asyncio.get_running_loop()
        outs: list[list[TurnResult]] = [[] for _ in range(sessions)]
        start = loop.time() + 0.2
        await asyncio.gather(
            *(session(backend, turns, start + i * STAGGER_S, outs[i], chunk_s) for i in range(sessions))
        )
        level.turns = [t for o in outs for t in o]

    cpu_before, wall_before = cpu(), time.perf_counter()
    asyncio.run(main())
    level.wall_s, level.cpu_s = time.perf_counter() - wall_before, cpu() - cpu_before
    return level


def own_cpu() -> float:
    times = os.times()
    return times.user + times.system


def process_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def model_times(recognizer: Any, turns: list[bytes], runs: int) -> dict[float, float]:
    """The model time of each turn's audio at idle (the baseline)."""
    out = {}
    for pcm in turns:
        samples = np.frombuffer(pcm, "<i2").astype(np.float32) / 32768.0
        recognizer.predict(samples, sample_rate=16_000)  # warm
        times = []
        for _ in range(runs):
            started = time.perf_counter()
            recognizer.predict(samples, sample_rate=16_000)
            times.append(time.perf_counter() - started)
        out[len(pcm) / 32_000] = median(times)
    return out


def pieces_against_whole(recognizer: Any, turns: list[bytes]) -> None:
    """Each turn's reading in pieces (the library's stream, vad=off, chunk_s) against it scored whole."""
    rows = []
    for pcm in turns:
        samples = np.frombuffer(pcm, "<i2").astype(np.float32) / 32768.0
        whole = recognizer.predict(samples, sample_rate=16_000)
        stream = recognizer.stream(use_vad=False, chunk_s=CHUNK_S)
        pooled = (stream.feed(pcm) + stream.flush())[-1]
        assert pooled["type"] == "segment"
        diff = max(abs(whole.scores[k] - pooled["scores"][k]) for k in whole.scores)
        top = "same" if whole.emotion == pooled["emotion"] else f"{whole.emotion} -> {pooled['emotion']}"
        rows.append([f"{len(pcm) / 32_000:g}", pooled.get("pieces", 0), f"{diff:.4f}", top,
                     f"{whole.confidence:.3f}", f"{pooled['confidence']:.3f}"])  # fmt: skip
    where = f"{recognizer.backend.name} {recognizer.dtype}"
    print(f"read in pieces of {CHUNK_S:g} s against scored whole ({where}):")
    table(["turn (s)", "pieces", "largest score difference", "top emotion", "whole: top score",
           "pieces: top score"], rows)  # fmt: skip
    print()


def report(levels: list[Level], baseline: dict[float, float]) -> None:
    rows = []
    short_model = max(v for k, v in baseline.items() if k <= SHORT_TURN_S)
    for level in levels:
        short, every = level.latencies(SHORT_TURN_S), level.latencies()
        p95_short = percentile(short, 95)
        rows.append([
            level.name, level.sessions, f"{percentile(short, 50):.3f}", f"{p95_short:.3f}",
            f"{p95_short / short_model:.2f}x", f"{percentile(every, 50):.3f}", f"{percentile(every, 95):.3f}",
            f"{100 * level.met():.0f} %", level.interims(), level.lost(),
            f"{level.cpu_s / level.wall_s / level.sessions:.2f}",
        ])  # fmt: skip
    print("stopped -> reading (s); ratio: p95 of turns <= 8 s over the model time of the 8 s turn at idle")
    table(
        ["backend", "sessions", "p50 <= 8 s", "p95 <= 8 s", "p95 / model", "p50 all", "p95 all",
         "met 0.3 s", "interim stand-in", "lost", "CPU / session"],
        rows,
    )  # fmt: skip
    print("model time at idle (baseline): " + ", ".join(f"{k:g} s: {v:.3f} s" for k, v in baseline.items()))
    print()
    for level in levels:
        if level.name.startswith("in process") and level.sessions in (1, 4):  # each kind against the target
            limit = TARGETS["p95_one"] if level.sessions == 1 else TARGETS["p95_four"]
            p95 = percentile(level.latencies(SHORT_TURN_S), 95)
            print(f"- {level.name}, {level.sessions} session(s): p95 {p95:.3f} s {verdict(p95, limit)}"
                  f"; turns with no reading at the timeout: {level.lost()}")  # fmt: skip


def main() -> None:
    args = parser(__doc__, default_runs=3).parse_args()
    runs = 1 if args.quick else args.runs
    header("Voice agents: stopped -> reading", args, runs)
    model = bench_model(args.preset)
    turns = [speech(s) for s in (QUICK_TURNS_S if args.quick else TURNS_S)]
    from emoserve.agents import LocalBackend, RemoteBackend

    levels: list[Level] = []
    baseline: dict[float, float] = {}
    for dtype in ("auto", "float32"):
        recognizer = load_recognizer(model.entry, backend="auto", dtype=dtype)
        print(f"in process, dtype {dtype}: {recognizer.backend.name} {recognizer.dtype}")
        if dtype == "float32":
            baseline = model_times(recognizer, turns, runs)
        pieces_against_whole(recognizer, turns)
        for chunk_s in (CHUNK_S, 0.0) if dtype == "auto" else (CHUNK_S,):
            how = f"pieces {chunk_s:g} s" if chunk_s else "whole"
            for n in SESSIONS:
                make = lambda r=recognizer: LocalBackend(r)  # noqa: E731
                levels.append(run_level(f"in process, {dtype}, {how}", make, n, turns, own_cpu, chunk_s))
    port = free_port()
    argv = serve_argv(model.entry, port, "--no-ui", "--dtype", "float32")
    url = f"ws://127.0.0.1:{port}"
    with running_server("agents", argv, port) as server:
        server.wait_for("/readyz")
        for n in SESSIONS:
            levels.append(run_level(f"remote, float32, pieces {CHUNK_S:g} s", lambda: RemoteBackend(url), n,
                                    turns, lambda: process_cpu(server.pid)))  # fmt: skip
    print()
    report(levels, baseline)
    print(json.dumps({"levels": [[lv.name, lv.sessions, lv.latencies()] for lv in levels]}))


if __name__ == "__main__":
    main()
