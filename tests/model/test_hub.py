"""hub.py against fake hubs: Hugging Face faked at huggingface_hub's own functions, ModelScope at ours."""

from __future__ import annotations

import hashlib
import importlib
import logging
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import huggingface_hub
import pytest
from huggingface_hub.hf_api import BlobLfsInfo, RepoSibling
from huggingface_hub.utils import are_progress_bars_disabled

from emoserve.constants import DEFAULT_MODEL
from emoserve.errors import HubError
from emoserve.files import HASH_CHUNK_BYTES, sha256_file
from emoserve.model import hub
from emoserve.model.hub import MODEL_FILES

FILES = {
    "config.yaml": b"model: Emotion2vec\n",
    "model.pt": b"\x80\x02weights" * 100,
    "tokens.txt": "生气/angry\n<unk>".encode(),
    "configuration.json": b'{"framework": "pytorch"}',
}
GOOD_SHA = hashlib.sha256(FILES["model.pt"]).hexdigest()
COMMIT = "c0ffee" * 6 + "c0ff"


def write_files(into: Path, names: tuple[str, ...] = MODEL_FILES) -> None:
    into.mkdir(parents=True, exist_ok=True)
    for name in names:
        (into / name).write_bytes(FILES[name])
    # the hub libraries leave metadata beside the files; none of it may reach dest
    (into / ".cache").mkdir(exist_ok=True)
    (into / ".cache" / "download.lock").write_text("")


class FakeHf:
    """Replaces HfApi.model_info and hf_hub_download; records what it was asked for."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, sha256: str | None = GOOD_SHA) -> None:
        self.sha256 = sha256
        self.downloads: list[dict[str, Any]] = []
        self.bars_disabled: list[bool] = []
        monkeypatch.setattr(huggingface_hub.HfApi, "model_info", self.model_info)
        monkeypatch.setattr(huggingface_hub, "hf_hub_download", self.hf_hub_download)

    def model_info(self, repo_id: str, **kwargs: Any) -> SimpleNamespace:
        assert kwargs.get("files_metadata") is True
        lfs = BlobLfsInfo(size=1, sha256=self.sha256, pointer_size=134) if self.sha256 else None
        siblings = [RepoSibling(rfilename="model.pt", lfs=lfs), RepoSibling(rfilename="tokens.txt")]
        return SimpleNamespace(id=repo_id, sha=COMMIT, siblings=siblings)

    def hf_hub_download(self, repo_id: str, filename: str, **kwargs: Any) -> str:
        self.downloads.append({"repo_id": repo_id, "filename": filename, **kwargs})
        self.bars_disabled.append(are_progress_bars_disabled("huggingface_hub.http_get"))
        local_dir = Path(kwargs["local_dir"])
        write_files(local_dir, (filename,))
        return str(local_dir / filename)


def hf_down(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise ConnectionError("hf.co unreachable")

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", refuse)


def fake_ms(monkeypatch: pytest.MonkeyPatch, names: tuple[str, ...] = MODEL_FILES) -> list[str]:
    asked: list[str] = []

    def lookup(repo_id: str) -> Any:
        asked.append(repo_id)
        return hub._Remote(revision=None, sha256=GOOD_SHA.upper())  # ModelScope may send upper case

    def fetch(repo_id: str, revision: str | None, into: Path, progress: bool) -> Path:
        write_files(into, names)
        return into

    monkeypatch.setattr(hub, "_ms_lookup", lookup)
    monkeypatch.setattr(hub, "_ms_fetch", fetch)
    return asked


@pytest.fixture
def no_modelscope(monkeypatch: pytest.MonkeyPatch) -> None:
    # None in sys.modules makes `import modelscope` fail, whether or not it is installed
    monkeypatch.setitem(sys.modules, "modelscope", None)


def assert_model_dir(dest: Path) -> None:
    assert sorted(p.name for p in dest.iterdir()) == sorted(MODEL_FILES)
    for name in MODEL_FILES:
        assert (dest / name).read_bytes() == FILES[name]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("emotion2vec_plus_large", "emotion2vec_plus_large"),
        ("iic/emotion2vec_plus_large", "emotion2vec_plus_large"),
        ("emotion2vec/emotion2vec_plus_large", "emotion2vec_plus_large"),
        ("Emotion2Vec/Emotion2Vec_Plus_Large", "emotion2vec_plus_large"),
        ("IIC/EMOTION2VEC_PLUS_BASE", "emotion2vec_plus_base"),
        ("emotion2vec_plus_base", "emotion2vec_plus_base"),
        ("emotion2vec/emotion2vec_plus_base", "emotion2vec_plus_base"),
        ("emotion2vec_plus_seed", "emotion2vec_plus_seed"),
        ("iic/emotion2vec_plus_seed", "emotion2vec_plus_seed"),
        ("emotion2vec/emotion2vec_plus_seed", "emotion2vec_plus_seed"),
        ("emotion2vec_plus_huge", None),
        ("someone/emotion2vec_plus_large", None),
        ("iic/emotion2vec_base", None),
        ("emotion2vec_plus", None),
        ("", None),
    ],
)
def test_canonical_name(name: str, expected: str | None) -> None:
    assert hub.canonical_name(name) == expected


def test_known_models_cover_both_hubs() -> None:
    assert DEFAULT_MODEL in hub.KNOWN_MODELS
    assert hub.KNOWN_MODELS["emotion2vec_plus_base"] == hub.HubIds(
        hf="emotion2vec/emotion2vec_plus_base", ms="iic/emotion2vec_plus_base"
    )


def test_sha256_file_streams_past_one_chunk(tmp_path: Path) -> None:
    data = bytes(range(256)) * (5 * HASH_CHUNK_BYTES // 512)  # 2.5 chunks
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f") == hashlib.sha256(data).hexdigest()


def test_hf_download_gives_the_four_files_and_nothing_else(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeHf(monkeypatch)
    dest = tmp_path / "models" / "large"
    assert hub.download("iic/emotion2vec_plus_large", dest, hub="hf", progress=False) == dest
    assert_model_dir(dest)
    assert list((tmp_path / "models").iterdir()) == [dest]  # no temp dir left beside it
    assert [d["filename"] for d in fake.downloads] == list(MODEL_FILES)
    assert {d["repo_id"] for d in fake.downloads} == {"emotion2vec/emotion2vec_plus_large"}
    # pinned to the commit whose hash was read, so a push in between cannot mix revisions
    assert {d["revision"] for d in fake.downloads} == {COMMIT}


def test_progress_false_silences_hf_bars_only_during_the_download(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the environment variable would override the programmatic switch this test is about
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_PROGRESS_BARS", None)
    # the attribute `huggingface_hub.utils.tqdm` is the class, so the module is fetched by name
    monkeypatch.setattr(
        importlib.import_module("huggingface_hub.utils.tqdm"), "HF_HUB_DISABLE_PROGRESS_BARS", None
    )
    fake = FakeHf(monkeypatch)
    hub.download("emotion2vec_plus_seed", tmp_path / "a", hub="hf", progress=True)
    hub.download("emotion2vec_plus_seed", tmp_path / "b", hub="hf", progress=False)
    assert fake.bars_disabled == [False] * 4 + [True] * 4
    assert not are_progress_bars_disabled("huggingface_hub.http_get")


def test_sha_mismatch_deletes_everything(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    FakeHf(monkeypatch, sha256="0" * 64)
    dest = tmp_path / "large"
    with pytest.raises(HubError) as err:
        hub.download("emotion2vec_plus_large", dest, hub="hf", progress=False)
    message = str(err.value)
    assert "model.pt" in message
    assert GOOD_SHA in message
    assert "0" * 64 in message
    assert list(tmp_path.iterdir()) == []  # neither dest nor the temporary directory


def test_missing_hash_warns_and_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    FakeHf(monkeypatch, sha256=None)
    with caplog.at_level(logging.WARNING, logger="emoserve.model.hub"):
        hub.download("emotion2vec_plus_large", tmp_path / "large", hub="hf", progress=False)
    assert_model_dir(tmp_path / "large")
    assert any("no sha256" in r.getMessage() and "model.pt" in r.getMessage() for r in caplog.records)


def test_auto_falls_back_to_modelscope(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hf_down(monkeypatch)
    asked = fake_ms(monkeypatch)
    dest = tmp_path / "base"
    hub.download("emotion2vec_plus_base", dest, progress=False)
    assert asked == ["iic/emotion2vec_plus_base"]
    assert_model_dir(dest)
    assert list(tmp_path.iterdir()) == [dest]


def test_auto_reports_both_reasons(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_modelscope: None
) -> None:
    hf_down(monkeypatch)
    with pytest.raises(HubError) as err:
        hub.download("emotion2vec_plus_large", tmp_path / "large", progress=False)
    message = str(err.value)
    assert "Hugging Face (emotion2vec/emotion2vec_plus_large): ConnectionError: hf.co unreachable" in message
    assert "ModelScope (iic/emotion2vec_plus_large)" in message
    assert "pip install 'modelscope>=1.38'" in message
    assert "--model DIR" in message
    assert list(tmp_path.iterdir()) == []


def test_missing_modelscope_gives_install_hint(tmp_path: Path, no_modelscope: None) -> None:
    with pytest.raises(HubError, match=r"pip install 'modelscope>=1.38'"):
        hub.download("emotion2vec_plus_large", tmp_path / "large", hub="ms", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_a_file_missing_on_the_hub_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_ms(monkeypatch, names=("config.yaml", "model.pt", "configuration.json"))
    with pytest.raises(HubError, match=r"tokens\.txt"):
        hub.download("emotion2vec_plus_large", tmp_path / "large", hub="ms", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_unknown_model_lists_known_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeHf(monkeypatch)
    with pytest.raises(HubError) as err:
        hub.download("emotion2vec_base", tmp_path / "x", hub="hf")
    for name in hub.KNOWN_MODELS:
        assert name in str(err.value)
    assert fake.downloads == []
    assert list(tmp_path.iterdir()) == []


def test_an_earlier_copy_is_replaced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    FakeHf(monkeypatch)
    dest = tmp_path / "large"
    dest.mkdir()
    (dest / "model.pt").write_bytes(b"truncated")
    hub.download("emotion2vec_plus_large", dest, hub="hf", progress=False)
    assert_model_dir(dest)
    assert list(tmp_path.iterdir()) == [dest]


def test_a_foreign_directory_is_never_touched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeHf(monkeypatch)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(HubError, match="not a model directory"):
        hub.download("emotion2vec_plus_large", tmp_path, hub="hf", progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
    assert fake.downloads == []
