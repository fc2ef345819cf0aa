"""Finding, converting and loading weights: strict keys, the slim cache, labels, test models."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from emoserve.errors import HubError, WeightsError
from emoserve.files import sha256_file
from emoserve.inference.recognizer import load_model
from emoserve.model import checkpoint as weights
from emoserve.model import entry as entries
from emoserve.model import hub
from emoserve.model.cache import describe, resolve
from emoserve.model.convert import convert, load_entry
from emoserve.model.network import Emotion2vec
from emoserve.model.testing import make_test_model
from tests.support.paths import FIXTURE
from tests.support.reference import copy_fixture, wave

AUDIO = weights._AUDIO


def edit_checkpoint(model_dir: Path, edit) -> None:  # type: ignore[no-untyped-def]
    checkpoint = torch.load(model_dir / "model.pt", weights_only=True)
    edit(checkpoint["model"])
    torch.save(checkpoint, model_dir / "model.pt")


def scores(recognizer, clip: str = "en_1s_16k.wav") -> dict[str, float]:  # type: ignore[no-untyped-def]
    return recognizer.predict((wave(clip), 16000)).scores


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        (lambda sd: sd.pop("d2v_model.blocks.1.mlp.fc2.bias"), "missing: d2v_model.blocks.1.mlp.fc2.bias"),
        (lambda sd: sd.pop(f"{AUDIO}alibi_scale"), f"missing: {AUDIO}alibi_scale"),
        (
            lambda sd: sd.update({"d2v_model.blocks.2.norm1.weight": torch.ones(64)}),
            "unexpected: d2v_model.blocks.2.norm1.weight",
        ),
        (
            lambda sd: sd.update({"proj.weight": torch.ones(8, 64)}),
            "proj.weight is (8, 64), expected (9, 64)",
        ),
    ],
)
def test_checkpoint_mismatch_names_the_tensor(tmp_path: Path, edit, named: str) -> None:  # type: ignore[no-untyped-def]
    model_dir = copy_fixture(tmp_path)
    edit_checkpoint(model_dir, edit)
    with pytest.raises(WeightsError, match=named.replace("(", r"\(").replace(")", r"\)")):
        load_model(model_dir, device="cpu", dtype="float32")


def test_training_only_decoder_keys_are_ignored(tmp_path: Path, tiny_recognizer) -> None:  # type: ignore[no-untyped-def]
    model_dir = copy_fixture(tmp_path)
    edit_checkpoint(model_dir, lambda sd: sd.update({f"{AUDIO}decoder.proj.weight": torch.ones(3, 3)}))
    assert scores(load_model(model_dir, device="cpu", dtype="float32")) == scores(tiny_recognizer)


def test_arbitrary_pickles_are_refused(tmp_path: Path) -> None:
    model_dir = copy_fixture(tmp_path)
    torch.save({"model": {}, "evil": nn.Linear(1, 1)}, model_dir / "model.pt")  # a module: not weights-only
    with pytest.raises(WeightsError, match="not a weights-only checkpoint"):
        load_model(model_dir, device="cpu", dtype="float32")


@pytest.mark.parametrize("damage", ["garbage", "cut"])
def test_a_damaged_checkpoint_names_the_file(tmp_path: Path, damage: str) -> None:
    model_dir = copy_fixture(tmp_path)
    whole = (model_dir / "model.pt").read_bytes()
    (model_dir / "model.pt").write_bytes(
        b"\x80\x02garbage" * 100 if damage == "garbage" else whole[: len(whole) // 2]
    )
    with pytest.raises(WeightsError, match=r"model\.pt: cannot load"):
        load_model(model_dir, device="cpu", dtype="float32")


def test_unuse_labels_are_masked(tmp_path: Path, tiny_recognizer) -> None:  # type: ignore[no-untyped-def]
    model_dir = copy_fixture(tmp_path)
    tokens = (model_dir / "tokens.txt").read_text(encoding="utf-8").splitlines()
    tokens[1], tokens[5] = "unuse_1", "unuse_5"
    (model_dir / "tokens.txt").write_text("\n".join(tokens), encoding="utf-8")
    masked = scores(load_model(model_dir, device="cpu", dtype="float32"))
    full = scores(tiny_recognizer)
    assert list(masked) == ["angry", "fearful", "happy", "neutral", "sad", "surprised", "unknown"]
    # softmax with -inf logits = the full softmax renormalised over the kept labels
    kept = sum(full[k] for k in masked)
    for label, p in masked.items():
        assert p == pytest.approx(full[label] / kept, abs=1e-6)


def test_published_and_slim_entry_give_identical_outputs(tmp_path: Path) -> None:
    config, labels, state = weights.read_published(FIXTURE / "model")
    entry = convert(FIXTURE / "model", tmp_path / "entry")
    assert {p.name for p in entry.iterdir()} == {
        "model.safetensors",
        "config.json",
        "manifest.json",
        "tokens.txt",
    }
    assert (entry / "model.safetensors").stat().st_size < (FIXTURE / "model" / "model.pt").stat().st_size
    loaded, info = load_entry(entry)
    assert info.config == config and info.labels == labels and not info.random_weights
    assert info.source["sha256"] == sha256_file(FIXTURE / "model" / "model.pt")
    reference = Emotion2vec(config)
    reference.load_state_dict(state)
    x = torch.from_numpy(wave("zh_3s_16k.wav"))[None]
    n = torch.tensor([x.shape[1]])
    with torch.inference_mode():
        assert torch.equal(loaded(x, n).frames, reference.eval()(x, n).frames)


def test_entry_loads_without_initialising_parameters(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    entry = convert(FIXTURE / "model", tmp_path / "entry")

    def no_init(self: nn.Module) -> None:
        if not any(p.is_meta for p in self.parameters()):
            raise AssertionError(f"{type(self).__name__} was initialised off the meta device")

    for cls in (nn.Linear, nn.Conv1d, nn.LayerNorm):
        monkeypatch.setattr(cls, "reset_parameters", no_init)
    model, _ = load_entry(entry)
    assert not any(p.is_meta for p in model.parameters())


def test_directory_is_converted_once_and_again_when_it_changes(tmp_path: Path) -> None:
    model_dir = copy_fixture(tmp_path)
    cache = tmp_path / "cache"
    entry = resolve(model_dir, cache=cache)
    first = (entry / "manifest.json").stat().st_mtime_ns
    assert resolve(model_dir, cache=cache) == entry
    assert (entry / "manifest.json").stat().st_mtime_ns == first
    stat = (model_dir / "model.pt").stat()
    os.utime(model_dir / "model.pt", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert resolve(model_dir, cache=cache) == entry
    assert (entry / "manifest.json").stat().st_mtime_ns != first


def test_a_cached_name_needs_no_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    convert(FIXTURE / "model", tmp_path / "models" / "emotion2vec_plus_base", name="emotion2vec_plus_base")

    def offline(*_args: object, **_kw: object) -> None:
        raise AssertionError("the network was used although the model is cached")

    monkeypatch.setattr(hub, "download", offline)
    for name in ("emotion2vec_plus_base", "iic/emotion2vec_plus_base", "emotion2vec/emotion2vec_plus_base"):
        assert resolve(name, cache=tmp_path) == tmp_path / "models" / "emotion2vec_plus_base"


def test_download_is_converted_and_the_raw_file_dropped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fake_download(name: str, dest: Path, **_kw: object) -> Path:
        shutil.copytree(FIXTURE / "model", dest)
        return dest

    monkeypatch.setattr(hub, "download", fake_download)
    entry = resolve("emotion2vec_plus_seed", cache=tmp_path)
    assert entries.is_entry(entry) and entries.read_entry(entry).name == "emotion2vec_plus_seed"
    assert not (tmp_path / "downloads" / "emotion2vec_plus_seed").exists()


def failing_download(*_args: object, **_kw: object) -> None:
    raise HubError("no network")


def test_an_explicit_model_never_falls_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hub, "download", failing_download)
    with pytest.raises(HubError, match="no network"):
        resolve("emotion2vec_plus_large", cache=tmp_path)
    with pytest.raises(WeightsError, match="neither a directory nor a known name"):
        resolve(tmp_path / "no-such-model", cache=tmp_path)
    assert not (tmp_path / "models").exists()


def test_the_default_falls_back_loudly_to_random_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(hub, "download", failing_download)
    monkeypatch.setattr(entries, "FALLBACK_PRESET", "tiny")  # the large one takes ~10 s to generate
    entry = resolve(None, cache=tmp_path)
    assert "RANDOM-WEIGHT" in caplog.text and "no network" in caplog.text
    assert entries.read_entry(entry).random_weights


def test_make_test_model_is_published_layout_and_marked_random(tmp_path: Path) -> None:
    out = make_test_model(tmp_path / "m", preset="tiny", seed=3)
    assert {p.name for p in out.iterdir()} == {"config.yaml", "model.pt", "tokens.txt", "configuration.json"}
    checkpoint = torch.load(out / "model.pt", weights_only=True)
    fixture = torch.load(FIXTURE / "model" / "model.pt", weights_only=True)
    assert {k: v.shape for k, v in checkpoint["model"].items()} == {
        k: v.shape for k, v in fixture["model"].items()
    }
    result = load_model(out, device="cpu", dtype="float32").predict((wave("en_1s_16k.wav"), 16000))
    assert result.random_weights is True
    assert result.model == "m"
    other = load_model(make_test_model(tmp_path / "m2", preset="tiny", seed=4), device="cpu", dtype="float32")
    assert other.predict((wave("en_1s_16k.wav"), 16000)).scores != result.scores


def test_training_state_pads_the_file_like_the_published_one(tmp_path: Path) -> None:
    slim = make_test_model(tmp_path / "a", preset="tiny")
    padded = make_test_model(tmp_path / "b", preset="tiny", training_state=True)
    ratio = (padded / "model.pt").stat().st_size / (slim / "model.pt").stat().st_size
    assert 2.8 < ratio < 3.2  # the published large file is 1,945,790,254 B for 649 MB of weights
    assert np.isclose(
        scores(load_model(padded, device="cpu", dtype="float32"))["happy"],
        scores(load_model(slim, device="cpu", dtype="float32"))["happy"],
    )


def test_describe_reports_config_labels_files(tmp_path: Path) -> None:
    info = describe(str(FIXTURE / "model"))
    assert info["parameters"] == sum(
        v.numel() for v in torch.load(FIXTURE / "model" / "model.pt", weights_only=True)["model"].values()
    )
    assert info["config"]["embed_dim"] == 64 and len(info["labels"]) == 9
    assert info["files"]["model.pt"] == (FIXTURE / "model" / "model.pt").stat().st_size
    assert describe("emotion2vec_plus_large")["cached"] is False
