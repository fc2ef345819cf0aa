"""Regression heads (numeric targets: arousal, valence, ...): cross-validated without leakage on data whose
truth is known (targets a linear function of embedding directions plus noise, tests/support/labelled.py),
the head directory, numpy values against scikit-learn's `predict`, the CLI (train-head, evaluate, predict),
and the head served on every surface (library, /v1/recognize, /v1/timeline, /v1/stream, metrics).
Classifier heads: tests/inference/test_heads.py."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

if importlib.util.find_spec("sklearn") is None:  # the train extra (./test.sh installs it)
    if os.environ.get("EMOSERVE_REQUIRE_TOOLS"):
        raise ImportError("scikit-learn is missing: scripts/setup-venv.sh test,ray,train")
    pytest.skip("the train extra (scikit-learn) is not installed", allow_module_level=True)

from emoserve.audio.segments import Span
from emoserve.cli import main
from emoserve.inference.datasets import numeric_columns, read_dataset
from emoserve.inference.evaluation import dimension_figures
from emoserve.inference.training import (
    Labelled,
    TrainOptions,
    cross_validate_regression,
    embed_dataset,
    regression_splits,
    train_head,
)
from emoserve.model.head import META_FILE, WEIGHTS_FILE, Head
from tests.support.labelled import SPEAKERS, TARGETS, linear_targets, write_regression_set
from tests.support.paths import MODEL

ROWS, DIM, GROUPS = 240, 64, 8


def synthetic(noise: float = 0.3, seed: int = 0, targets: tuple[str, ...] = TARGETS) -> Labelled:
    """Embeddings with a low-rank structure (as real ones have) and targets linear in their two main
    directions plus noise: a regression head can learn them across groups."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(ROWS, 6)) @ rng.normal(size=(6, DIM)) + 0.3 * rng.normal(size=(ROWS, DIM))
    values = linear_targets(x, noise, seed)[:, : len(targets)]
    groups: list[str | None] = [f"g{i % GROUPS}" for i in range(ROWS)]
    return Labelled(x, [""] * ROWS, groups, [""] * ROWS, [], 0, values, targets)


# ------------------------------------------------------------------------------------------- training


def test_cross_validated_ccc_is_high_where_the_signal_allows_and_near_zero_on_shuffled_targets() -> None:
    labelled = synthetic()
    report, predicted = cross_validate_regression(labelled, TrainOptions())
    assert report["cv"]["method"] == "leave-one-group-out" and len(report["cv"]["folds"]) == GROUPS
    for target in TARGETS:
        assert report["targets"][target]["ccc"] >= 0.8, report["targets"]
        assert report["targets"][target]["n"] == ROWS
    assert predicted.shape == (ROWS, 2)
    shuffled = dataclasses.replace(labelled, values=np.random.default_rng(1).permutation(labelled.values))
    report, _ = cross_validate_regression(shuffled, TrainOptions())
    for target in TARGETS:  # a leak (a row, or its group, in its own training fold) would show here
        assert abs(report["targets"][target]["ccc"]) < 0.2, report["targets"]


def test_a_target_that_only_names_the_speaker_is_not_learnt_for_unseen_speakers() -> None:
    """Each group has its own embedding fingerprint and its own target value: a split that let a group into
    its own training fold would find it (as plain k-fold does); by group there is nothing to learn."""
    rng = np.random.default_rng(3)
    fingerprints, level = rng.normal(size=(GROUPS, DIM)), rng.normal(size=GROUPS)
    index = np.arange(ROWS) % GROUPS
    x = fingerprints[index] + 0.2 * rng.normal(size=(ROWS, DIM))
    values = (level[index] + 0.1 * rng.normal(size=ROWS))[:, None]
    grouped = Labelled(x, [""] * ROWS, [f"g{i}" for i in index], [""] * ROWS, [], 0, values, ("arousal",))
    by_group, _ = cross_validate_regression(grouped, TrainOptions())
    leaky, _ = cross_validate_regression(dataclasses.replace(grouped, groups=[None] * ROWS), TrainOptions())
    assert leaky["cv"]["method"] == "5-fold" and leaky["targets"]["arousal"]["ccc"] > 0.9
    assert by_group["targets"]["arousal"]["ccc"] < 0.3, by_group["targets"]


def test_no_group_is_in_both_the_train_and_the_test_folds() -> None:
    for n_groups, method in ((4, "leave-one-group-out"), (14, "group 5-fold"), (0, "5-fold")):
        groups = [f"g{i % n_groups}" for i in range(140)] if n_groups else [None] * 140
        labelled = dataclasses.replace(
            synthetic(), x=np.zeros((140, 2)), groups=groups, values=np.zeros((140, 1))
        )
        name, pairs = regression_splits(labelled, TrainOptions())
        assert name == method
        tested = []
        for train, test in pairs:
            if n_groups:
                assert not {groups[i] for i in train} & {groups[i] for i in test}
            tested += list(test)
        assert sorted(tested) == list(range(140))


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")  # the MLP's: not the point
@pytest.mark.parametrize("regressor", ["ridge", "mlp"])
@pytest.mark.parametrize("targets", [("valence",), TARGETS])
def test_numpy_values_equal_predict(
    tmp_path: Path, tiny_recognizer: Any, regressor: str, targets: tuple[str, ...]
) -> None:
    labelled = synthetic(targets=targets)
    options = TrainOptions(regressor=regressor, hidden=16)  # type: ignore[arg-type]
    trained = train_head(tiny_recognizer, labelled, tmp_path / "dims", options)
    head = Head.load(trained.path)
    expected = np.reshape(trained.pipeline.predict(labelled.x), (ROWS, -1))
    assert head.task == "regression" and head.label_names == list(targets)
    assert np.abs(head.values(labelled.x) - expected).max() < 1e-6
    assert np.abs(head.values(labelled.x[3]) - expected[3]).max() < 1e-6  # one embedding


def test_the_regression_head_directory(tmp_path: Path, tiny_recognizer: Any) -> None:
    trained = train_head(tiny_recognizer, synthetic(), tmp_path / "dims")
    files = sorted(p.name for p in trained.path.iterdir())
    assert files == [META_FILE, WEIGHTS_FILE, "report.json", "scatter.png"]  # no pickle
    assert (trained.path / "scatter.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    meta = json.loads((trained.path / META_FILE).read_text())
    assert meta["task"] == "regression" and meta["kind"] == "ridge"
    assert [label["name"] for label in meta["labels"]] == list(TARGETS)
    assert set(meta["training"]["targets"]["arousal"]) == {"mean", "std", "min", "max"}
    assert "RidgeCV" in meta["training"]["regressor"]
    report = json.loads((trained.path / "report.json").read_text())
    assert set(report["targets"]["valence"]) == {"ccc", "pearson", "mae", "rmse", "n"}
    assert set(report["by_group"]) == {f"g{i}" for i in range(GROUPS)}
    summary = Head.load(trained.path).summary()
    assert summary["task"] == "regression" and summary["cv"]["targets"]["arousal"]["ccc"] >= 0.8
    with pytest.raises(Exception, match="regression of arousal, valence: no labels"):
        Head.load(trained.path).probabilities(np.zeros(DIM))


def test_data_that_cannot_train_a_regression_head_is_refused(tmp_path: Path, tiny_recognizer: Any) -> None:
    few = synthetic()
    few = dataclasses.replace(
        few, x=few.x[:8], values=few.values[:8], y=[""] * 8, groups=[None] * 8, files=[""] * 8
    )
    with pytest.raises(ValueError, match="at least 10 to be cross-validated"):
        train_head(tiny_recognizer, few, tmp_path / "h")
    flat = synthetic()
    flat.values[:, 1] = 3.0
    with pytest.raises(ValueError, match="valence has the same value in every row"):
        train_head(tiny_recognizer, flat, tmp_path / "h")
    with pytest.raises(ValueError, match="come from a manifest's columns"):
        read_dataset(tmp_path, ["arousal"])
    (tmp_path / "a.wav").write_bytes(b"")
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,arousal,valence,speaker\na.wav,3.5,x,s1\na.wav,2,4,s2\n")
    dataset = read_dataset(manifest, ["arousal", "valence"])
    assert [item.values for item in dataset.items] == [(2.0, 4.0)]
    assert dataset.skipped == [{"path": "a.wav", "reason": "m.csv row 2: valence is 'x', not a number"}]
    assert numeric_columns(manifest) == ["arousal"]  # valence has a word, speaker is text
    with pytest.raises(ValueError, match="no column dominance"):
        read_dataset(manifest, ["dominance"])


# ------------------------------------------------------------------------------ on the fixture model


@pytest.fixture(scope="module")
def regression_set(tmp_path_factory: pytest.TempPathFactory, tiny_recognizer: Any) -> tuple[Path, np.ndarray]:
    return write_regression_set(tmp_path_factory.mktemp("dims"), tiny_recognizer)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, regression_set: Any, tiny_recognizer: Any) -> Any:
    labelled = embed_dataset(tiny_recognizer, read_dataset(regression_set[0], TARGETS), cache=None)
    return train_head(tiny_recognizer, labelled, tmp_path_factory.mktemp("heads") / "dims", TrainOptions())


def expected_values(trained: Any, recognizer: Any, audio: Any) -> np.ndarray:
    """scikit-learn's `predict` on the clip's utterance embedding: what every surface must say."""
    emb = recognizer.predict(audio, embedding=True).embedding
    return np.reshape(trained.pipeline.predict(emb[None].astype(np.float64)), -1)


def test_cli_train_head_evaluate_and_predict(
    regression_set: Any, tmp_path: Path, tiny_recognizer: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest, targets = regression_set
    common = ["-m", str(MODEL), "--backend", "torch", "--cache-dir", str(tmp_path / "cache")]
    head_dir = tmp_path / "dims"
    assert (
        main(["train-head", str(manifest), "--targets", "arousal,valence", "--out", str(head_dir), *common])
        == 0
    )
    out = capsys.readouterr().out
    assert "leave-one-group-out" in out and "CCC" in out
    report = json.loads((head_dir / "report.json").read_text())
    for target in TARGETS:  # the targets are linear in the embedding's main directions: learnable
        assert report["targets"][target]["ccc"] >= 0.8, report["targets"]
    inferred = tmp_path / "inferred"
    assert main(["train-head", str(manifest), "--task", "regression", "--out", str(inferred), *common]) == 0
    assert Head.load(inferred).label_names == list(TARGETS)  # the numeric columns; label and group are not
    capsys.readouterr()

    evaluation = tmp_path / "eval"
    argv = ["evaluate", str(manifest), "--head", str(head_dir), "--by", "group", "--out", str(evaluation)]
    assert main([*argv, *common]) == 0
    assert "CCC" in capsys.readouterr().out
    figures = json.loads((evaluation / "report.json").read_text())
    assert (evaluation / "scatter.png").read_bytes()[:4] == b"\x89PNG"
    head = Head.load(head_dir)
    files = [str(manifest.parent / line.split(",")[0]) for line in manifest.read_text().splitlines()[1:]]
    x = np.stack([r.embedding for r in tiny_recognizer.predict_many(files, embedding=True)])
    predicted = head.values(x.astype(np.float64))
    for j, target in enumerate(TARGETS):
        assert figures["targets"][target] == pytest.approx(dimension_figures(targets[:, j], predicted[:, j]))
    assert set(figures["by_group"]) == {f"spk{i}" for i in range(SPEAKERS)}

    rows = tmp_path / "rows.jsonl"
    clip = files[7]
    assert main(["predict", clip, "--head", str(head_dir), "-o", str(rows), *common[:4]]) == 0
    row = json.loads(rows.read_text())
    assert row["head"]["kind"] == "regression" and row["head"]["label"] is None
    assert np.allclose(list(row["head"]["values"].values()), head.values(x[7].astype(np.float64)), atol=1e-6)
    table = tmp_path / "rows.csv"
    assert (
        main(["predict", clip, "--head", str(head_dir), "--format", "csv", "-o", str(table), *common[:4]])
        == 0
    )
    header = table.read_text().splitlines()[0].split(",")
    assert {"head", "head_value_arousal", "head_value_valence"} <= set(header) and "head_label" not in header


def test_a_regression_head_in_the_library(trained: Any, regression_set: Any, tiny_recognizer: Any) -> None:
    manifest, _ = regression_set
    head = Head.load(trained.path)
    clip = str(manifest.parent / "spk2_high_3.wav")
    result = tiny_recognizer.predict(clip, head=head)
    assert result.head is not None and result.head.kind == "regression" and result.head.scores == {}
    assert result.head.label is None and result.head.confidence is None
    values = list((result.head.values or {}).values())
    assert np.abs(np.array(values) - expected_values(trained, tiny_recognizer, clip)).max() < 1e-6
    assert result.to_dict()["head"]["values"] == result.head.values
    from emoserve.webui.charts import segment_table
    from emoserve.webui.clip import regression_ranges, result_card

    shown = result.head.values or {}
    assert 'id="result-head"' in result_card(
        result
    ) and f"arousal <b>{shown['arousal']:.3f}</b>" in result_card(result)
    ranges = regression_ranges([("dims", str(trained.path))])
    card = result_card(
        dataclasses.replace(result, head=dataclasses.replace(result.head, name="dims")), ranges
    )
    assert card.count('class="head-bar"') == 2 and 'class="av-plane"' in card  # bars and the 2-D point
    scale = ranges["dims"]
    x = (shown["valence"] - scale["valence"]["min"]) / (scale["valence"]["max"] - scale["valence"]["min"])
    y = (shown["arousal"] - scale["arousal"]["min"]) / (scale["arousal"]["max"] - scale["arousal"]["min"])
    assert f'cx="{min(1, max(0, x)) * 120:.1f}" cy="{(1 - min(1, max(0, y))) * 120:.1f}"' in card
    spans = [Span(0.0, 0.4), Span(0.4, 1.0)]
    timeline = tiny_recognizer.timeline(clip, spans=spans, head=head)
    weights = np.array([s.duration_s for s in timeline.segments])
    per_segment = np.array([list((s.head.values or {}).values()) for s in timeline.segments])
    assert timeline.summary["head"]["kind"] == "regression"
    mean = list(timeline.summary["head"]["values"].values())
    assert np.allclose(mean, weights @ per_segment / weights.sum(), atol=1e-6)  # the time-weighted mean
    cells = list(segment_table(timeline.segments)["dims (yours)"])
    assert cells[0] == " ".join(f"{t} {v:.2f}" for t, v in (timeline.segments[0].head.values or {}).items())


@pytest.mark.filterwarnings("ignore::ResourceWarning")
def test_a_regression_head_served_over_http_and_the_stream(
    trained: Any, regression_set: Any, tmp_path: Path, tiny_recognizer: Any, speech: Path
) -> None:
    from tests.support.server import LIVE, live_server, streamed

    manifest, _ = regression_set
    head = Head.load(trained.path)
    settings = dataclasses.replace(
        LIVE, heads=(("dims", str(trained.path)),), max_timeline_s=60.0, max_audio_s=60.0
    )
    clip = manifest.parent / "spk1_low_2.wav"
    with live_server(settings, tmp_path / "home") as live:
        (summary,) = live.client.get("/v1/model").json()["heads"]
        assert summary["task"] == "regression" and summary["cv"]["targets"]["arousal"]["ccc"] >= 0.8
        assert set(summary["ranges"]["valence"]) == {"mean", "std", "min", "max"}
        body = live.client.post("/v1/recognize", params={"head": "dims"}, content=clip.read_bytes()).json()
        assert body["head"]["kind"] == "regression" and body["head"]["label"] is None
        got = np.array(list(body["head"]["values"].values()))
        assert np.abs(got - expected_values(trained, tiny_recognizer, str(clip))).max() < 1e-6

        timeline = live.client.post(
            "/v1/timeline", params={"head": "dims"}, files={"file": speech.read_bytes()}
        ).json()
        library = tiny_recognizer.timeline(str(speech), head=head)
        assert len(timeline["segments"]) == len(library.segments) > 1
        for served, local in zip(timeline["segments"], library.segments, strict=True):
            assert served["head"]["kind"] == "regression"
            assert np.allclose(
                list(served["head"]["values"].values()), list((local.head.values or {}).values()), atol=1e-6
            )
        assert timeline["summary"]["head"]["values"] == pytest.approx(library.summary["head"]["values"])

        messages = streamed(live, speech, "head=dims&hop_s=0.25")
        segments = [m for m in messages if m["type"] == "segment"]
        interims = [m for m in messages if m["type"] == "interim"]
        assert len(segments) == len(timeline["segments"]) and interims
        for streamed, served in zip(segments, timeline["segments"], strict=True):
            assert np.allclose(
                list(streamed["head"]["values"].values()), list(served["head"]["values"].values()), atol=1e-5
            )
        assert all(
            m["head"]["kind"] == "regression" and set(m["head"]["values"]) == set(TARGETS) for m in interims
        )
        assert messages[-1]["summary"]["head"]["kind"] == "regression"
        assert 'emoserve_head_results_total{head="dims",label="values"}' in live.client.get("/metrics").text
