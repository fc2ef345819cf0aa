"""Memory given back to the system (system.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support.paths import CLIP, MODEL

WAV = CLIP.read_bytes()

FREED_MEMORY_PROBE = """
import sys
from emoserve.system import return_freed_memory, trim

def rss_mib():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) // 1024

block_kib, fixes = int(sys.argv[1]), sys.argv[2:]
if "threshold" in fixes:
    return_freed_memory()
big = bytearray(24 << 20)
del big  # by default glibc now serves blocks up to 24 MiB from its heap
blocks, pins = [], []
for _ in range((200 << 10) // block_kib):  # 200 MiB of blocks (a batch's activations), each followed
    blocks.append(bytearray(block_kib << 10))  # by a small allocation that outlives it (a result, a
    pins.append(bytes(range(256)) * 4)  # log record): the heap cannot shrink past them
held = rss_mib()
del blocks
if "trim" in fixes:
    trim()
print(held - rss_mib())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator, /proc")
def test_a_process_with_a_model_gives_freed_batch_memory_back_to_the_system(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The soak's RSS climbed ~330 MB in its first minutes and stayed, and `predict --segments`'s peak grew
    with the recording (system.py)."""
    from emoserve.inference import recognizer as recognizer_module

    def given_back_mib(block_kib: int, *fixes: str) -> int:
        probe = [sys.executable, "-c", FREED_MEMORY_PROBE, str(block_kib), *fixes]
        done = subprocess.run(probe, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return int(done.stdout)

    # 1 MiB blocks: kept by glibc's dynamic threshold, given back with the fixed one
    assert given_back_mib(1024) < 50 and given_back_mib(1024, "threshold") > 190
    # 64 KiB blocks (under any threshold): kept between the pins until trimmed
    assert given_back_mib(64, "threshold") < 50 and given_back_mib(64, "threshold", "trim") > 150

    calls: list[str] = []
    monkeypatch.setattr(recognizer_module, "return_freed_memory", lambda: calls.append("threshold"))
    monkeypatch.setattr(recognizer_module, "trim", lambda: calls.append("trim"))
    # every process that holds a model (the server, a Ray replica, the CLI) makes a Recognizer
    recognizer = recognizer_module.load_model(str(MODEL), device="cpu", dtype="float32")
    assert calls == ["threshold"]
    recognizer.predict_many([CLIP, CLIP], batch_size=1)  # the library's calls, as the engine's
    assert calls == ["threshold", "trim", "trim"]
