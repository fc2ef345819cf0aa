"""Settings: defaults, EMOSERVE_* variables, flags over variables, errors that name the key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from emoserve.cli import main, parser
from emoserve.errors import SettingsError
from emoserve.serving.settings import CPU_MAX_AUDIO_S, GPU_MAX_AUDIO_S, Settings, load_settings, setting_infos


def from_flags(*argv: str, environ: dict[str, str] | None = None) -> Settings:
    args = parser().parse_args(["serve", *argv])
    return load_settings(vars(args), environ or {})


def test_defaults_listen_on_localhost_without_a_key() -> None:
    s = load_settings(environ={})
    assert (s.host, s.port, s.api_key, s.model) == ("127.0.0.1", 7860, None, None)
    assert s.ui and not s.stay_up
    assert s.max_upload_bytes == 50_000_000
    assert s.effective_max_audio_s("cpu") == CPU_MAX_AUDIO_S == 60
    assert s.effective_max_audio_s("cuda") == GPU_MAX_AUDIO_S


def test_environment_variables_are_read_and_parsed() -> None:
    s = load_settings(
        environ={
            "EMOSERVE_MAX_BATCH_SIZE": "16",
            "EMOSERVE_MAX_WAIT_MS": "2.5",
            "EMOSERVE_UI": "false",
            "EMOSERVE_STAY_UP": "yes",
            "EMOSERVE_WARMUP_BATCH_SIZES": "1, 2,8",
            "EMOSERVE_API_KEY": "",  # empty: no key
            "EMOSERVE_MAX_AUDIO_S": "30",
            "EMOSERVE_OUTPUTS_DIR": "/tmp/out",
            "EMOSERVE_HOME": "/somewhere",  # not a setting (the model cache): ignored here
        }
    )
    assert (s.max_batch_size, s.max_wait_ms, s.ui, s.stay_up) == (16, 2.5, False, True)
    assert s.warmup_batch_sizes == (1, 2, 8)
    assert s.api_key is None
    assert s.effective_max_audio_s("cuda") == 30
    assert s.outputs_dir == Path("/tmp/out")


def test_flags_win_over_environment_variables() -> None:
    environ = {"EMOSERVE_PORT": "9000", "EMOSERVE_UI": "true", "EMOSERVE_HOST": "0.0.0.0"}
    s = from_flags("--port", "9100", "--no-ui", "--api-key", "k", environ=environ)
    assert (s.port, s.ui, s.api_key, s.host) == (9100, False, "k", "0.0.0.0")


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"EMOSERVE_MAX_BATCH_SIZE": "x"}, "EMOSERVE_MAX_BATCH_SIZE: 'x' is not an integer"),
        (
            {"EMOSERVE_MAX_BATCH_SIZE": "0"},
            "EMOSERVE_MAX_BATCH_SIZE: 0 is out of range; it must be at least 1",
        ),
        ({"EMOSERVE_PORT": "70000"}, "EMOSERVE_PORT: 70000 is out of range"),
        ({"EMOSERVE_MAX_UPLOAD_MB": "nan"}, "EMOSERVE_MAX_UPLOAD_MB: 'nan' is not a finite number"),
        ({"EMOSERVE_MAX_AUDIO_S": "-1"}, "EMOSERVE_MAX_AUDIO_S: -1.0 is out of range; it must be positive"),
        ({"EMOSERVE_UI": "maybe"}, "EMOSERVE_UI: 'maybe' is not a boolean"),
        ({"EMOSERVE_DTYPE": "float64"}, "EMOSERVE_DTYPE: 'float64' is not one of float32, float16, bfloat16"),
        ({"EMOSERVE_WARMUP_BATCH_SIZES": "1,0"}, "EMOSERVE_WARMUP_BATCH_SIZES: (1, 0) holds a size below 1"),
    ],
)
def test_a_bad_variable_fails_naming_it(environ: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(environ=environ)
    assert str(caught.value).startswith(message)


def test_a_bad_flag_fails_naming_the_flag() -> None:
    with pytest.raises(SettingsError, match=r"^--max-queue: 'many' is not an integer"):
        from_flags("--max-queue", "many")


def test_serve_with_a_bad_value_exits_2_with_the_key(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--max-batch-size", "x"]) == 2
    assert "error: --max-batch-size: 'x' is not an integer" in capsys.readouterr().err


def test_settings_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        load_settings(environ={}).port = 1  # type: ignore[misc]


def test_every_setting_has_a_flag_and_a_variable(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    help_text = capsys.readouterr().out
    infos = list(setting_infos())
    assert {i.name for i in infos} == {f.name for f in dataclasses.fields(Settings)}
    for info in infos:
        assert info.env == "EMOSERVE_" + info.name.upper()
        # a repeatable flag is named in the singular: --head NAME=DIR, EMOSERVE_HEADS
        singular = "--" + info.name.replace("_", "-").removesuffix("s")
        assert info.flag == ("--" + info.name.replace("_", "-") if not info.repeatable else singular)
        assert info.flag in help_text and info.env in help_text


def test_warm_up_batch_sizes_are_capped_at_the_batch_size() -> None:
    s = load_settings(environ={"EMOSERVE_MAX_BATCH_SIZE": "2", "EMOSERVE_WARMUP_BATCH_SIZES": "1,4,8"})
    assert s.effective_warmup_batch_sizes("cpu") == s.effective_warmup_batch_sizes("cuda") == (1, 2)


def test_warm_up_batch_sizes_default_by_hardware() -> None:
    s = load_settings(environ={"EMOSERVE_MAX_BATCH_SIZE": "4"})
    assert s.effective_warmup_batch_sizes("cpu") == (1,)
    assert s.effective_warmup_batch_sizes("cuda") == (1, 2, 4)
