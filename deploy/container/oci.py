"""Pack layer tarballs (a root filesystem, then what goes over it) as an OCI image archive (`podman load`,
`docker load`), with the image config of a Dockerfile stage, so that scripts/build-image.sh needs no
container tool and no registry.

    python3 deploy/container/oci.py deploy/container/Dockerfile TARGET NAME:TAG OUT.oci.tar LAYER.tar...

Each layer's gzip and digests are kept beside it (LAYER.tar.gz, LAYER.tar.json) and reused while the
tarball is unchanged: a cached base layer is compressed once.

The archive holds an OCI image layout (oci-layout, index.json, blobs/sha256/...) and Docker's
manifest.json beside it, as `docker save` writes since Docker 25. Every time stamp is SOURCE_DATE_EPOCH
and the layer is gzip without a name or time, so the same root filesystem gives the same bytes.
Standard library only: it runs on the build host's python3."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import os
import re
import shlex
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
NS_PER_S = 1_000_000_000
DURATION = re.compile(r"^(\d+)(ms|s|m|h)$")
DURATION_NS = {"ms": NS_PER_S // 1000, "s": NS_PER_S, "m": 60 * NS_PER_S, "h": 3600 * NS_PER_S}

# ---------------------------------------------------------------------------------------------
# The Dockerfile: stages and the instructions that become image config


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; comments dropped, continued lines joined."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    lines = (line.strip() for line in text.splitlines())
    return [
        (word.upper(), rest.strip())
        for word, _, rest in (line.partition(" ") for line in lines if line and not line.startswith("#"))
    ]


def stage_chain(dockerfile: Path, target: str) -> list[list[tuple[str, str]]]:
    """The instructions of `target` and of the stages it is built FROM, the first ancestor first."""
    stages: dict[str, tuple[str, list[tuple[str, str]]]] = {}
    current: list[tuple[str, str]] | None = None
    for word, args in instructions(dockerfile):
        if word == "FROM":
            words = args.split()  # FROM parent [AS name]
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else words[0]
            current = []
            stages[name] = (words[0], current)
        elif current is not None:
            current.append((word, args))
    if target not in stages:
        raise SystemExit(f"{dockerfile}: no stage named {target!r} (stages: {', '.join(stages)})")
    chain: list[list[tuple[str, str]]] = []
    name = target
    while name in stages:
        parent, body = stages[name]
        chain.insert(0, body)
        name = parent
    return chain


def pairs(args: str) -> dict[str, str]:
    """ENV/LABEL arguments: key=value pairs, values quoted as in a shell."""
    return dict(word.split("=", 1) for word in shlex.split(args))


def duration_ns(text: str) -> int:
    match = DURATION.match(text)
    if match is None:
        raise SystemExit(f"HEALTHCHECK duration {text!r}: expected a number and ms, s, m or h")
    return int(match[1]) * DURATION_NS[match[2]]


def healthcheck(args: str) -> dict[str, Any]:
    options, _, command = args.partition("CMD")
    check: dict[str, Any] = {"Test": ["CMD", *json.loads(command)]}
    names = {
        "interval": "Interval",
        "timeout": "Timeout",
        "start-period": "StartPeriod",
        "retries": "Retries",
    }
    for option in options.split():
        key, _, value = option.lstrip("-").partition("=")
        check[names[key]] = int(value) if key == "retries" else duration_ns(value)
    return check


def image_config(dockerfile: Path, target: str) -> dict[str, Any]:
    """The `config` of the image the Dockerfile's `target` stage describes (the fields Docker sets)."""
    env: dict[str, str] = {}
    config: dict[str, Any] = {"Labels": {}}
    for body in stage_chain(dockerfile, target):
        for word, args in body:
            if word == "ENV":
                env.update(pairs(args))
            elif word == "LABEL":
                config["Labels"].update(pairs(args))
            elif word == "USER":
                config["User"] = args
            elif word == "WORKDIR":
                config["WorkingDir"] = args
            elif word == "VOLUME":
                config.setdefault("Volumes", {}).update({v: {} for v in json.loads(args)})
            elif word == "EXPOSE":
                ports = (p if "/" in p else f"{p}/tcp" for p in args.split())
                config.setdefault("ExposedPorts", {}).update({p: {} for p in ports})
            elif word in ("ENTRYPOINT", "CMD"):
                config[word.capitalize() if word == "CMD" else "Entrypoint"] = json.loads(args)
            elif word == "HEALTHCHECK":
                config["Healthcheck"] = healthcheck(args)
            elif word == "STOPSIGNAL":
                config["StopSignal"] = args
    config["Env"] = [f"{key}={value}" for key, value in env.items()]
    return config


# ---------------------------------------------------------------------------------------------
# The archive


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def descriptor(media_type: str, digest: str, size: int, **extra: Any) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": f"sha256:{digest}", "size": size, **extra}


def json_blob(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def gzip_layer(layer: Path) -> tuple[Path, dict[str, Any]]:
    """LAYER.tar.gz and its facts (diff_id, digest, sizes), made once per tarball. gzip -n (no name, no
    time): the same tar gives the same bytes; level 6, gzip's default."""
    packed, facts_file = layer.with_name(layer.name + ".gz"), layer.with_name(layer.name + ".json")
    stamp = {"tar_bytes": layer.stat().st_size, "tar_mtime_ns": layer.stat().st_mtime_ns}
    if facts_file.exists() and packed.exists():
        facts = json.loads(facts_file.read_text())
        if all(facts.get(k) == v for k, v in stamp.items()):
            return packed, facts
    partial = packed.with_name(packed.name + ".partial")
    with layer.open("rb") as src, partial.open("wb") as dst:
        subprocess.run(["gzip", "-n", "-6", "-c"], stdin=src, stdout=dst, check=True)
    partial.rename(packed)
    facts = stamp | {
        "diff_id": f"sha256:{sha256_file(layer)}",
        "digest": sha256_file(packed),
        "gzip_bytes": packed.stat().st_size,
    }
    facts_file.write_text(json.dumps(facts))
    return packed, facts


def pack(dockerfile: Path, target: str, ref: str, out: Path, layers: list[Path]) -> dict[str, Any]:
    epoch = int(os.environ.get("SOURCE_DATE_EPOCH", "0"))
    created = dt.datetime.fromtimestamp(epoch, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    name, _, tag = ref.rpartition(":")
    packed = [gzip_layer(layer) for layer in layers]
    config = {
        "created": created,
        "architecture": "amd64",
        "os": "linux",
        "config": image_config(dockerfile, target),
        "rootfs": {"type": "layers", "diff_ids": [facts["diff_id"] for _, facts in packed]},
        "history": [
            {"created": created, "created_by": f"scripts/build-image.sh {target}: {layer.name}"}
            for layer in layers
        ],
    }
    config_bytes = json_blob(config)
    config_digest = hashlib.sha256(config_bytes).hexdigest()
    manifest_bytes = json_blob(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": descriptor(OCI_CONFIG, config_digest, len(config_bytes)),
            "layers": [descriptor(OCI_LAYER, facts["digest"], facts["gzip_bytes"]) for _, facts in packed],
        }
    )
    manifest_digest = hashlib.sha256(manifest_bytes).hexdigest()
    annotations = {
        "org.opencontainers.image.ref.name": tag,
        "io.containerd.image.name": f"docker.io/library/{name}:{tag}",  # what `docker load` tags
    }
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            descriptor(OCI_MANIFEST, manifest_digest, len(manifest_bytes), annotations=annotations)
        ],
    }
    docker_manifest = [
        {
            "Config": f"blobs/sha256/{config_digest}",
            "RepoTags": [ref],
            "Layers": [f"blobs/sha256/{facts['digest']}" for _, facts in packed],
        }
    ]
    partial = out.with_name(f".{out.name}.partial")
    with tarfile.open(partial, "w", format=tarfile.PAX_FORMAT) as archive:

        def add(path: str, data: bytes | None = None, file: Path | None = None) -> None:
            info = tarfile.TarInfo(path)
            info.mtime, info.mode, info.uname, info.gname = epoch, 0o644, "root", "root"
            if data is None and file is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                archive.addfile(info)
            elif file is not None:
                info.size = file.stat().st_size
                with file.open("rb") as f:
                    archive.addfile(info, f)
            else:
                assert data is not None
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))

        add("blobs")
        add("blobs/sha256")
        add(f"blobs/sha256/{config_digest}", config_bytes)
        for layer_gz, facts in packed:
            add(f"blobs/sha256/{facts['digest']}", file=layer_gz)
        add(f"blobs/sha256/{manifest_digest}", manifest_bytes)
        add("index.json", json_blob(index))
        add("manifest.json", json_blob(docker_manifest))
        add("oci-layout", json_blob({"imageLayoutVersion": "1.0.0"}))
    os.replace(partial, out)
    return {
        "ref": ref,
        "archive_bytes": out.stat().st_size,
        "compressed_bytes": sum(facts["gzip_bytes"] for _, facts in packed),
        "unpacked_bytes": sum(facts["tar_bytes"] for _, facts in packed),
        "layers": [facts for _, facts in packed],
        "manifest_digest": f"sha256:{manifest_digest}",
    }


def main(argv: list[str]) -> int:
    if len(argv) < 5:
        print(__doc__, file=sys.stderr)
        return 2
    dockerfile, target, ref, out, *layers = argv
    print(json.dumps(pack(Path(dockerfile), target, ref, Path(out), [Path(layer) for layer in layers])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
