"""Settings: defaults, EMOSERVE_* variables, flags over variables, errors that name the key."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest

from emoserve.cli import main, parser
from emoserve.cli.shared import model_options
from emoserve.errors import SettingsError
from emoserve.inference.options import ModelOptions, Option, option_fields
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
        ({"EMOSERVE_DTYPE": "float64"}, "EMOSERVE_DTYPE: 'float64' is not one of auto, float32"),
        ({"EMOSERVE_WARMUP_BATCH_SIZES": "1,0"}, "EMOSERVE_WARMUP_BATCH_SIZES: (1, 0) holds a size below 1"),
        ({"EMOSERVE_JOBS_DB": "mysql://db/jobs"}, "EMOSERVE_JOBS_DB: is not a postgresql:// URL"),
        ({"EMOSERVE_JOBS_LEASE_S": "0"}, "EMOSERVE_JOBS_LEASE_S: 0.0 is out of range; it must be positive"),
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


# ------------------------------------------------------- the model options: declared once in ModelOptions

MODEL_COMMANDS = ("predict", "evaluate", "train-head", "stream")


def command_flags(command: str) -> dict[str, argparse.Action]:
    sub = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {flag: action for action in sub.choices[command]._actions for flag in action.option_strings}


def other_value(f: dataclasses.Field[object], option: Option) -> str:
    """A value of the option that is not its default."""
    return next(c for c in option.choices if c != f.default) if option.choices else "7"


def test_each_model_option_is_declared_once_for_settings_and_flags() -> None:
    """ModelOptions' declarations reach the server's settings and every command that loads a model: the
    same default, choices, help and variable."""
    infos = {i.name: i for i in setting_infos()}
    declared = list(option_fields())
    assert {f.name for f, _ in declared} == {"model", "hub", "backend", "device", "dtype", "threads"}
    for f, option in declared:
        info = infos[f.name]
        assert (info.default, info.help, info.env) == (f.default, option.help, f"EMOSERVE_{f.name.upper()}")
        for command in MODEL_COMMANDS:
            flags = command_flags(command)
            if not option.on_commands:
                assert info.flag not in flags
                continue
            action = flags[info.flag]
            assert action.dest == f.name and action.default is None  # None: the variable, else the default
            assert tuple(action.choices or ()) == option.choices
            shown = "" if f.default is None else f"; default {f.default}"
            assert action.help == f"{option.help} [{info.env}{shown}]"
    assert command_flags("predict")["-m"].dest == "model"


@pytest.mark.parametrize("command", MODEL_COMMANDS)
def test_model_flags_over_their_variables_over_the_defaults(
    command: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    argv = [command, "x"] if command != "train-head" else [command, "x", "--out", "h"]
    for f, _ in option_fields():
        monkeypatch.delenv(f"EMOSERVE_{f.name.upper()}", raising=False)
    assert model_options(parser().parse_args(argv)) == ModelOptions()
    for f, option in option_fields():
        if option.on_commands:
            monkeypatch.setenv(f"EMOSERVE_{f.name.upper()}", other_value(f, option))
    from_variables = model_options(parser().parse_args(argv))
    for f, option in option_fields():
        want = other_value(f, option) if option.on_commands else f.default
        assert getattr(from_variables, f.name) == want, f.name
    assert model_options(parser().parse_args([*argv, "--backend", "auto"])).backend == "auto"  # the flag wins


def test_a_bad_model_variable_fails_a_command_naming_it(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EMOSERVE_DTYPE", "float64")
    assert main(["predict", "x.wav"]) == 2
    assert "error: EMOSERVE_DTYPE: 'float64' is not one of auto, float32" in capsys.readouterr().err


def test_the_server_passes_on_every_model_option() -> None:
    environ = {f"EMOSERVE_{f.name.upper()}": other_value(f, o) for f, o in option_fields()}
    options = load_settings(environ=environ).model_options()
    assert options == ModelOptions(**{f.name: other_value(f, o) for f, o in option_fields()} | {"threads": 7})


def test_the_jobs_settings_take_their_flags_and_variables(tmp_path: Path) -> None:
    url = "postgresql://emoserve@db/jobs"
    s = from_flags(
        "--jobs-dir", str(tmp_path), "--allow-private-callbacks", environ={"EMOSERVE_JOBS_DB": url}
    )
    assert (s.jobs_dir, s.jobs_db, s.allow_private_callbacks) == (tmp_path, url, True)
    assert load_settings(environ={}).jobs_db is None and not load_settings(environ={}).allow_private_callbacks
