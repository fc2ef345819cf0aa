"""The network against the fixture's layer-by-layer activations, and its config parsing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

from emoserve.errors import ConfigError
from emoserve.model.checkpoint import read_published
from emoserve.model.config import PRESETS, ModelConfig, parse_conv_spec
from emoserve.model.network import Emotion2vec, alibi_slopes, normalize_waveform
from tests.support.paths import FIXTURE
from tests.support.reference import wave

# float32 activations of a different but equivalent computation order; the end-to-end scores
# are held to the README's tighter 1e-5 in test_recognizer.
STAGE_TOL = 5e-5


@pytest.fixture(scope="module")
def tiny() -> Emotion2vec:
    config, _, state = read_published(FIXTURE / "model")
    model = Emotion2vec(config)
    model.load_state_dict(state)
    return model.eval()


@pytest.mark.parametrize("clip", ["en_1s_16k.wav", "zh_3s_16k.wav"])
def test_each_stage_matches_reference(tiny: Emotion2vec, clip: str) -> None:
    ref = np.load(FIXTURE / "intermediates" / f"{clip}.npz")
    x = torch.from_numpy(wave(clip))[None]
    lengths = torch.tensor([x.shape[1]])
    extra = tiny.config.num_extra_tokens

    def close(got: torch.Tensor, name: str) -> None:
        want = ref[name]
        assert got.shape == want.shape, name
        np.testing.assert_allclose(got.numpy(), want, atol=STAGE_TOL, rtol=0, err_msg=name)

    with torch.inference_mode():
        x = normalize_waveform(x, lengths, 1e-5)
        close(x, "_model_input_after_layernorm")
        x = tiny.encode_frames(x)
        close(x, "local_encoder")
        padded = torch.zeros(1, x.shape[-1], dtype=torch.bool)
        x = tiny.project(tiny.project_norm(x.transpose(1, 2)))
        close(x, "project_features")
        pos = tiny.positional(x, padded)
        close(pos, "relative_positional_encoder")
        x = torch.cat([tiny.extra_tokens, x + pos], dim=1)
        mask = tiny.attention_mask(x.shape[1] - extra, padded)
        x = tiny.prenet_norm(x)
        for i, block in enumerate(tiny.prenet):
            x = block(x, mask)
            close(x, f"context_encoder.blocks.{i}")
        close(x, "context_encoder")
        for i, block in enumerate(tiny.blocks):
            x = block(x, mask)
            close(x, f"blocks.{i}")
        whole = tiny(torch.from_numpy(wave(clip))[None], lengths)
    np.testing.assert_allclose(
        whole.frames.numpy(), ref[f"blocks.{len(tiny.blocks) - 1}"][:, extra:], atol=STAGE_TOL
    )


def test_frame_count_rule() -> None:
    config = PRESETS["large"]
    # spec section 4 step 3: 0.3 s -> 14 frames, 1 s -> 49, 5 s -> 249; one frame needs 400 samples
    assert [config.num_frames(n) for n in (4800, 16000, 80000, 400, 399)] == [14, 49, 249, 1, 0]
    assert (config.frame_hop, config.receptive_field) == (320, 400)


def test_alibi_slopes_follow_the_paper() -> None:
    assert alibi_slopes(4) == [2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8]
    twelve = alibi_slopes(12)  # 8 + the even entries of the 16-head slopes
    assert twelve[:8] == alibi_slopes(8)
    assert twelve[8:] == alibi_slopes(16)[0::2][:4]


def test_conv_spec_is_parsed_without_eval() -> None:
    assert (
        parse_conv_spec("[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512,2,2)] + [(512,2,2)]")
        == PRESETS["large"].conv_layers
    )
    with pytest.raises(ConfigError, match="unsupported expression"):
        parse_conv_spec("__import__('os').system('true')")
    with pytest.raises(ConfigError, match="channels, kernel, stride"):
        parse_conv_spec("[(512, 10)]")


def test_config_from_published_yaml_ignores_training_keys() -> None:
    raw = yaml.safe_load((FIXTURE / "model" / "config.yaml").read_text())
    config = ModelConfig.from_yaml_dict(raw)
    assert config == PRESETS["tiny"]
    assert ModelConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("model_conf", "layer_norm_first"), True, "layer_norm_first is True"),
        (("model_conf", "modalities", "audio", "conv_pos_pre_ln"), True, "conv_pos_pre_ln"),
    ],
)
def test_unsupported_variants_are_refused(path: tuple[str, ...], value: object, message: str) -> None:
    raw = yaml.safe_load((FIXTURE / "model" / "config.yaml").read_text())
    node = raw
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_yaml_dict(raw)


def test_missing_config_key_is_named() -> None:
    raw = yaml.safe_load((FIXTURE / "model" / "config.yaml").read_text())
    del raw["model_conf"]["embed_dim"]
    with pytest.raises(ConfigError, match="embed_dim"):
        ModelConfig.from_yaml_dict(raw)


def test_padding_does_not_leak_into_an_item(tiny: Emotion2vec) -> None:
    """Each spec section 5 leak point, end to end: a clip padded with loud noise equals the clip alone."""
    clip = torch.from_numpy(wave("en_1s_16k.wav"))
    noisy = torch.cat([clip, torch.randn(30_000) * 10])[None]
    with torch.inference_mode():
        alone = tiny(clip[None], torch.tensor([len(clip)]))
        padded = tiny(noisy, torch.tensor([len(clip)]))
    n = int(alone.lengths[0])
    assert int(padded.lengths[0]) == n
    np.testing.assert_allclose(padded.frames[0, :n].numpy(), alone.frames[0].numpy(), atol=1e-5)
    assert not padded.frames[0, n:].any()
