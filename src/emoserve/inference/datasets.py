"""Labelled audio for `emoserve evaluate` and `emoserve train-head`: a manifest (CSV, TSV or JSONL with
`path`, `label` and optionally `group`, a speaker or a session; other columns are ignored; paths relative to
the manifest) or a folder with one subfolder per label. For a regression (`targets`), the manifest's numeric
columns of those names (`arousal`, `valence`, ...) instead of `label`. A row that cannot be used is reported
in `skipped` with its reason, never dropped silently."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emoserve.inference.corpus import AUDIO_EXTENSIONS

MANIFEST_SUFFIXES = {".csv": ",", ".tsv": "\t", ".jsonl": None, ".ndjson": None}
RESERVED_COLUMNS = ("path", "label", "group")


@dataclass(frozen=True)
class Item:
    path: str
    label: str  # "" in a regression's dataset without labels
    group: str | None = None
    values: tuple[float, ...] | None = None  # a regression's targets, in the dataset's `targets` order


@dataclass
class Dataset:
    source: str
    items: list[Item]
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"path", "reason"}
    targets: tuple[str, ...] = ()  # a regression's numeric columns (each item's `values`)

    @property
    def labels(self) -> list[str]:
        return sorted({item.label for item in self.items})

    def skip(self, path: str, reason: str) -> None:
        self.skipped.append({"path": path, "reason": reason})

    def keep(self, keep: list[bool]) -> None:
        self.items = [item for item, kept in zip(self.items, keep, strict=True) if kept]


def read_dataset(source: str | Path, targets: Sequence[str] = ()) -> Dataset:
    """The labelled files of a manifest or a folder of label folders; ValueError when it is neither. With
    `targets`: a manifest's numeric columns of those names, each row's as its item's `values`."""
    path = Path(source)
    if targets and not path.is_file():
        raise ValueError(
            f"{path}: numeric targets ({', '.join(targets)}) come from a manifest's columns (.csv, .tsv or "
            ".jsonl with path and a column per target), not a folder"
        )
    if path.is_dir():
        dataset = _folder(path)
    elif path.is_file():
        if path.suffix.lower() not in MANIFEST_SUFFIXES:
            raise ValueError(
                f"{path}: a manifest is .csv, .tsv or .jsonl (columns path, label[, group]); "
                "or give a folder with one subfolder per label"
            )
        dataset = _manifest(path, tuple(targets))
    else:
        raise FileNotFoundError(f"{path}: no such manifest or folder")
    _drop_missing(dataset)
    if not dataset.items:
        raise ValueError(f"{path}: no usable labelled audio ({len(dataset.skipped)} rows skipped)")
    return dataset


def _folder(root: Path) -> Dataset:
    dataset = Dataset(str(root), [])
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise ValueError(
            f"{root}: no label subfolders (a folder of labelled audio holds one folder per label)"
        )
    for folder in folders:
        for file in sorted(folder.rglob("*")):
            if file.is_file() and file.suffix.lower() in AUDIO_EXTENSIONS:
                dataset.items.append(Item(str(file), folder.name))
    return dataset


def _manifest(path: Path, targets: tuple[str, ...]) -> Dataset:
    rows = _rows(path, ("path", *targets) if targets else ("path", "label"))
    dataset = Dataset(str(path), [], targets=targets)
    for number, row in rows:
        file, label = str(row.get("path") or "").strip(), str(row.get("label") or "").strip()
        where = file or f"{path.name} row {number}"
        if not file or not (label or targets):
            dataset.skip(where, f"{path.name} row {number}: no {'path' if not file else 'label'}")
            continue
        values = None
        if targets:
            values, why = _numbers(row, targets)
            if values is None:
                dataset.skip(where, f"{path.name} row {number}: {why}")
                continue
        group = row.get("group")
        group = str(group).strip() if group not in (None, "") else None
        full = Path(file) if Path(file).is_absolute() else path.parent / file
        dataset.items.append(Item(str(full), label, group, values))
    return dataset


def _numbers(row: dict[str, Any], targets: tuple[str, ...]) -> tuple[tuple[float, ...] | None, str]:
    """A row's target values, or None and why not (an empty or non-numeric cell)."""
    values = []
    for target in targets:
        try:
            value = float(str(row.get(target)).strip())
        except ValueError:
            value = float("nan")
        if not math.isfinite(value):
            return None, f"{target} is {row.get(target)!r}, not a number"
        values.append(value)
    return tuple(values), ""


def numeric_columns(source: str | Path) -> list[str]:
    """A manifest's columns other than path, label and group whose every filled cell is a number: the
    targets of `train-head --task regression` when --targets is not given."""
    path = Path(source)
    if not path.is_file() or path.suffix.lower() not in MANIFEST_SUFFIXES:
        raise ValueError(
            f"{path}: a regression's targets are numeric columns of a manifest (.csv, .tsv, .jsonl)"
        )
    rows = _rows(path, ("path",))
    columns = [c for c in dict.fromkeys(k for _, row in rows for k in row) if c not in RESERVED_COLUMNS]
    found = []
    for column in columns:
        cells = [str(row.get(column) or "").strip() for _, row in rows]
        filled = [c for c in cells if c]
        if filled and all(_is_number(c) for c in filled):
            found.append(column)
    if not found:
        raise ValueError(
            f"{path}: no numeric column to regress on (its columns: {', '.join(columns) or 'none'})"
        )
    return found


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _rows(path: Path, required: Sequence[str]) -> list[tuple[int, dict[str, Any]]]:
    table = MANIFEST_SUFFIXES[path.suffix.lower()] is not None
    return _table_rows(path, required) if table else _jsonl_rows(path, required)


def _table_rows(path: Path, required: Sequence[str]) -> list[tuple[int, dict[str, Any]]]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f, delimiter=MANIFEST_SUFFIXES[path.suffix.lower()] or ",")
        _require_columns(path, list(reader.fieldnames or []), required)
        return [(n, row) for n, row in enumerate(reader, start=2)]  # row 1 is the header


def _jsonl_rows(path: Path, required: Sequence[str]) -> list[tuple[int, dict[str, Any]]]:
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as error:
            raise ValueError(f"{path} line {n} is not JSON: {error}") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path} line {n} is not a JSON object with path and label")
        rows.append((n, row))
    if rows:
        _require_columns(path, list({key: None for _, row in rows for key in row}), required)
    return rows


def _require_columns(path: Path, columns: list[str], required: Sequence[str]) -> None:
    missing = [c for c in required if c not in columns]
    if missing:
        raise ValueError(f"{path}: no column {' or '.join(missing)} (it has {', '.join(columns) or 'none'})")


def _drop_missing(dataset: Dataset) -> None:
    keep = []
    for item in dataset.items:
        exists = Path(item.path).is_file()
        if not exists:
            dataset.skip(item.path, "no such file")
        keep.append(exists)
    dataset.keep(keep)


def parse_label_map(text: str | None) -> dict[str, str]:
    """`ang=angry,hap=happy,exc=happy` -> {"ang": "angry", ...}; ValueError naming a bad pair."""
    mapping: dict[str, str] = {}
    for pair in (text or "").split(","):
        if not pair.strip():
            continue
        source, sep, target = pair.partition("=")
        if not sep or not source.strip() or not target.strip():
            raise ValueError(f"--map: {pair!r} is not LABEL=EMOTION (e.g. ang=angry,hap=happy)")
        mapping[source.strip()] = target.strip()
    return mapping
