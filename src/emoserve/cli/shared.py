"""What several command families share: the model flags (built from `ModelOptions`' declarations), the
speech detection's flags, Ray's --address, how a flag shows its variable, and loading a head."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emoserve.constants import MAX_SEGMENT_S, VAD_THRESHOLD
from emoserve.inference.options import ModelOptions, env_name, option_fields

if TYPE_CHECKING:
    Commands = argparse._SubParsersAction[argparse.ArgumentParser]
    Group = argparse.ArgumentParser | argparse._ArgumentGroup


def with_variable(help: str, env: str, default: object = None) -> str:
    """A flag's help with the variable it falls back to: `help [EMOSERVE_X; default D]` (no default shown
    for None: the help says what happens when it is not set)."""
    shown = "" if default is None else f"; default {default}"
    return f"{help} [{env}{shown}]"


def add_model_flags(p: argparse.ArgumentParser, names: tuple[str, ...] | None = None) -> None:
    """The model options as flags (all that are `on_commands`, or `names`). Their values stay strings (None:
    not given) until `model_options` reads them, with their variables, as `serve` reads its settings."""
    for f, option in option_fields():
        if not (option.on_commands if names is None else f.name in names):
            continue
        p.add_argument(
            "--" + f.name.replace("_", "-"),
            *([option.short] if option.short else []),
            dest=f.name,
            choices=option.choices or None,
            metavar=option.metavar,
            help=with_variable(option.help, env_name(f.name), f.default),
        )


def model_options(args: argparse.Namespace) -> ModelOptions:
    """The model flags the command has, over their EMOSERVE_* variables, over the declared defaults (a bad
    variable fails naming it, as for `serve`); and the command's --max-seconds."""
    from emoserve.serving.settings import read_settings

    given = vars(args)
    values = read_settings([f.name for f, _ in option_fields() if f.name in given], given)
    if "max_seconds" in given:
        values["max_seconds"] = given["max_seconds"]
    return ModelOptions(**values)


def add_vad_flags(g: Group) -> None:
    """The speech detection (silero-vad) of `predict --segments` and `stream`."""
    g.add_argument(
        "--max-segment-s",
        type=float,
        default=MAX_SEGMENT_S,
        help=f"longer speech is cut (default {MAX_SEGMENT_S:g})",
    )
    g.add_argument(
        "--vad-threshold",
        type=float,
        default=VAD_THRESHOLD,
        help=f"speech probability (default {VAD_THRESHOLD:g})",
    )


def api_key(args: argparse.Namespace) -> str | None:
    """--api-key, else EMOSERVE_API_KEY (the server's own key, read as the server reads it)."""
    from emoserve.serving.settings import read_settings

    key: str | None = read_settings(["api_key"], {"api_key": args.api_key}).get("api_key")
    return key


def add_ray_address(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--address",
        help="with --ray: the cluster (auto: the one `ray start` made here; default: a new local one)",
    )


def load_checked_head(path: Path, recognizer: Any) -> Any:
    """The head at `path`, refused unless it was trained on the embeddings of `recognizer`'s model."""
    from emoserve.model.head import load_head

    head = load_head(path)
    head.check_model(recognizer.info)
    return head


def warn_if_random(recognizer: Any) -> None:
    from emoserve.inference.formats import RANDOM_WARNING

    if recognizer.random_weights:
        print(RANDOM_WARNING, file=sys.stderr)


def failures(failed: int, total: int) -> int:
    """The exit status of a run over `total` files, saying how many failed."""
    if failed:
        print(f"{failed} of {total} files failed", file=sys.stderr)
    return 1 if failed else 0
