"""The container image, built by scripts/build-image.sh (no container registry) and run.

Each target (cpu: torch's CPU wheel; onnx: no torch; ray: cpu + the ray extra) is built once per session
(cached under .cache/image: seconds when nothing changed), and then:
- the build left the host's /dev/null a character device (mmdebstrap's root mode once replaced it);
- the archive is a valid OCI layout whose config says what the Dockerfile promises (user, entrypoint,
  env, port, volume, healthcheck, stop signal, labels), and Docker's manifest.json names the same blobs;
- the root filesystem carries no compiler, no pip, no pip cache, no test suites (and no torch in onnx);
- the root filesystem runs the entrypoint as uid 1000 under runc (crun where it works; chroot + setpriv
  where no runtime does), the root read-only and only /models (the random-weight test model) and /tmp
  writable: /healthz answers, /readyz turns 200, the HEALTHCHECK command passes, a recognition succeeds,
  and SIGTERM ends it with exit 0."""

from __future__ import annotations

import gzip
import hashlib
import importlib.metadata
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import tarfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest
import yaml

from tests.support.environment import skip_or_fail
from tests.support.paths import ROOT

pytestmark = pytest.mark.slow

BUILD = ROOT / "scripts" / "build-image.sh"
EXAMPLE = ROOT / "src" / "emoserve" / "examples" / "zh_3s_16k.wav"
PROJECT = importlib.metadata.metadata("emoserve")  # the installed project: pyproject.toml's version, licence
TARGETS = ["cpu", "onnx", "ray"]
RAYSERVICE = yaml.safe_load((ROOT / "deploy" / "kubernetes" / "rayservice.yaml").read_text())
RAY_VERSION = RAYSERVICE["spec"]["rayClusterConfig"]["rayVersion"]
BUILD_TIMEOUT_S = 1800  # cold: Debian packages + ~370 MB of wheels + gzip of the layer
READY_TIMEOUT_S = 120
UID = 1000


def is_char_device(path: str) -> bool:
    return stat.S_ISCHR(os.stat(path).st_mode)


def why_no_build() -> str | None:
    """Why mmdebstrap's unshare mode cannot run here, or None."""
    if shutil.which("mmdebstrap") is None:
        return "mmdebstrap is missing (scripts/setup-system.sh installs it as root)"
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"no user namespaces here (unshare --user: {probe.stderr.strip()})"
    return None


# ---------------------------------------------------------------------------------------------
# The image as built


@dataclass(frozen=True)
class Image:
    archive: Path
    target: str
    build_s: float

    def member(self, name: str) -> bytes:
        with tarfile.open(self.archive) as archive:
            f = archive.extractfile(name)
            assert f is not None, name
            return f.read()

    def blob(self, digest: str) -> bytes:
        return self.member(f"blobs/sha256/{digest.removeprefix('sha256:')}")

    def manifest(self) -> dict[str, Any]:
        (entry,) = json.loads(self.member("index.json"))["manifests"]
        return json.loads(self.blob(entry["digest"]))

    def config(self) -> dict[str, Any]:
        return json.loads(self.blob(self.manifest()["config"]["digest"]))

    def layer_names(self) -> list[str]:
        """The layers' blobs, the base first."""
        return [
            f"blobs/sha256/{layer['digest'].removeprefix('sha256:')}" for layer in self.manifest()["layers"]
        ]

    def unpack(self, into: Path) -> Path:
        """The root filesystem, its layers one over the other, owners kept (we are root here)."""
        into.mkdir(parents=True)
        with tarfile.open(self.archive) as archive:
            for name in self.layer_names():
                layer = archive.extractfile(name)
                assert layer is not None
                untar = subprocess.Popen(
                    ["tar", "-xz", "--numeric-owner", "-C", str(into)], stdin=subprocess.PIPE
                )
                assert untar.stdin is not None
                shutil.copyfileobj(layer, untar.stdin, 1 << 20)
                untar.stdin.close()
                assert untar.wait() == 0
        return into

    def files(self) -> list[str]:
        names: list[str] = []
        with tarfile.open(self.archive) as archive:
            for name in self.layer_names():
                layer = archive.extractfile(name)
                assert layer is not None
                with tarfile.open(fileobj=gzip.GzipFile(fileobj=layer), mode="r|") as rootfs:
                    names += [m.name.removeprefix("./") for m in rootfs]
        return names


@pytest.fixture(scope="module", params=TARGETS)
def image(request: pytest.FixtureRequest) -> Image:
    if os.geteuid() != 0:
        skip_or_fail("the image test needs root (to unpack the root filesystem with its owners and run it)")
    if reason := why_no_build():
        skip_or_fail(reason)
    target = request.param
    started = time.monotonic()
    build = subprocess.run(
        ["nice", "-n", "10", str(BUILD), target],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
    )
    assert is_char_device("/dev/null"), "the build replaced the host's /dev/null"
    assert build.returncode == 0, build.stderr[-4000:]
    # the project's layer is installed by this venv's pip under --root: it must leave this venv alone
    assert importlib.metadata.version("emoserve") == PROJECT["Version"]
    archive = ROOT / "dist" / f"emoserve-{PROJECT['Version']}-{target}.oci.tar"
    return Image(archive, target, time.monotonic() - started)


def test_the_build_leaves_the_host_dev_null_a_character_device(image: Image) -> None:
    info = os.stat("/dev/null")
    assert stat.S_ISCHR(info.st_mode) and (os.major(info.st_rdev), os.minor(info.st_rdev)) == (1, 3)
    print(f"{image.target}: built or reused in {image.build_s:.0f} s")


def test_the_oci_config_says_what_the_dockerfile_promises(image: Image) -> None:
    assert json.loads(image.member("oci-layout")) == {"imageLayoutVersion": "1.0.0"}
    manifest = image.manifest()
    for descriptor in [manifest["config"], *manifest["layers"]]:  # every blob is what its digest says
        assert (
            "sha256:" + hashlib.sha256(image.blob(descriptor["digest"])).hexdigest() == descriptor["digest"]
        )
    (docker,) = json.loads(image.member("manifest.json"))
    assert docker["RepoTags"] == [f"emoserve:{PROJECT['Version']}-{image.target}"]
    assert docker["Config"] == f"blobs/sha256/{manifest['config']['digest'].removeprefix('sha256:')}"
    assert docker["Layers"] == image.layer_names()
    assert len(config_diff_ids := image.config()["rootfs"]["diff_ids"]) == len(docker["Layers"]), (
        config_diff_ids
    )

    config = image.config()
    assert (config["os"], config["architecture"]) == ("linux", "amd64")
    c = config["config"]
    env = dict(item.split("=", 1) for item in c["Env"])
    assert c["User"] == f"{UID}:{UID}"
    assert c["Entrypoint"] == ["emoserve"] and c["Cmd"] == ["serve"]
    assert env["EMOSERVE_HOME"] == "/models" and c["Volumes"] == {"/models": {}}
    assert env["EMOSERVE_HOST"] == "0.0.0.0" and c["ExposedPorts"] == {f"{env['EMOSERVE_PORT']}/tcp": {}}
    assert env["PATH"].startswith("/opt/emoserve/bin:")
    assert c["Healthcheck"]["Test"] == ["CMD", "emoserve-healthcheck"]
    assert c["Healthcheck"]["StartPeriod"] >= 60 * 10**9  # a first start may convert a model
    assert c["StopSignal"] == "SIGTERM"
    labels = c["Labels"]
    assert labels["org.opencontainers.image.version"] == PROJECT["Version"]
    assert labels["org.opencontainers.image.licenses"] == PROJECT["License"]
    assert labels["org.opencontainers.image.source"].startswith("https://")
    # reproducible: every time in the archive is SOURCE_DATE_EPOCH, no build-time clock
    with tarfile.open(image.archive) as archive:
        assert len({m.mtime for m in archive.getmembers()}) == 1


def test_the_image_carries_no_compilers_pip_caches_or_tests(image: Image) -> None:
    files = image.files()
    site = next(f.removesuffix("/emoserve/__init__.py") for f in files if f.endswith("/emoserve/__init__.py"))
    assert site.startswith("opt/emoserve/lib/python3")
    assert "usr/local/bin/emoserve-healthcheck" in files and "opt/emoserve/bin/emoserve" in files
    programs = {f.rsplit("/", 1)[-1] for f in files if f.rsplit("/", 1)[0].endswith(("bin", "sbin"))}
    compilers = programs & {"gcc", "cc", "c++", "g++", "clang", "ld", "as", "make", "pip", "pip3"}
    assert not compilers
    assert not [f for f in files if "/.cache/pip" in f or f.startswith(f"{site}/pip/")]
    assert not [f for f in files if "/tests/" in f and f.startswith(site)]
    assert not [f for f in files if f.startswith(("var/lib/apt/lists/", "var/cache/apt/")) and f[-1] != "/"]
    assert not [f for f in files if f.startswith("usr/share/man/") and f[-1] != "/"]
    torch = [f for f in files if f.startswith(f"{site}/torch/")]
    assert bool(torch) == (image.target != "onnx")


# ---------------------------------------------------------------------------------------------
# The image running


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str, data: bytes | None = None, timeout_s: float = 5) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=timeout_s) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def wait_for(url: str, status: int, timeout_s: float, alive: Any) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        assert alive(), "the container ended"
        try:
            if get(url, timeout_s=2)[0] == status:
                return time.monotonic() - started
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} did not answer {status} within {timeout_s} s")


@pytest.fixture(scope="module")
def served_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's random-weight test model, converted with its ONNX graph (the onnx image has no
    torch to convert it), in a cache folder the container's user owns, as a volume would be."""
    from emoserve.model.convert import convert
    from emoserve.model.testing import make_test_model

    work = tmp_path_factory.mktemp("container-model")
    published = make_test_model(work / "published", preset="tiny")
    models = work / "models"
    convert(published, models / "test-tiny", onnx=True)
    for path in [models, *models.rglob("*")]:
        os.chown(path, UID, UID)
    return models


def runtime() -> list[str] | None:
    """A container runtime: runc first, as crun 1.8 refuses hosts with hybrid cgroups (v1 + v2).
    EMOSERVE_CONTAINER_RUNTIME=chroot takes the fallback (chroot + setpriv) even where one is there."""
    if os.environ.get("EMOSERVE_CONTAINER_RUNTIME") == "chroot":
        return None
    for name in ("runc", "crun"):
        if shutil.which(name) is None:
            continue
        probe = subprocess.run([name, "--version"], capture_output=True)
        if probe.returncode == 0:
            return [name]
    return None


def bundle_config(rootfs: Path, models: Path, config: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    """An OCI runtime config for the image: its user, entrypoint, env and working directory; a user
    namespace (identity map), the root read-only, tmpfs on /tmp, the model volume at /models."""
    c = config["config"]
    uid, gid = (int(part) for part in c["User"].split(":"))
    environ = dict(item.split("=", 1) for item in c["Env"]) | env
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": uid, "gid": gid},
            "args": c["Entrypoint"] + c["Cmd"],
            "env": [f"{k}={v}" for k, v in environ.items()],
            "cwd": c["WorkingDir"],
            "capabilities": {k: [] for k in ("bounding", "effective", "inheritable", "permitted", "ambient")},
            "noNewPrivileges": True,
        },
        "root": {"path": str(rootfs), "readonly": True},
        "hostname": "emoserve",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"]},
            {
                "destination": "/dev/pts",
                "type": "devpts",
                "source": "devpts",
                "options": ["nosuid", "noexec"],
            },
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "nodev"]},
            {"destination": "/sys", "type": "none", "source": "/sys", "options": ["rbind", "nosuid", "ro"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev"]},
            {"destination": "/models", "type": "none", "source": str(models), "options": ["rbind", "rw"]},
        ],
        "linux": {
            # no network namespace: the server's port is reached on the host's loopback
            "namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount", "user")],
            "uidMappings": [{"containerID": 0, "hostID": 0, "size": 65536}],
            "gidMappings": [{"containerID": 0, "hostID": 0, "size": 65536}],
            "maskedPaths": ["/proc/kcore", "/proc/keys", "/sys/firmware"],
            "readonlyPaths": ["/proc/sys", "/proc/sysrq-trigger"],
        },
    }


@dataclass
class Running:
    process: subprocess.Popen[str]
    stop: Callable[[], None]  # SIGTERM to the server
    exec_in: Callable[[list[str]], subprocess.CompletedProcess[str]]  # argv run inside, as the image's user
    kill: Callable[[], None]


def run_with_runtime(tool: list[str], bundle: Path, state: Path, name: str, log: IO[str]) -> Running:
    root = [*tool, "--root", str(state)]
    process = subprocess.Popen(
        [*root, "run", "--bundle", str(bundle), name], stdout=log, stderr=log, text=True
    )

    def kill() -> None:
        subprocess.run([*root, "kill", name, "KILL"], capture_output=True)
        process.wait(30)
        subprocess.run([*root, "delete", "--force", name], capture_output=True)

    return Running(
        process,
        stop=lambda: subprocess.run([*root, "kill", name, "TERM"], check=True) and None,
        exec_in=lambda argv: subprocess.run([*root, "exec", name, *argv], capture_output=True, text=True),
        kill=kill,
    )


CHROOT_MOUNTS = """set -e
r="$1"; models="$2"; shift 2
mount --make-rprivate /
mount --bind "$r" "$r"
mount --bind "$models" "$r/models"
mount -t tmpfs -o nosuid,nodev tmpfs "$r/tmp"
mount -t proc proc "$r/proc"
mount -t tmpfs -o nosuid,mode=755 tmpfs "$r/dev"
mkdir "$r/dev/shm" && mount -t tmpfs -o nosuid,nodev tmpfs "$r/dev/shm"  # multiprocessing's locks (gradio)
for node in null zero full random urandom; do
    : > "$r/dev/$node"  # on the tmpfs just mounted, never on the host's /dev
    mount --bind "/dev/$node" "$r/dev/$node"
done
mount -o remount,bind,ro "$r"
exec chroot "$r" "$@"
"""


def run_with_chroot(bundle: Path, config: dict[str, Any], log: IO[str]) -> Running:
    """No container runtime: a mount and PID namespace of our own (unshare), the root filesystem bound
    read-only, /models and /tmp writable, host device nodes bound onto a tmpfs /dev (nothing is created
    on the host's /dev), then chroot + setpriv to the image's user with no capabilities."""
    process_spec = config["process"]
    user = process_spec["user"]
    as_user = [
        "setpriv", f"--reuid={user['uid']}", f"--regid={user['gid']}", "--clear-groups",
        "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs",
        "env", "-i", *process_spec["env"],
    ]  # fmt: skip
    models = next(m["source"] for m in config["mounts"] if m["destination"] == "/models")
    rootfs = config["root"]["path"]
    launcher = ["unshare", "--mount", "--pid", "--fork", "--kill-child", "sh", "-c", CHROOT_MOUNTS, "sh"]
    workdir = ["sh", "-c", 'cd "$0" && exec "$@"', process_spec["cwd"]]
    process = subprocess.Popen(
        [*launcher, rootfs, models, *as_user, *workdir, *process_spec["args"]],
        stdout=log,
        stderr=log,
        text=True,
    )

    def server_pid() -> int:  # unshare's child: pid 1 of the namespace, exec'd into the server
        children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
        return int(children[0])

    def exec_in(argv: list[str]) -> subprocess.CompletedProcess[str]:
        enter = ["nsenter", "-t", str(server_pid()), "-m", "-p", "-r", "-w"]
        return subprocess.run([*enter, *as_user, *argv], capture_output=True, text=True)

    def kill() -> None:
        process.kill()
        process.wait(30)

    return Running(process, stop=lambda: os.kill(server_pid(), signal.SIGTERM), exec_in=exec_in, kill=kill)


@pytest.fixture
def container(image: Image, served_models: Path, tmp_path: Path) -> Iterator[tuple[Running, int]]:
    bundle = tmp_path / "bundle"
    rootfs = image.unpack(bundle / "rootfs")
    port = free_port()
    env = {"EMOSERVE_MODEL": "/models/test-tiny", "EMOSERVE_PORT": str(port), "EMOSERVE_THREADS": "1"}
    config = bundle_config(rootfs, served_models, image.config(), env)
    (bundle / "config.json").write_text(json.dumps(config))
    tool = runtime()
    if tool is None and shutil.which("setpriv") is None:
        skip_or_fail("neither a container runtime (runc, crun) nor setpriv: install Debian's runc")
    with (tmp_path / "container.log").open("w") as log:
        if tool is not None:
            state, name = tmp_path / "state", f"emoserve-test-{os.getpid()}-{image.target}"
            running = run_with_runtime(tool, bundle, state, name, log)
        else:
            running = run_with_chroot(bundle, config, log)
        try:
            yield running, port
        finally:
            if running.process.poll() is None:
                running.kill()
            print((tmp_path / "container.log").read_text()[-3000:])
            assert is_char_device("/dev/null")


def test_the_image_serves_as_its_user_on_a_read_only_root(
    container: tuple[Running, int], image: Image
) -> None:
    running, port = container
    base = f"http://127.0.0.1:{port}"
    alive = lambda: running.process.poll() is None  # noqa: E731
    healthz_s = wait_for(f"{base}/healthz", 200, 60, alive)
    ready_s = wait_for(f"{base}/readyz", 200, READY_TIMEOUT_S, alive)
    print(f"{image.target}: /healthz after {healthz_s:.1f} s, /readyz 200 after {healthz_s + ready_s:.1f} s")

    status = running.exec_in(["/bin/sh", "-c", "grep -E '^(Uid|Gid):' /proc/1/status"]).stdout.split()
    assert status[1:5] == [str(UID)] * 4 and status[6:10] == [str(UID)] * 4, (
        status
    )  # real, effective, saved, fs
    assert running.exec_in(["emoserve-healthcheck"]).returncode == 0

    code, body = get(f"{base}/")  # the web UI mounted (gradio needs /dev/shm for its locks)
    assert code == 200 and b"gradio" in body.lower(), body[:500]
    code, body = get(f"{base}/v1/recognize", data=EXAMPLE.read_bytes(), timeout_s=60)
    assert code == 200, body
    result = json.loads(body)
    assert result["random_weights"] is True and result["emotion"] in result["scores"]
    code, body = get(f"{base}/v1/model")
    about = json.loads(body)
    # a graph runtime, torch-free (openvino bfloat16 where the CPU has native bf16, else onnx float32)
    assert code == 200 and about["backend"] in ("onnx", "openvino"), body
    assert (result["backend"], result["dtype"]) == (about["backend"], about["dtype"])
    if image.target == "ray":  # what deploy/kubernetes/rayservice.yaml runs in it: Ray and KubeRay's wget
        ray = running.exec_in(["python", "-c", "import ray, emoserve.ray_serve; print(ray.__version__)"])
        assert ray.stdout.strip() == RAY_VERSION, ray
        assert running.exec_in(["wget", "--version"]).returncode == 0

    # nothing but /models and /tmp is writable (the root is read-only); the server wrote nowhere else
    probe = running.exec_in(["/bin/sh", "-c", "touch /opt/x 2>&1; touch /home/emoserve/x 2>&1; touch /tmp/x"])
    assert probe.stdout.count("Read-only file system") == 2 and probe.returncode == 0, probe

    running.stop()
    assert running.process.wait(60) == 0
