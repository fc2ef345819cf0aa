"""Your own labels: datasets, the embeddings cache, cross-validation without leakage, the head directory
(safetensors + head.json), its numpy inference against scikit-learn's, evaluate's figures against
scikit-learn's, the CLI, and a head served over HTTP.

The labelled set is generated (tests/support/labelled.py): three classes of synthetic sounds that differ
acoustically (a low voice-like harmonic tone, a high one, noise), four "speakers" each (pitch and loudness
vary by speaker). Random-weight embeddings still separate them, so a head must be far above chance on
speakers it never saw: an honest test that the pipeline learns, not that the weights know emotions.
Regression heads: tests/inference/test_training.py.
"""

from __future__ import annotations

import dataclasses
import gc
import importlib.util
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf

if importlib.util.find_spec("sklearn") is None:  # the train extra (./test.sh installs it)
    if os.environ.get("EMOSERVE_REQUIRE_TOOLS"):  # CI: a missing extra must not turn these into skips
        raise ImportError("scikit-learn is missing: scripts/setup-venv.sh test,ray,train")
    pytest.skip("the train extra (scikit-learn) is not installed", allow_module_level=True)

from sklearn import metrics

from emoserve.cli import main
from emoserve.errors import HeadError, SettingsError
from emoserve.inference.datasets import read_dataset
from emoserve.inference.embeddings import EmbeddingCache
from emoserve.inference.training import (
    Labelled,
    TrainOptions,
    embed_dataset,
    evaluate_head,
    splits,
    train_head,
)
from emoserve.model.head import META_FILE, WEIGHTS_FILE, Head
from emoserve.serving.settings import load_settings
from tests.support.labelled import CLASSES, PER_CLASS, SPEAKERS, SR, synthetic_clip, write_labelled_set
from tests.support.paths import FIXTURE


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_labelled_set(tmp_path_factory.mktemp("labelled"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, manifest: Path, tiny_recognizer: Any) -> Any:
    """A head trained on the fixture model (the live server's) and the embeddings it was trained on."""
    cache = EmbeddingCache(tmp_path_factory.mktemp("cache"), tiny_recognizer)
    labelled = embed_dataset(tiny_recognizer, read_dataset(manifest), cache=cache)
    out = tmp_path_factory.mktemp("heads") / "tones"
    return train_head(tiny_recognizer, labelled, out, TrainOptions()), labelled


# ------------------------------------------------------------------------------------------- training


def test_a_head_learns_and_is_far_above_chance_on_held_out_speakers(trained: Any) -> None:
    result, _ = trained
    report = result.report
    assert report["cv"]["method"] == "leave-one-group-out" and len(report["cv"]["folds"]) == SPEAKERS
    assert report["n"] == len(CLASSES) * SPEAKERS * PER_CLASS and report["skipped"] == []
    assert report["balanced_accuracy"] >= 0.8, report  # chance is 1/3
    for fold in report["cv"]["folds"]:  # every speaker held out once, alone
        assert len(fold["test_groups"]) == 1 and fold["accuracy"] >= 0.5, fold
    assert set(report) >= {"accuracy", "balanced_accuracy", "f1_macro", "f1_weighted", "per_class",
                           "confusion_matrix", "n", "skipped", "by_group"}  # fmt: skip
    assert report["confusion_matrix"]["labels"] == sorted(CLASSES)
    assert sum(map(sum, report["confusion_matrix"]["matrix"])) == report["n"]


def test_no_group_is_in_both_the_train_and_the_test_folds() -> None:
    rng = np.random.default_rng(1)
    for n_groups, method in ((4, "leave-one-group-out"), (14, "stratified group 5-fold")):
        groups = [f"g{i % n_groups}" for i in range(140)]
        labels = [CLASSES[i % 3] for i in range(140)]
        labelled = Labelled(rng.normal(size=(140, 8)), labels, list(groups), [""] * 140, [], 0)
        name, pairs = splits(labelled, TrainOptions())
        assert name == method
        tested = []
        for train, test in pairs:
            assert not {groups[i] for i in train} & {groups[i] for i in test}
            tested += list(test)
        assert sorted(tested) == list(range(140))  # each row predicted once, by a model that never saw it
    plain = Labelled(
        rng.normal(size=(30, 8)), [CLASSES[i % 3] for i in range(30)], [None] * 30, [""] * 30, [], 0
    )
    assert splits(plain, TrainOptions())[0] == "stratified 5-fold"


def test_the_head_directory_is_safe_and_complete(trained: Any) -> None:
    result, _ = trained
    files = sorted(p.name for p in result.path.iterdir())
    assert files == ["confusion.png", META_FILE, WEIGHTS_FILE, "report.json"]  # no pickle
    assert (result.path / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    meta = json.loads((result.path / META_FILE).read_text())
    assert [label["name"] for label in meta["labels"]] == sorted(CLASSES)
    assert meta["model"]["embedding_dim"] == 64 and meta["model"]["config_sha256"]
    assert set(meta["versions"]) == {"emoserve", "scikit-learn", "numpy", "python"}
    assert meta["report"]["cv"] == "leave-one-group-out"
    assert json.loads((result.path / "report.json").read_text())["n"] == result.report["n"]


@pytest.mark.parametrize("classifier", ["logistic", "mlp"])
def test_numpy_head_equals_predict_proba(
    trained: Any, tmp_path: Path, tiny_recognizer: Any, classifier: str
) -> None:
    _, labelled = trained
    if classifier == "logistic":
        result = trained[0]
    else:
        result = train_head(
            tiny_recognizer, labelled, tmp_path / "mlp", TrainOptions(classifier="mlp", hidden=32)
        )
    head = Head.load(result.path)
    assert np.abs(head.probabilities(labelled.x) - result.pipeline.predict_proba(labelled.x)).max() < 1e-6
    # two labels: one logit in scikit-learn, stored as (0, z)
    two = dataclasses.replace(labelled, y=["a" if y == "noise" else "b" for y in labelled.y])
    binary = train_head(
        tiny_recognizer, two, tmp_path / "two", TrainOptions(classifier=classifier, hidden=16)
    )
    p = Head.load(binary.path).probabilities(two.x)
    assert np.abs(p - binary.pipeline.predict_proba(two.x)).max() < 1e-6


def test_predict_with_a_head_in_the_library(trained: Any, manifest: Path, tiny_recognizer: Any) -> None:
    result, _ = trained
    head = Head.load(result.path)
    clip = str(manifest.parent / "spk0_high_0.wav")
    r = tiny_recognizer.predict(clip, head=head)
    assert r.head is not None and r.head.name == "tones" and set(r.head.scores) == set(CLASSES)
    emb = tiny_recognizer.predict(clip, embedding=True).embedding
    expected = result.pipeline.predict_proba(emb[None].astype(np.float64))[0]
    assert np.allclose(list(r.head.scores.values()), expected, atol=1e-6)
    assert r.head.label == CLASSES[1] and r.head.confidence == max(r.head.scores.values())
    frame = tiny_recognizer.predict(clip, "frame", head=head).head  # the pooled embedding either way
    assert np.allclose(list(frame.scores.values()), expected, atol=1e-6)
    many = tiny_recognizer.predict_many([clip, clip], head=head)
    for m in many:  # a padded batch gives the clip's numbers (within float32 noise)
        assert m.head is not None and m.head.label == r.head.label
        assert np.allclose(list(m.head.scores.values()), list(r.head.scores.values()), atol=1e-6)
    assert r.to_dict()["head"]["label"] == "high"


@pytest.mark.slow
def test_torch_and_onnx_give_the_same_head_scores(
    trained: Any, manifest: Path, tiny_recognizer: Any, tiny_onnx: Any
) -> None:
    head = Head.load(trained[0].path)
    clips = [str(manifest.parent / f"spk1_{kind}_2.wav") for kind in CLASSES]
    for a, b in zip(tiny_recognizer.predict_many(clips, head=head), tiny_onnx.predict_many(clips, head=head),
                    strict=True):  # fmt: skip
        assert a.head.label == b.head.label
        assert np.allclose(list(a.head.scores.values()), list(b.head.scores.values()), atol=1e-4)


# ------------------------------------------------------------------------------------------ evaluate


def test_evaluate_figures_equal_scikit_learns(trained: Any) -> None:
    result, labelled = trained
    head = Head.load(result.path)
    report = evaluate_head(labelled, head)
    y_pred = [head.labels[i].name for i in head.probabilities(labelled.x).argmax(axis=1)]
    assert report["accuracy"] == pytest.approx(metrics.accuracy_score(labelled.y, y_pred), abs=1e-6)
    assert report["balanced_accuracy"] == pytest.approx(
        metrics.balanced_accuracy_score(labelled.y, y_pred), abs=1e-6
    )
    assert report["f1_macro"] == pytest.approx(
        metrics.f1_score(labelled.y, y_pred, average="macro"), abs=1e-6
    )
    assert report["f1_weighted"] == pytest.approx(
        metrics.f1_score(labelled.y, y_pred, average="weighted"), abs=1e-6
    )
    labels = report["confusion_matrix"]["labels"]
    assert (
        report["confusion_matrix"]["matrix"]
        == metrics.confusion_matrix(labelled.y, y_pred, labels=labels).tolist()
    )
    p, r, f, s = metrics.precision_recall_fscore_support(labelled.y, y_pred, labels=labels, zero_division=0)
    for i, label in enumerate(labels):
        assert report["per_class"][label] == pytest.approx(
            {"precision": p[i], "recall": r[i], "f1": f[i], "support": s[i]}, abs=1e-6
        )


def test_evaluate_the_nine_emotions_with_a_label_map(
    manifest: Path, tmp_path: Path, tiny_recognizer: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "eval"
    argv = ["evaluate", str(manifest), "-m", str(FIXTURE / "model"), "--backend", "torch",
            "--map", "low=sad,high=happy", "--by", "group", "--out", str(out), "--no-cache"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert (out / "confusion.png").stat().st_size > 0
    noise = [s for s in report["skipped"] if "'noise' is not one of the model's labels" in s["reason"]]
    assert len(noise) == SPEAKERS * PER_CLASS and report["n"] == 2 * SPEAKERS * PER_CLASS
    rows = [r for r in read_dataset(manifest).items if r.label != "noise"]
    y_true = [{"low": "sad", "high": "happy"}[r.label] for r in rows]
    y_pred = [r.emotion for r in tiny_recognizer.predict_many([r.path for r in rows])]
    assert report["accuracy"] == pytest.approx(metrics.accuracy_score(y_true, y_pred), abs=1e-6)
    assert report["f1_macro"] == pytest.approx(metrics.f1_score(y_true, y_pred, average="macro"), abs=1e-6)
    assert set(report["by_group"]) == {f"spk{i}" for i in range(SPEAKERS)}
    assert "balanced accuracy (UA)" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ refusals


def test_datasets_report_what_they_leave_out(tmp_path: Path) -> None:
    (tmp_path / "a.wav").write_bytes(b"not audio at all")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(
        '{"path": "a.wav", "label": "x"}\n{"path": "gone.wav", "label": "y"}\n{"path": "", "label": "y"}\n'
    )
    dataset = read_dataset(manifest)
    assert [item.label for item in dataset.items] == ["x"]
    assert {s["reason"] for s in dataset.skipped} == {"no such file", "m.jsonl row 3: no path"}
    (tmp_path / "bad.csv").write_text("file,emotion\na.wav,x\n")
    with pytest.raises(ValueError, match="no column path or label"):
        read_dataset(tmp_path / "bad.csv")
    with pytest.raises(FileNotFoundError):
        read_dataset(tmp_path / "nope.csv")


def test_undecodable_files_are_skipped_with_their_reason(tmp_path: Path, tiny_recognizer: Any) -> None:
    manifest = write_labelled_set(tmp_path, speakers=1, per_class=2)
    (tmp_path / "broken.wav").write_bytes(b"RIFF....WAVEfmt garbage")
    with manifest.open("a") as f:
        f.write("broken.wav,low,spk0,\n")
    labelled = embed_dataset(tiny_recognizer, read_dataset(manifest), cache=None)
    assert len(labelled.y) == 6 and [s["path"] for s in labelled.skipped] == [str(tmp_path / "broken.wav")]


def test_data_that_cannot_train_a_head_is_refused(tiny_recognizer: Any, tmp_path: Path) -> None:
    rng = np.random.default_rng(2)

    def data(labels: list[str], groups: list[str | None] | None = None) -> Labelled:
        return Labelled(
            rng.normal(size=(len(labels), 64)),
            labels,
            groups or [None] * len(labels),
            [""] * len(labels),
            [],
            0,
        )

    with pytest.raises(ValueError, match="only one label"):
        train_head(tiny_recognizer, data(["a"] * 10), tmp_path / "h")
    with pytest.raises(ValueError, match="too few examples to cross-validate: 'b' has 1"):
        train_head(tiny_recognizer, data(["a"] * 10 + ["b"]), tmp_path / "h")
    with pytest.raises(ValueError, match="one group only"):
        train_head(tiny_recognizer, data(["a", "b"] * 5, ["s1"] * 10), tmp_path / "h")
    few = train_head(tiny_recognizer, data(["a", "b"] * 4), tmp_path / "h")
    assert any("few examples" in w for w in few.warnings)
    # a speaker who alone has a label: held out, nothing of that label is left to train on
    lonely = train_head(
        tiny_recognizer, data(["a", "b"] * 4 + ["c", "c"], ["s1", "s2"] * 4 + ["s3", "s3"]), tmp_path / "h"
    )
    assert any("holding out s3 leaves no example of 'c'" in w for w in lonely.warnings)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.txt").write_text("precious")
    with pytest.raises(ValueError, match="exists and is not a head directory"):
        train_head(tiny_recognizer, data(["a", "b"] * 4), tmp_path / "mine")
    assert (tmp_path / "mine" / "thesis.txt").read_text() == "precious"
    assert not (tmp_path / "h-refused").exists()


def test_a_head_from_another_model_or_damaged_is_refused(
    trained: Any, tmp_path: Path, tiny_recognizer: Any
) -> None:
    import shutil

    source = trained[0].path
    other = tmp_path / "other"
    shutil.copytree(source, other)
    meta = json.loads((other / META_FILE).read_text())
    meta["model"]["weights_sha256"] = "0" * 64
    meta["model"]["name"] = "emotion2vec_plus_large"
    (other / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(HeadError, match="trained on the embeddings of emotion2vec_plus_large"):
        tiny_recognizer.predict(str(source.parent), head=Head.load(other))  # refused before any audio
    meta["model"]["embedding_dim"] = 1024
    (other / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(HeadError, match="1024-d embeddings"):
        Head.load(other).check_model(tiny_recognizer.info)

    damaged = tmp_path / "damaged"
    shutil.copytree(source, damaged)
    data = bytearray((damaged / WEIGHTS_FILE).read_bytes())
    data[-3] ^= 0xFF
    (damaged / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(HeadError, match="is damaged: its sha256 differs"):
        Head.load(damaged)
    (damaged / META_FILE).write_text("{not json")
    with pytest.raises(HeadError, match="not valid JSON"):
        Head.load(damaged)
    with pytest.raises(HeadError, match="not a head directory"):
        Head.load(tmp_path / "nowhere")
    assert HeadError("x").code == "invalid_head"


# --------------------------------------------------------------------------------------------- cache


def test_the_embeddings_cache_is_reused_and_invalidated(tmp_path: Path, tiny_recognizer: Any) -> None:
    from emoserve.inference.recognizer import load_model
    from emoserve.model.testing import make_test_model

    manifest = write_labelled_set(tmp_path / "data", speakers=1, per_class=2)
    dataset = read_dataset(manifest)
    cache = EmbeddingCache(tmp_path / "cache", tiny_recognizer)
    first = embed_dataset(tiny_recognizer, dataset, cache=cache)
    assert first.computed == 6
    again = embed_dataset(tiny_recognizer, dataset, cache=cache)
    assert again.computed == 0 and np.array_equal(again.x, first.x)
    changed = manifest.parent / "spk0_low_0.wav"
    sf.write(
        changed, synthetic_clip("noise", 0, 9, np.random.default_rng(5)), SR
    )  # the file's content changes
    assert embed_dataset(tiny_recognizer, dataset, cache=cache).computed == 1
    other = load_model(
        make_test_model(tmp_path / "m", seed=3), backend="torch", dtype="float32", progress=False
    )
    assert embed_dataset(other, dataset, cache=EmbeddingCache(tmp_path / "cache", other)).computed == 6


# ----------------------------------------------------------------------------------------------- CLI


def test_cli_train_head_then_predict_with_it(
    manifest: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """On a model marked as random-weight: everything a user reads says so."""
    from emoserve.model.testing import make_test_model

    model = str(make_test_model(tmp_path / "random-model"))
    head_dir = tmp_path / "mood"
    common = ["-m", model, "--backend", "torch", "--cache-dir", str(tmp_path / "cache")]
    assert main(["train-head", str(manifest), "--out", str(head_dir), *common]) == 0
    captured = capsys.readouterr()
    assert "leave-one-group-out" in captured.out and "RANDOM" in captured.err
    assert main(["train-head", str(manifest), "--out", str(head_dir), *common]) == 0
    assert "(0 computed, the rest cached)" in capsys.readouterr().err
    out = tmp_path / "rows.jsonl"
    clip = str(manifest.parent / "spk2_noise_1.wav")
    assert main(["predict", clip, "--head", str(head_dir), "-o", str(out), *common[:4]]) == 0
    row = json.loads(out.read_text())
    assert row["random_weights"] is True and row["head"]["name"] == "mood"
    assert set(row["head"]["scores"]) == set(CLASSES)
    assert main(["predict", clip, "--head", str(head_dir), "--format", "table", *common[:4]]) == 0
    assert "mood: " in capsys.readouterr().out
    assert main(["evaluate", str(manifest), "--head", str(head_dir), *common]) == 0
    assert "RANDOM WEIGHTS" in capsys.readouterr().out
    # another model's head: one sentence, exit 2
    assert (
        main(["predict", clip, "--head", str(head_dir), "-m", str(FIXTURE / "model"), "--backend", "torch"])
        == 2
    )
    assert "train it again on this model" in capsys.readouterr().err


def test_predict_segments_with_a_head(trained: Any, manifest: Path, tmp_path: Path) -> None:
    spans = tmp_path / "spans.json"
    spans.write_text(json.dumps([{"start_s": 0.0, "end_s": 0.5}, {"start_s": 0.5, "end_s": 1.0}]))
    clip = str(manifest.parent / "spk1_high_3.wav")
    common = ["--segments-from", str(spans), "--head", str(trained[0].path), "-m", str(FIXTURE / "model")]
    out = tmp_path / "timeline.jsonl"
    assert main(["predict", clip, *common, "--backend", "torch", "-o", str(out)]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["head"]["name"] for line in lines if line["type"] == "segment"] == ["tones", "tones"]
    assert lines[-1]["type"] == "summary" and lines[-1]["summary"]["head"]["dominant"] in CLASSES
    csv_out = tmp_path / "timeline.csv"
    assert main(["predict", clip, *common, "--backend", "torch", "--format", "csv", "-o", str(csv_out)]) == 0
    header = csv_out.read_text().splitlines()[0].split(",")
    assert {"head", "head_label", "head_confidence", "head_score_low"} <= set(header)


def test_one_class_data_is_a_clear_cli_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = write_labelled_set(tmp_path, speakers=2, per_class=2)
    lines = [line for line in manifest.read_text().splitlines() if ",low," in line or line.startswith("path")]
    manifest.write_text("\n".join(lines) + "\n")
    argv = [
        "train-head",
        str(manifest),
        "--out",
        str(tmp_path / "h"),
        "-m",
        str(FIXTURE / "model"),
        "--no-cache",
    ]
    assert main(argv) == 2
    assert "only one label ('low'" in capsys.readouterr().err


def test_serving_a_head_never_imports_scikit_learn(trained: Any, manifest: Path) -> None:
    code = (
        "import sys; from emoserve import Head, load_model; "
        f"rec = load_model({str(FIXTURE / 'model')!r}, backend='torch', dtype='float32', progress=False); "
        f"head = Head.load({str(trained[0].path)!r}); "
        f"r = rec.predict({str(manifest.parent / 'spk0_low_0.wav')!r}, head=head); "
        "assert r.head is not None; assert 'sklearn' not in sys.modules, 'sklearn imported'"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


# ---------------------------------------------------------------------------------------------- serve


def test_head_settings(trained: Any, tmp_path: Path) -> None:
    path = str(trained[0].path)
    s = load_settings(environ={"EMOSERVE_HEADS": f"mood={path},{path}"})
    assert s.heads == (("mood", path), ("tones", path))
    assert load_settings({"heads": [f"a={path}", f"b={path}"]}).heads == (("a", path), ("b", path))
    with pytest.raises(SettingsError, match=r"EMOSERVE_HEADS: .* is not a head directory"):
        load_settings(environ={"EMOSERVE_HEADS": f"x={tmp_path}"})
    with pytest.raises(SettingsError, match="--head: the head name 'a' is given twice"):
        load_settings({"heads": [f"a={path}", f"a={path}"]})


# Gradio's start-up events open event loops (socketpairs) of their own and never close them
@pytest.mark.filterwarnings("ignore::ResourceWarning", "ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_served_head_over_http(
    trained: Any, manifest: Path, tmp_path: Path, tiny_recognizer: Any, caplog: pytest.LogCaptureFixture
) -> None:
    from emoserve.api.warmup import UI_ROUTE
    from tests.support.server import LIVE, live_server

    caplog.set_level(logging.INFO, logger="emoserve.api.warmup")
    settings = dataclasses.replace(
        LIVE, heads=(("tones", str(trained[0].path)),), max_timeline_s=60.0, ui=True,
        outputs_dir=tmp_path / "outputs",
    )  # fmt: skip
    clip = manifest.parent / "spk3_low_4.wav"
    with live_server(settings, tmp_path / "home", warm_routes_at=lambda url: url) as live:
        # the warm-up's click on the UI's Recognize sent the head dropdown too (/recognize takes `head`)
        assert live.service.ui_error is None
        (warmed,) = [r.getMessage() for r in caplog.records if "routes warmed up" in r.getMessage()]
        assert warmed.endswith(UI_ROUTE), warmed
        heads = live.client.get("/v1/model").json()["heads"]
        assert [h["name"] for h in heads] == ["tones"] and heads[0]["cv"]["balanced_accuracy"] >= 0.8
        body = live.client.post("/v1/recognize", params={"head": "tones"}, content=clip.read_bytes()).json()
        expected = tiny_recognizer.predict(str(clip), head=Head.load(trained[0].path)).head
        assert body["head"]["label"] == expected.label and body["embedding"] is None
        assert np.allclose(list(body["head"]["scores"].values()), list(expected.scores.values()), atol=1e-6)
        form = live.client.post(
            "/v1/recognize", files={"file": ("c.wav", clip.read_bytes())}, data={"head": "tones"}
        )
        assert form.json()["head"]["label"] == expected.label
        assert live.client.post("/v1/recognize", content=clip.read_bytes()).json()["head"] is None
        bad = live.client.post("/v1/recognize", params={"head": "nope"}, content=clip.read_bytes())
        assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_parameter"
        assert "tones" in bad.json()["error"]["message"]
        spans = json.dumps([{"start_s": 0.0, "end_s": 0.5}, {"start_s": 0.5, "end_s": 1.0}])
        timeline = live.client.post(
            "/v1/timeline", params={"head": "tones"}, files={"file": ("c.wav", clip.read_bytes())},
            data={"segments": spans},
        ).json()  # fmt: skip
        assert [s["head"]["name"] for s in timeline["segments"]] == ["tones", "tones"]
        assert timeline["summary"]["head"]["dominant"] in CLASSES
        bad = live.client.post("/v1/timeline", params={"head": "nope"}, content=clip.read_bytes())
        assert bad.status_code == 422
        text = live.client.get("/metrics").text
        assert f'emoserve_head_results_total{{head="tones",label="{expected.label}"}}' in text
    gc.collect()  # Gradio's leaked loops are reported under this test's filter, not a later test's


def test_a_head_for_another_model_fails_start_up(trained: Any, tmp_path: Path) -> None:
    import shutil

    from emoserve.serving.service import Service
    from tests.support.server import LIVE

    other = tmp_path / "other"
    shutil.copytree(trained[0].path, other)
    meta = json.loads((other / META_FILE).read_text())
    meta["model"]["embedding_dim"] = 1024
    (other / META_FILE).write_text(json.dumps(meta))
    service = Service(dataclasses.replace(LIVE, heads=(("other", str(other)),)))
    service.start().join(60)
    assert service.phase == "failed" and "1024-d embeddings" in str(service.reason)


@pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning")
def test_the_web_ui_offers_the_served_heads(trained: Any, manifest: Path, tiny_recognizer: Any) -> None:
    """The Clip and Long-recording tabs get a head choice (their Gradio API events a `head` parameter)
    when the server has heads, and render the head's result; without heads nothing changes."""
    from emoserve.audio.vad import Segment
    from emoserve.inference.results import scored
    from emoserve.webui.app import build_ui
    from emoserve.webui.charts import segment_table
    from emoserve.webui.clip import result_card
    from tests.support.environment import gradio_loops_closed
    from tests.support.webui import FakeService, ui_settings

    settings = dataclasses.replace(ui_settings(None), heads=(("tones", str(trained[0].path)),))
    for with_heads, ui_settings_ in ((True, settings), (False, ui_settings(None))):
        with gradio_loops_closed():
            config = build_ui(FakeService(None, ui_settings_)).get_config_file()
        ids = {c.get("props", {}).get("elem_id") for c in config["components"]}
        assert ({"head", "tl-head"} <= ids) is with_heads
        inputs = {d["api_name"]: len(d["inputs"]) for d in config["dependencies"] if d.get("api_name")}
        assert (inputs["recognize"], inputs["timeline"]) == ((4, 6) if with_heads else (3, 5))
    result = tiny_recognizer.predict(
        str(manifest.parent / "spk0_noise_0.wav"), head=Head.load(trained[0].path)
    )
    assert 'id="result-head"' in result_card(result) and "tones: <b>noise</b>" in result_card(result)
    segment = scored(Segment(0, SR, np.zeros(SR, np.float32)), result)
    assert list(segment_table([segment])["tones (yours)"]) == [f"noise {result.head.confidence:.2f}"]


# ------------------------------------------------------------------------ calibration and abstaining


def test_a_head_calibrated_on_its_cross_validated_predictions(
    trained: Any, tmp_path: Path, tiny_recognizer: Any, manifest: Path
) -> None:
    from emoserve.inference.confidence import calibration_from_dict

    _, labelled = trained
    result = train_head(tiny_recognizer, labelled, tmp_path / "calibrated", TrainOptions(calibrate=True))
    calibration = result.report["calibration"]
    assert calibration["method"] == "temperature"  # 60 rows: isotonic is not tried
    assert set(calibration["before"]) == {"ece", "log_loss", "accuracy"}
    assert calibration["after"]["accuracy"] == calibration["before"]["accuracy"]
    assert (result.path / "reliability.png").read_bytes()[:4] == b"\x89PNG"
    head = Head.load(result.path)
    fitted = calibration_from_dict(head.meta["calibration"], "head.json")
    clip = str(manifest.parent / "spk2_low_1.wav")
    served = tiny_recognizer.predict(clip, head=head).head
    emb = tiny_recognizer.predict(clip, embedding=True).embedding[None].astype(np.float64)
    expected = fitted.apply(result.pipeline.predict_proba(emb))[0]
    assert served.calibrated and np.allclose(list(served.scores.values()), expected, atol=1e-6)


def test_evaluate_reports_coverage_and_suggests_a_threshold(
    trained: Any, manifest: Path, tmp_path: Path, tiny_recognizer: Any
) -> None:
    from emoserve.inference.evaluation import coverage

    result, labelled = trained
    out = tmp_path / "eval"
    argv = ["evaluate", str(manifest), "--head", str(result.path), "--min-confidence", "0.8",
            "--target-accuracy", "0.95", "--out", str(out), "-m", str(FIXTURE / "model"),
            "--backend", "torch", "--no-cache"]  # fmt: skip
    assert main(argv) == 0
    abstain = json.loads((out / "report.json").read_text())["abstain"]
    p = result.pipeline.predict_proba(labelled.x)
    correct = result.pipeline.classes_[p.argmax(axis=1)] == np.array(labelled.y)
    assert abstain["at_threshold"] == coverage(correct, p.max(axis=1), 0.8)
    assert abstain["suggested"]["target_accuracy"] == 0.95
    if abstain["suggested"]["threshold"] is not None:
        assert abstain["suggested"]["accuracy"] >= 0.95
    # a head's own threshold (train-head --min-confidence): its label is `uncertain` under it
    strict = train_head(tiny_recognizer, labelled, tmp_path / "strict", TrainOptions(min_confidence=1.0))
    said = tiny_recognizer.predict(str(manifest.parent / "spk0_low_0.wav"), head=Head.load(strict.path)).head
    assert said.label == "uncertain" and said.scores  # its scores stay
    relaxed = tiny_recognizer.predict(
        str(manifest.parent / "spk0_low_0.wav"), head=Head.load(strict.path), min_confidence=0.0
    ).head
    assert relaxed.label != "uncertain"  # the request's threshold wins


def test_evaluate_the_nine_emotions_restricted_to_a_label_subset(
    manifest: Path, tmp_path: Path, tiny_recognizer: Any
) -> None:
    out = tmp_path / "eval"
    argv = ["evaluate", str(manifest), "-m", str(FIXTURE / "model"), "--backend", "torch", "--no-cache",
            "--map", "low=sad,high=happy,noise=neutral", "--labels", "happy,neutral,sad",
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    rows = read_dataset(manifest).items
    y_true = [{"low": "sad", "high": "happy", "noise": "neutral"}[r.label] for r in rows]
    y_pred = [
        r.emotion for r in tiny_recognizer.predict_many([r.path for r in rows], labels="happy,neutral,sad")
    ]
    assert set(y_pred) <= {"happy", "neutral", "sad"}  # the subset's labels only
    assert report["accuracy"] == pytest.approx(metrics.accuracy_score(y_true, y_pred), abs=1e-6)
    assert set(report["confusion_matrix"]["labels"]) <= {"happy", "neutral", "sad"}
