"""`emoserve serve`: the HTTP API, web UI and metrics (`api/app.serve`), or on Ray Serve replicas with --ray
(`ray_serve.run`). A flag per setting of `serving/settings.py`."""

from __future__ import annotations

import argparse
import logging
from typing import TYPE_CHECKING

from emoserve.cli.shared import add_ray_address, with_variable

if TYPE_CHECKING:
    from emoserve.cli.shared import Commands


def add_commands(sub: Commands) -> None:
    p = sub.add_parser(
        "serve",
        help="run the HTTP API, web UI and metrics (one model shared through a batching engine)",
        description="Every flag can also be set as an EMOSERVE_* environment variable "
        "(e.g. EMOSERVE_MAX_BATCH_SIZE=16); flags win.",
    )
    add_setting_flags(p)
    p.add_argument("--ray", action="store_true", help="serve on Ray Serve replicas (emoserve[ray])")
    p.add_argument("--replicas", type=int, default=1, help="with --ray: model replicas (default 1)")
    add_ray_address(p)
    p.set_defaults(run=cmd_serve)


def add_setting_flags(p: argparse.ArgumentParser) -> None:
    """One flag per Settings field. Values stay strings here: settings.load_settings parses them, so a bad
    value fails with the flag's name just as a bad variable fails with the variable's."""
    from emoserve.serving.settings import setting_infos

    for s in setting_infos():
        help_text = with_variable(s.help, s.env, s.default)
        if s.is_bool:
            p.add_argument(
                s.flag, dest=s.name, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        elif s.repeatable:
            p.add_argument(s.flag, dest=s.name, action="append", metavar=s.metavar, help=help_text)
        else:
            p.add_argument(s.flag, dest=s.name, default=None, metavar=s.metavar, help=help_text)


def cmd_serve(args: argparse.Namespace) -> int:
    from emoserve.api.app import serve
    from emoserve.serving.settings import load_settings

    settings = load_settings(vars(args))
    level = logging.DEBUG if args.verbose else getattr(logging, settings.log_level.upper())
    logging.getLogger("emoserve").setLevel(level)
    if args.ray:
        from emoserve.ray_serve import RayOptions, run

        return run(settings, RayOptions.parse({"replicas": args.replicas}), args.address)
    return serve(settings)
