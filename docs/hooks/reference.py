"""The reference pages, generated from the code at every build so that they cannot drift from it.

A plain mkdocs hook (mkdocs.yml `hooks:`, built into mkdocs >= 1.4) rather than the mkdocs-gen-files plugin:
five pages need no more than `on_files` and `File.generated` (mkdocs >= 1.6), and one plugin fewer is one
dependency fewer. Each page is built from the object that the running code reads:

- settings.md   `emoserve.serving.settings.setting_infos()`: every flag, variable, default and help;
- errors.md     `emoserve.errors.CODES`: every error code, its HTTP status and meaning;
- metrics.md    a `Metrics` on a registry of its own: every metric's name, type, help and labels;
- cli.md        `emoserve.cli.parser()`: the `--help` of the program and of each command;
- http-api.md   the app's OpenAPI schema (`create_app(...).openapi()`), also written as openapi.json;
- stream-messages.md  `emoserve.inference.protocol.MESSAGES`: the live stream's message types and fields.

Nothing here loads a model or imports torch: settings, errors and the CLI are light by design, `Metrics`
needs prometheus-client only, and `create_app` builds a `Service` whose model loads in the app's lifespan,
which never runs here. The emoserve imported is the one in this repository's `src/` (put first on the path),
so the pages describe the tree being built, whatever is installed.
"""

from __future__ import annotations

import argparse
import http
import json
import os
import re
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REFERENCE = "reference"  # the folder of the generated pages, under docs/
COLUMNS = 100  # argparse wraps --help to the terminal's width: a fixed one keeps the page stable
GENERATED_NOTE = "*Generated from the code at build time ({source}); do not edit.*\n"


# ------------------------------------------------------------------------------------------------ mkdocs


def on_config(config: Any) -> Any:
    src = Path(config.config_file_path).resolve().parent / "src"
    if str(src) not in sys.path:
        sys.path.insert(0, str(src))
    return config


def on_files(files: Any, config: Any) -> Any:
    from mkdocs.structure.files import File

    for name, content in pages().items():
        files.append(File.generated(config, f"{REFERENCE}/{name}", content=content))
    return files


def pages() -> dict[str, str]:
    """File name (under reference/) -> its content."""
    schema = openapi_schema()
    return {
        "settings.md": settings_page(),
        "errors.md": errors_page(),
        "metrics.md": metrics_page(),
        "cli.md": cli_page(),
        "http-api.md": http_api_page(schema),
        "openapi.json": json.dumps(schema, indent=2, ensure_ascii=False) + "\n",
        "stream-messages.md": stream_messages_page(),
    }


# ------------------------------------------------------------------------------------------------ helpers


def cell(text: object) -> str:
    """`text` fit for one cell of a Markdown table: a pipe outside a code span is escaped (the tables
    extension leaves pipes inside code spans alone, and would show the backslash there)."""
    parts = re.split(r"(`[^`]*`)", str(text).replace("\n", " "))
    return "".join(p if p.startswith("`") else p.replace("|", "\\|") for p in parts)


def code(text: object) -> str:
    return f"`{text}`" if "`" not in str(text) else f"`` {text} ``"


def table(header: Iterable[str], rows: Iterable[Iterable[object]]) -> str:
    header = list(header)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------- settings


def settings_page() -> str:
    from emoserve.serving.settings import setting_infos

    rows = []
    for info in setting_infos():
        flag = f"{info.flag} / --no-{info.flag[2:]}" if info.is_bool else info.flag
        if info.metavar:
            flag += f" {info.metavar}"
        if info.repeatable:
            flag += " (repeatable)"
        rows.append((code(flag), code(info.env), default_text(info.default), info.help))
    return (
        "# Settings\n\n"
        + GENERATED_NOTE.format(source="`emoserve.serving.settings.setting_infos()`")
        + "\nEvery setting of `emoserve serve` (and `./run.sh`, which passes its arguments on) is a flag "
        "and an `EMOSERVE_*` environment variable. They are read once at start-up: a flag wins over the "
        "variable, the variable over the default, and a bad value stops the start with an error that "
        "names the flag or the variable. A switch takes `true/false`, `1/0`, `yes/no` or `on/off` as a "
        "variable. Ray Serve takes the same settings by name "
        "(see [Scaling out](../guides/scaling-out.md)).\n\n"
        + table(("flag", "variable", "default", "what it does"), rows)
    )


def default_text(value: object) -> str:
    if value is None:
        return "(not set)"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return ",".join(map(str, value)) if value else "(none)"
    return code(value)


# ------------------------------------------------------------------------------------------------- errors


def errors_page() -> str:
    from emoserve.errors import CODES

    rows = [(code(name), c.status, status_phrase(c.status), c.meaning) for name, c in CODES.items()]
    return (
        "# Error codes\n\n"
        + GENERATED_NOTE.format(source="`emoserve.errors.CODES`")
        + "\nEvery failure carries one stable code, the same on every surface: the API's JSON error "
        '`{"error": {"code": ..., "message": ...}}` (the OpenAPI schema publishes the codes as the '
        "`ErrorCode` enum), the web UI, the CLI, the live stream's `error` message and the "
        "`emoserve_errors_total{kind=<code>}` metric. In Python each is an `emoserve.errors.EmoserveError` "
        "with `code` and `status`. A 503 carries `Retry-After`. Changes to the codes are in the "
        "[changelog](../changelog.md).\n\n" + table(("code", "HTTP status", "", "meaning"), rows)
    )


def status_phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return {499: "Client Closed Request"}.get(status, "")


# ------------------------------------------------------------------------------------------------ metrics


def metrics_page() -> str:
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics import MetricWrapperBase

    from emoserve.serving.metrics import Metrics

    metrics = Metrics(max_queue=1, registry=CollectorRegistry())
    labels = {
        m._name: m._labelnames  # prometheus_client keeps the label names only on its wrappers
        for m in vars(metrics).values()
        if isinstance(m, MetricWrapperBase)
    }
    rows = []
    for family in metrics.registry.collect():
        names = exposed_names(family.name, family.type)
        label_names = labels.get(family.name, ())
        if family.type == "stateset":  # prometheus_client's Enum: one sample per state
            label_names = (family.name,)
        rows.append(
            (" ".join(code(n) for n in names), family.type, ", ".join(label_names), family.documentation)
        )
    return (
        "# Metrics\n\n"
        + GENERATED_NOTE.format(source="`emoserve.serving.metrics.Metrics`")
        + "\n`GET /metrics` answers in the Prometheus text format, without an API key. On Ray Serve every "
        "sample also carries a `replica` label. Once a model runs on CUDA, two GPU memory gauges join "
        "them (see [GPU](../guides/gpu.md)). Alert rules are in `deploy/prometheus/alerts.yml`.\n\n"
        + table(("name", "type", "labels", "help"), rows)
    )


def exposed_names(name: str, kind: str) -> list[str]:
    """The names a family's samples have in the exposition."""
    if kind == "counter":
        return [f"{name}_total"]
    if kind == "histogram":
        return [f"{name}_bucket", f"{name}_sum", f"{name}_count"]
    return [name]


# ---------------------------------------------------------------------------------------------------- CLI


def cli_page() -> str:
    from emoserve.cli import parser

    with columns(COLUMNS):
        top = parser()
        sections = [("emoserve", top.format_help())]
        sections += [(f"emoserve {name}", sub.format_help()) for name, sub in subcommands(top)]
    body = "".join(f"## `{title}`\n\n```text\n{text.rstrip()}\n```\n\n" for title, text in sections)
    return (
        "# Command line\n\n"
        + GENERATED_NOTE.format(source="`emoserve.cli.parser()`")
        + "\nThe `--help` of `emoserve` and of each of its commands, as the program prints it. "
        "`--help` answers without importing torch. The [command-line guide](../guides/command-line.md) "
        "shows them at work.\n\n" + body
    )


def subcommands(top: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """(name, parser) of each command, in the order --help lists them (aliases once)."""
    for action in top._actions:
        if isinstance(action, argparse._SubParsersAction):
            seen: set[int] = set()
            for name, sub in action.choices.items():
                if id(sub) not in seen:
                    seen.add(id(sub))
                    yield name, sub


@contextmanager
def columns(width: int) -> Iterator[None]:
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(width)
    try:
        yield
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old


# ----------------------------------------------------------------------------------------------- HTTP API


def openapi_schema() -> dict[str, Any]:
    from emoserve.api.app import create_app
    from emoserve.serving.settings import Settings

    return create_app(Settings(ui=False)).openapi()


def http_api_page(schema: dict[str, Any]) -> str:
    parts = [
        "# HTTP API\n\n",
        GENERATED_NOTE.format(source="the app's OpenAPI schema"),
        f"\n{schema['info']['title']} {schema['info']['version']}: every route of the OpenAPI schema. "
        "The schema itself is [openapi.json](openapi.json); a running server also serves it at "
        "`/openapi.json`, with interactive docs at `/docs`. Errors are JSON "
        '`{"error": {"code", "message"}}` with the [error codes](errors.md). The live stream '
        "`GET /v1/stream` is a WebSocket, which OpenAPI does not describe: its protocol is in "
        "[Live streams: protocol](../streaming.md).\n\n",
    ]
    for path, methods in schema["paths"].items():
        for method, op in methods.items():
            parts.append(operation_section(method.upper(), path, op))
    return "".join(parts)


def operation_section(method: str, path: str, op: dict[str, Any]) -> str:
    out = [f"## `{method} {path}`\n\n"]
    if op.get("summary"):
        out.append(f"**{op['summary']}.**")
    if op.get("description"):
        out.append(f" {op['description'].strip()}")
    out.append("\n\n")
    params = op.get("parameters", [])
    if params:
        rows = [
            (code(p["name"]), p["in"], "yes" if p.get("required") else "no", schema_type(p.get("schema", {})),
             p.get("description", ""))
            for p in params
        ]  # fmt: skip
        out.append(table(("parameter", "in", "required", "type", "description"), rows) + "\n")
    body = op.get("requestBody")
    if body:
        kinds = ", ".join(code(kind) for kind in body.get("content", {}))
        out.append(f"Request body ({'required' if body.get('required') else 'optional'}): {kinds}.\n\n")
    responses = op.get("responses", {})
    rows = [
        (status, answer.get("description", ""), response_model(answer))
        for status, answer in responses.items()
    ]
    out.append(table(("status", "meaning", "body"), rows) + "\n")
    return "".join(out)


def schema_type(schema: dict[str, Any]) -> str:
    if "anyOf" in schema:
        return " or ".join(schema_type(s) for s in schema["anyOf"] if s.get("type") != "null")
    if "enum" in schema:
        return " | ".join(str(v) for v in schema["enum"])
    if "$ref" in schema:
        return schema["$ref"].rsplit("/", 1)[-1]
    return str(schema.get("type", ""))


def response_model(answer: dict[str, Any]) -> str:
    kinds = []
    for kind, media in answer.get("content", {}).items():
        model = schema_type(media.get("schema", {}))
        kinds.append(f"{kind} ({model})" if model else kind)
    return ", ".join(kinds)


# --------------------------------------------------------------------------------------- stream messages


def stream_messages_page() -> str:
    import typing

    from emoserve.inference.protocol import CONTROL_MESSAGES, MESSAGES

    sections = []
    for kind, message in [*MESSAGES.items(), *CONTROL_MESSAGES.items()]:
        hints = typing.get_type_hints(message, include_extras=True)
        rows = [
            (code(name), code(type_text(hint)), "when asked" if optional(hint) else "yes")
            for name, hint in hints.items()
        ]
        who = "client -> server" if kind in CONTROL_MESSAGES else "server -> client"
        doc = " ".join((message.__doc__ or "").split())
        sections.append(f"## `{kind}`\n\n{who}: {doc}\n\n" + table(("field", "type", "always"), rows))
    return (
        "# Stream messages\n\n"
        + GENERATED_NOTE.format(source="`emoserve.inference.protocol`: one `TypedDict` per message type")
        + "\nThe JSON text messages of `GET /v1/stream`, as the library types them; what each field means, "
        "the parameters, errors and close codes are in [the protocol](../streaming.md).\n\n"
        + "\n".join(sections)
    )


def optional(hint: object) -> bool:
    """A NotRequired field (`__required_keys__` does not know it under postponed annotations on 3.11)."""
    import typing

    return typing.get_origin(hint) is typing.NotRequired


def type_text(hint: object) -> str:
    """A type as Python writes it, without the module paths and the NotRequired/Literal wrappers."""
    text = hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")
    text = re.sub(r"^NotRequired\[(.*)\]$", r"\1", text)
    return re.sub(r"Literal\['(\w+)'\]", r'"\1"', text)
