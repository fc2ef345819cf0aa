"""The GPU machine as the tests see it: the distributions its image holds (scripts/device-image.txt), the
wheels the GPU run carries (scripts/device-wheels.txt), and `emoserve serve` run where only those (and the
standard library, and emoserve) can be imported."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tests.support.paths import MODEL, ROOT
from tests.support.server import free_port

SCRIPTS = ROOT / "scripts"
IMAGE_LIST = SCRIPTS / "device-image.txt"
WHEELS_LIST = SCRIPTS / "device-wheels.txt"
READY_TIMEOUT_S = 240

# `emoserve serve` behind an import guard: a module whose file belongs to an installed distribution outside
# the allowed ones (argv[2], comma-separated) cannot be found, as on the GPU machine, where it is not
# installed (optional imports then take their fallbacks, needed ones fail the start). At exit it writes the
# distributions of every module imported or located (the timeline locates silero-vad's ONNX file with
# importlib.util.find_spec, without importing it) to argv[1].
GUARDED_SERVE = r"""
import atexit, importlib.machinery, importlib.metadata, json, os, re, sys

def normalized(name):
    return re.sub(r"[-_.]+", "-", name).lower()

allowed = set(sys.argv[2].split(","))
owner_of = {}
for dist in importlib.metadata.distributions():
    name = normalized(dist.metadata["Name"])
    for file in dist.files or ():
        owner_of[os.path.normpath(dist.locate_file(file))] = name

def owner(spec):
    places = [spec.origin] if spec.origin and spec.origin not in ("built-in", "frozen") else []
    places += list(spec.submodule_search_locations or [])[:1]
    for place in places:
        path = os.path.normpath(place)
        for candidate in (path, os.path.join(path, "__init__.py")):
            if candidate in owner_of:
                return owner_of[candidate]
    return None

used, blocked = set(), set()

class Guard:
    def find_spec(self, fullname, path=None, target=None):
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is None:
            return None
        name = owner(spec)
        if name is not None and name not in allowed:
            blocked.add(name)
            why = f"No module named {fullname!r} ({name} is not on the GPU machine)"
            raise ModuleNotFoundError(why, name=fullname)
        if name is not None:
            used.add(name)
        return spec

sys.meta_path.insert(0, Guard())

def record():
    with open(sys.argv[1], "w") as out:
        json.dump({"used": sorted(used), "blocked": sorted(blocked)}, out)

atexit.register(record)
from emoserve.cli import main
sys.exit(main(sys.argv[3:]))
"""


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def listed(path: Path) -> set[str]:
    """The distributions a list file names, normalised (PEP 503)."""
    lines = (line.partition("#")[0].strip() for line in path.read_text().splitlines())
    return {normalized(line) for line in lines if line}


@dataclass(frozen=True)
class GuardedStart:
    ready: bool  # /readyz answered 200 (the model's and the routes' warm-up passed)
    returncode: int | None
    used: set[str]  # distributions whose modules were imported or located
    blocked: set[str]  # installed here, not allowed: their imports failed
    log: str


def guarded_serve_start(tmp_path: Path, allowed: set[str], *extra: str) -> GuardedStart:
    """`emoserve serve --no-ui --backend torch` (the GPU run's serve section, on the CPU) where only
    `allowed` distributions import: spawn -> /readyz 200 -> SIGTERM -> exit; or its failure."""
    port, record = free_port(), tmp_path / "modules.json"
    argv = ["serve", "--model", str(MODEL), "--port", str(port), "--no-ui", "--device", "cpu"]
    argv += ["--backend", "torch", "--threads", "1", "--no-access-log", *extra]
    env = os.environ | {"EMOSERVE_HOME": str(tmp_path / "home"), "EMOSERVE_EXPORT_ONNX": "0"}
    process = subprocess.Popen(
        [sys.executable, "-c", GUARDED_SERVE, str(record), ",".join(sorted(allowed)), *argv],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    ready, url = False, f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + READY_TIMEOUT_S
    try:
        while process.poll() is None and time.monotonic() < deadline and not ready:
            ready = _status(f"{url}/readyz") == 200
            time.sleep(0.05)
        if ready:
            process.send_signal(signal.SIGTERM)
        _, log = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=30)
    found = json.loads(record.read_text()) if record.exists() else {"used": [], "blocked": []}
    return GuardedStart(ready, process.returncode, set(found["used"]), set(found["blocked"]), log)


def _status(url: str) -> int:
    import httpx

    try:
        return httpx.get(url, timeout=5).status_code
    except httpx.TransportError:
        return 0


def image_packages_needed() -> dict[str, str]:
    """The GPU image's distributions that emoserve (without extras) reaches through distributions the device
    has (the image's and the carried wheels'), at this environment's versions: what a simulated device
    installs before the wheels. A dependency neither there nor carried (gradio, PyAV) is not followed."""
    from importlib.metadata import PackageNotFoundError, requires, version

    from packaging.requirements import Requirement

    image, wheels = listed(IMAGE_LIST), listed(WHEELS_LIST)
    needed: dict[str, str] = {}
    seen: set[str] = set()
    todo = ["emoserve"]
    while todo:
        name = todo.pop()
        for text in requires(name) or []:
            requirement = Requirement(text)
            if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
                continue
            dep = normalized(requirement.name)
            if dep in seen or dep not in image | wheels:
                continue
            seen.add(dep)
            try:
                pinned = version(dep)
            except PackageNotFoundError:
                continue
            if dep in image:  # also when carried (anyio, typing_extensions): the image has its own
                needed[dep] = pinned
            todo.append(dep)
    return needed


@dataclass(frozen=True)
class SimulatedDevice:
    python: Path  # a virtual environment's interpreter: the image's packages emoserve needs, nothing else
    wheels: Path  # what scripts/device-wheels.sh fetches, for this interpreter's version


def simulated_device(cache_root: Path) -> SimulatedDevice:
    """A clean virtual environment standing in for the GPU machine's Python (CPU torch instead of CUDA's,
    this interpreter's version instead of 3.12), and the carried wheels fetched by the real script. Kept
    under `cache_root`, keyed by everything that goes into it: a rerun with nothing changed takes seconds."""
    import hashlib

    packages = image_packages_needed()
    python_version = f"{sys.version_info.major}.{sys.version_info.minor}"
    recipe = json.dumps(
        [packages, python_version, WHEELS_LIST.read_text(), (SCRIPTS / "device-wheels.sh").read_text()]
    )
    home = cache_root / hashlib.sha256(recipe.encode()).hexdigest()[:16]
    device = SimulatedDevice(home / "venv" / "bin" / "python", home / "wheels")
    if (home / "done").exists():
        return device
    if home.exists():
        import shutil

        shutil.rmtree(home)
    home.mkdir(parents=True)
    run = {"check": True, "capture_output": True, "text": True, "timeout": 1200}
    subprocess.run([sys.executable, "-m", "venv", str(home / "venv")], **run)
    pins = [f"{name}=={version}" for name, version in sorted(packages.items())]
    pip = [str(device.python), "-m", "pip", "install", "--quiet", "--no-deps", "--disable-pip-version-check"]
    subprocess.run([*pip, *pins], **run)
    env = os.environ | {
        "WHEELS_DIR": str(device.wheels),
        "VERSIONS_PYTHON": sys.executable,  # this environment's versions, as .venv's on the real run
        "DEVICE_PYTHON_VERSION": python_version,
    }
    subprocess.run(["bash", str(SCRIPTS / "device-wheels.sh")], env=env, cwd=ROOT, **run)
    (home / "done").write_text(recipe)
    return device
