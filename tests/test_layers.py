"""The layout's rules (docs/architecture.md): imports point down the layers, no module imports another in
a circle (imports inside functions and under TYPE_CHECKING count), and the torch-free surfaces stay so."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.paths import FIXTURE, ROOT


def test_the_import_contracts_hold() -> None:
    """import-linter's contracts in pyproject.toml: the layers, no circles among a package's modules,
    no HTTP/Gradio/Ray below the surfaces, torch only where the network runs, scikit-learn only where heads
    are trained, Pipecat and LiveKit only in their integrations."""
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "Contracts: 6 kept, 0 broken." in done.stdout, done.stdout[-2000:]


def lint_a_copy(tmp_path: Path, path: str, added: str) -> subprocess.CompletedProcess[str]:
    """import-linter on a copy of the package in which `path` (under src/emoserve) ends with `added`."""
    package = tmp_path / "src" / "emoserve"
    package.parent.mkdir(parents=True)
    subprocess.run(["cp", "-r", str(ROOT / "src" / "emoserve"), str(package.parent)], check=True)
    module = package / path
    module.write_text((module.read_text() if module.exists() else "") + added)
    (tmp_path / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    lint = Path(sys.executable).with_name("lint-imports")
    env = {"PYTHONPATH": str(tmp_path / "src"), "PATH": "/usr/bin:/bin"}
    return subprocess.run([str(lint), "--no-cache"], cwd=tmp_path, capture_output=True, text=True, env=env)


def test_the_contracts_would_catch_an_upward_import_inside_a_function(tmp_path: Path) -> None:
    """The check is not blind to a function-local import that hides an upward arrow."""
    done = lint_a_copy(
        tmp_path, "audio/decode.py", "\n\ndef _up() -> None:\n    from emoserve.serving import service\n"
    )
    assert done.returncode != 0 and "emoserve.audio is not allowed to import emoserve.serving" in done.stdout


@pytest.mark.parametrize("path", ["inference/new_backend.py", "serving/new_part.py", "api/new_route.py"])
def test_a_new_module_that_imports_torch_is_caught_the_day_it_is_added(tmp_path: Path, path: str) -> None:
    """The torch contract is by pattern: a module nobody listed is checked too."""
    done = lint_a_copy(tmp_path, path, "import torch\n")
    module = "emoserve." + path.removesuffix(".py").replace("/", ".")
    assert done.returncode != 0 and f"{module} -> torch" in done.stdout, done.stdout[-2000:]


@pytest.mark.parametrize(
    ("path", "framework"), [("agents/turns.py", "pipecat"), ("serving/live.py", "livekit")]
)
def test_a_voice_agent_framework_imported_outside_its_integration_is_caught(
    tmp_path: Path, path: str, framework: str
) -> None:
    """Nothing of Pipecat or LiveKit is imported without its extra: only integrations/ may import them."""
    done = lint_a_copy(tmp_path, path, f"import {framework}\n")
    module = "emoserve." + path.removesuffix(".py").replace("/", ".")
    assert done.returncode != 0 and f"{module} -> {framework}" in done.stdout, done.stdout[-2000:]


TORCH_FREE = """
import json, sys, time
from pathlib import Path

from emoserve.cli import main
try:
    main(["--help"])
except SystemExit:
    pass
import emoserve.serving, emoserve.serving.service, emoserve.serving.engine, emoserve.api.app
import emoserve.inference.recognizer, emoserve.inference.onnx_backend
assert "torch" not in sys.modules, "importing the surfaces loaded torch"

from fastapi.testclient import TestClient
from emoserve.api.app import create_app
from emoserve.serving.service import Service
from emoserve.serving.settings import Settings

settings = Settings(model=sys.argv[1], backend="onnx", ui=False, threads=1)
service = Service(settings)
clip = Path(sys.argv[2]).read_bytes()
with TestClient(create_app(settings, service)) as client:
    deadline = time.monotonic() + 120
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline and service.phase != "failed", service.state
        time.sleep(0.1)
    got = client.post("/v1/recognize", files={"file": ("clip.wav", clip)})
    assert got.status_code == 200, got.text
print(json.dumps({"torch": "torch" in sys.modules, "emotion": got.json()["emotion"]}))
"""


@pytest.mark.slow
def test_the_torch_free_surfaces_never_import_torch(tiny_onnx_entry: Path) -> None:
    """`emoserve --help`, `import emoserve.serving`, the server's start and a recognition on the onnx
    backend run without torch: the reason the onnx backend starts fast and small."""
    clip = FIXTURE / "audio" / "en_1s_16k.wav"
    done = subprocess.run(
        [sys.executable, "-c", TORCH_FREE, str(tiny_onnx_entry), str(clip)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.splitlines()[-1])["torch"] is False
