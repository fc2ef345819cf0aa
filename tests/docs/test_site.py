"""The README as a front door, and the manual: it builds strictly with scripts/build-docs.sh (a broken link or
anchor fails it), and its reference pages are generated from the code, so they list what the code has."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.environment import skip_or_fail

ROOT = Path(__file__).resolve().parents[2]  # the repository
BUILD = ROOT / "scripts" / "build-docs.sh"
README = ROOT / "README.md"
FIRST_SCREENS = 120  # lines: what a reader sees before deciding
README_LIMIT = 250  # lines: past this it is a manual again


def build(root: Path, out: Path) -> subprocess.CompletedProcess[str]:
    """scripts/build-docs.sh OUTDIR of the tree at `root`, with this interpreter (it has the docs extra)."""
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None:
        skip_or_fail("mkdocs and mkdocs-material are not installed (the docs extra)")
    env = {**os.environ, "EMOSERVE_DOCS_PYTHON": sys.executable}
    return subprocess.run(
        ["bash", str(root / "scripts" / "build-docs.sh"), str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def copy_tree(dest: Path) -> Path:
    """What the site is built from: mkdocs.yml, docs/ (with the hook), the script and src/ (the hook's
    emoserve)."""
    for name in ("docs", "src", "scripts"):
        shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "mkdocs.yml", dest / "mkdocs.yml")
    return dest


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site") / "site"
    result = build(ROOT, out)
    assert result.returncode == 0, result.stdout + result.stderr
    return out


def page(site: Path, path: str) -> str:
    return (site / path / "index.html").read_text(encoding="utf-8")


# ------------------------------------------------------------------------------------------------- the site


def test_the_site_builds_strictly_with_every_page(site: Path) -> None:
    for path in ("", "getting-started", "guides/serving", "streaming", "architecture", "benchmarks",
                 "performance", "changelog", "developer/dependencies", "reference/settings"):  # fmt: skip
        assert (site / path / "index.html").is_file(), path
    assert not (site / "hooks").exists()  # the generator is not a page


def test_a_broken_link_or_anchor_fails_the_build(tmp_path: Path) -> None:
    tree = copy_tree(tmp_path / "tree")
    assert build(tree, tmp_path / "ok").returncode == 0  # the copy itself builds
    with (tree / "docs" / "guides" / "gpu.md").open("a") as f:
        f.write("\nSee [the serving guide](serving.md#no-such-section).\n")
    result = build(tree, tmp_path / "anchor")
    assert result.returncode != 0
    assert "no-such-section" in result.stdout + result.stderr
    (tree / "docs" / "guides" / "gpu.md").write_text("# GPU\n\n[gone](no-such-page.md)\n")
    result = build(tree, tmp_path / "link")
    assert result.returncode != 0
    assert "no-such-page.md" in result.stdout + result.stderr


def test_build_docs_wants_its_out_dir() -> None:
    result = subprocess.run(["bash", str(BUILD)], capture_output=True, text=True)
    assert result.returncode == 2
    assert "usage: scripts/build-docs.sh OUTDIR" in result.stderr


# -------------------------------------------------------------------------------------- the generated pages


def test_the_settings_page_has_every_setting(site: Path) -> None:
    from emoserve.serving.settings import setting_infos

    html = page(site, "reference/settings")
    for info in setting_infos():
        assert f"<code>{info.env}</code>" in html, info.env
        assert f"<code>{info.flag}" in html, info.flag


def test_the_errors_page_has_every_code_with_its_status(site: Path) -> None:
    from emoserve.errors import CODES

    html = page(site, "reference/errors")
    for name, code in CODES.items():
        assert re.search(rf"<code>{name}</code></td>\s*<td>{code.status}</td>", html), name


def test_the_stream_messages_page_has_every_type_and_field(site: Path) -> None:
    import typing

    from emoserve.inference.protocol import MESSAGES

    html = page(site, "reference/stream-messages")
    for kind, message in MESSAGES.items():
        section = html[html.index(f'id="{kind}"') :]
        section = section[: section.find("<h2", 1)]  # up to the next message's heading
        for name in typing.get_type_hints(message):
            assert f"<code>{name}</code>" in section, (kind, name)


def test_the_metrics_page_has_every_metric(site: Path) -> None:
    from prometheus_client import CollectorRegistry

    from emoserve.serving.metrics import Metrics

    html = page(site, "reference/metrics")
    families = list(Metrics(max_queue=1, registry=CollectorRegistry()).registry.collect())
    assert len(families) > 20
    for family in families:
        assert f"<code>{family.name}" in html, family.name
    assert "<code>emoserve_errors_total</code>" in html  # counters under the name Prometheus scrapes


def test_the_cli_and_http_pages_follow_the_program(site: Path) -> None:
    from emoserve.api.app import create_app
    from emoserve.serving.settings import Settings

    cli = page(site, "reference/cli")
    for command in ("predict", "evaluate", "train-head", "serve", "stream"):
        assert f"usage: emoserve {command}" in cli, command
    schema = create_app(Settings(ui=False)).openapi()
    assert json.loads((site / "reference" / "openapi.json").read_text()) == schema
    api = page(site, "reference/http-api")
    for path, methods in schema["paths"].items():
        for method in methods:
            assert f"<code>{method.upper()} {path}</code>" in api, (method, path)


def test_a_code_added_to_the_catalogue_appears_on_its_page(tmp_path: Path) -> None:
    tree = copy_tree(tmp_path / "tree")
    with (tree / "src" / "emoserve" / "errors.py").open("a") as f:
        f.write('\nCODES["docs_probe_code"] = Code(418, "a code added to see the page follow")\n')
    result = build(tree, tmp_path / "site")
    assert result.returncode == 0, result.stdout + result.stderr
    html = page(tmp_path / "site", "reference/errors")
    assert re.search(r"<code>docs_probe_code</code></td>\s*<td>418</td>", html)
    assert "a code added to see the page follow" in html


# ---------------------------------------------------------------------------------------------- the README


def test_the_readme_is_a_front_door() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) < README_LIMIT, f"README.md has {len(lines)} lines; the manual is docs/"
    first = "\n".join(lines[:FIRST_SCREENS])
    for shown in ("pip install", "./run.sh", "./test.sh", "curl ", "load_model(", ".predict(",
                  "emoserve stream "):  # fmt: skip
        assert shown in first, f"{shown!r} is not in the README's first {FIRST_SCREENS} lines"
    assert "random_weights: true" in "\n".join(lines)  # random-weight predictions are labelled as such
    assert "## Dependencies, and why" in "\n".join(lines)


def test_the_readme_links_lead_somewhere() -> None:
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README.read_text(encoding="utf-8"))
    local = [link for link in links if "://" not in link]
    assert len(local) > 10
    for link in local:
        assert (ROOT / link).exists(), f"README.md links to {link}, which does not exist"


def test_no_merge_conflict_markers_are_left_in_the_tree() -> None:
    """A merge that left its markers in a page or a module (docs/benchmarks.md once kept three): the
    strict site build does not see them in Markdown, so this does. Every tracked text file."""
    marker = r"^(<{7}|>{7}) |^={7}$"
    found = subprocess.run(
        ["git", "grep", "-n", "-I", "-E", marker], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert found.returncode == 1, found.stdout or found.stderr  # 1: git grep found nothing
