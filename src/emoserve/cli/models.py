"""The model's files: `emoserve download`, `convert`, `info`, `verify` and `make-test-model` (the cache and
conversion of `model/`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from emoserve.cli.shared import add_model_flags, model_options
from emoserve.constants import DEFAULT_MODEL
from emoserve.model.config import PRESETS

if TYPE_CHECKING:
    from emoserve.cli.shared import Commands


def add_commands(sub: Commands) -> None:
    for add in (add_download, add_convert, add_info, add_verify, add_make_test_model):
        add(sub)


def add_download(sub: Commands) -> None:
    p = sub.add_parser("download", help="download a published model and convert it into the cache")
    p.add_argument("name", nargs="?", default=DEFAULT_MODEL)
    add_model_flags(p, names=("hub",))
    p.set_defaults(run=cmd_download)


def add_convert(sub: Commands) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a published model directory into a slim cache entry with its ONNX graph "
        "(an entry without the graph gets it added)",
    )
    p.add_argument("model_dir", type=Path, help="a published model directory or a converted entry")
    p.add_argument("--out", type=Path, help="where to write the entry (default: in the cache)")
    p.add_argument("--int8", action="store_true", help="also the int8 (dynamically quantized) ONNX graph")
    p.add_argument("--no-onnx", action="store_true", help="no ONNX graph (the torch backend only)")
    p.set_defaults(run=cmd_convert)


def add_info(sub: Commands) -> None:
    p = sub.add_parser("info", help="config, parameter count, labels, files and sizes of a model")
    p.add_argument("model", nargs="?", help=f"directory or name (default {DEFAULT_MODEL})")
    p.add_argument("--verify", action="store_true", help="also check every file's content hash")
    p.set_defaults(run=cmd_info)


def add_verify(sub: Commands) -> None:
    p = sub.add_parser(
        "verify", help="check a converted model's files against the content hashes recorded at conversion"
    )
    p.add_argument("model", nargs="?", help=f"directory or name (default {DEFAULT_MODEL})")
    p.set_defaults(run=cmd_verify)


def add_make_test_model(sub: Commands) -> None:
    p = sub.add_parser("make-test-model", help="write a RANDOM-weight model in the published layout")
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--training-state",
        action="store_true",
        help="pad model.pt with dummy optimizer state to the published size (for load benchmarks)",
    )
    p.set_defaults(run=cmd_make_test_model)


def cmd_download(args: argparse.Namespace) -> None:
    from emoserve.model.cache import home, resolve_name

    print(resolve_name(args.name, hub_name=model_options(args).hub, cache=home(), progress=True))


def cmd_convert(args: argparse.Namespace) -> None:
    """Convert once into the cache (or --out); an entry without its ONNX graphs gets them added."""
    from emoserve.model.cache import home, resolve_dir
    from emoserve.model.convert import add_onnx, convert
    from emoserve.model.entry import read_entry

    onnx = not args.no_onnx
    if args.out:
        entry = convert(args.model_dir, args.out, onnx=onnx, int8=args.int8)
    else:
        entry = resolve_dir(args.model_dir, home())
    dtypes = ("float32", "int8") if args.int8 else ("float32",)
    info = read_entry(entry)
    for dtype in dtypes if onnx else ():
        if info.onnx_graph(dtype) is None:
            info = add_onnx(entry, dtype)
        if info.onnx_graph(dtype) is None:
            raise ValueError(f"ONNX export ({dtype}) failed: {info.onnx[dtype].get('error')}")
    print(entry)


def cmd_info(args: argparse.Namespace) -> int:
    import json

    from emoserve.model.cache import describe

    info = describe(args.model)
    if args.verify:
        info["verify"] = verify_problems(args.model)
    print(json.dumps(info, indent=2, ensure_ascii=False))
    return 1 if info.get("verify") else 0


def cmd_verify(args: argparse.Namespace) -> int:
    problems = verify_problems(args.model)
    for problem in problems:
        print(f"DAMAGED: {problem}", file=sys.stderr)
    if not problems:
        print("ok: every file matches the hashes recorded at conversion")
    return 1 if problems else 0


def verify_problems(model: str | None) -> list[str]:
    """The full check of the converted entry of `model` (nothing is downloaded or converted)."""
    from emoserve.model.cache import entry_of
    from emoserve.model.entry import check_entry, read_manifest

    entry = entry_of(model)
    if not read_manifest(entry).get("files"):
        return [f"{entry}: no content hashes recorded (converted by an older emoserve): convert it again"]
    return [f"{entry}: {problem}" for problem in check_entry(entry, full=True)]


def cmd_make_test_model(args: argparse.Namespace) -> None:
    from emoserve.model.testing import make_test_model

    out = make_test_model(args.out, preset=args.preset, seed=args.seed, training_state=args.training_state)
    print(f"{out}  (RANDOM weights, preset {args.preset}, seed {args.seed})")
