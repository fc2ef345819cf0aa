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


# -- the CUDA formulation (model/network.py `lean_path`), run on the CPU --------------------------------
# The condition is the only thing patched: the mask, the bias cache and the LayerNorm in the activation dtype
# are the same tensor operations a GPU runs, here on CPU kernels.


def padded_keys(batch: int, frames: int, seed: int) -> torch.Tensor:
    """(batch, frames) True past each item's length; item 0 is full length."""
    lengths = torch.randint(1, frames + 1, (batch,), generator=torch.Generator().manual_seed(seed))
    lengths[0] = frames
    return torch.arange(frames)[None, :] >= lengths[:, None]


@pytest.mark.parametrize("frames", [1, 7, 13, 49, 64, 250])
@pytest.mark.parametrize("batch", [1, 3])
def test_cuda_mask_equals_the_onnx_mask(tiny: Emotion2vec, frames: int, batch: int) -> None:
    padded = padded_keys(batch, frames, seed=frames)
    with torch.inference_mode():
        old = tiny.attention_mask(frames, padded)
        new = tiny.cuda_attention_mask(frames, padded, torch.float32)
    assert new.shape == old.shape == (batch, tiny.config.num_alibi_heads, frames + 10, frames + 10)
    assert torch.equal(torch.isinf(new), torch.isinf(old))
    # -|i - j| * slope * scale, the same float32 factors in another order: within float32 rounding
    np.testing.assert_allclose(new.numpy(), old.numpy(), rtol=4 * 2**-24, atol=0)


@pytest.mark.parametrize("frames", [7, 49, 250])
def test_cuda_mask_is_aligned_for_the_memory_efficient_kernel(tiny: Emotion2vec, frames: int) -> None:
    """What `preprocess_mask` (aten/src/ATen/native/transformers/cuda/attention.cu) checks before it pads a
    copy: every stride but the last a multiple of 8 elements, the last 1."""
    with torch.inference_mode():
        mask = tiny.cuda_attention_mask(frames, padded_keys(3, frames, seed=1), torch.float16)
    assert mask.dtype == torch.float16
    assert all(stride % 8 == 0 for stride in mask.stride()[:-1]) and mask.stride(-1) == 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_mask_in_half_precision_rounds_the_float32_bias_once(
    tiny: Emotion2vec, dtype: torch.dtype
) -> None:
    padded = padded_keys(2, 120, seed=2)
    with torch.inference_mode():
        want = tiny.attention_mask(120, padded).to(dtype).float()
        got = tiny.cuda_attention_mask(120, padded, dtype).float()
    finite = torch.isfinite(want)
    assert torch.equal(finite, torch.isfinite(got))
    ulp = torch.finfo(dtype).eps  # a product one float32 ulp apart may round to the next value
    np.testing.assert_allclose(got[finite].numpy(), want[finite].numpy(), rtol=ulp, atol=0)


def test_bias_is_kept_per_width_and_dropped_when_the_model_moves(tiny: Emotion2vec) -> None:
    with torch.inference_mode():
        first = tiny.alibi_bias(30, torch.float32, torch.device("cpu"))
        assert tiny.alibi_bias(30, torch.float32, torch.device("cpu")) is first
        assert tiny.alibi_bias(31, torch.float32, torch.device("cpu")) is not first
    tiny.to(torch.float32)  # `_apply`: weights may have changed place or dtype
    assert not tiny._bias_cache
    assert tiny._slopes.dtype == torch.float32 and tiny._slopes.tolist() == alibi_slopes(4)


def test_bias_cache_keeps_to_its_budget(tiny: Emotion2vec, monkeypatch: pytest.MonkeyPatch) -> None:
    import emoserve.model.network as network

    monkeypatch.setattr(network, "BIAS_CACHE_BYTES", 200_000)  # (4, 110, 112) float32 is 197,120 bytes
    tiny._bias_cache.clear()
    with torch.inference_mode():
        for frames in (20, 40, 100):
            tiny.alibi_bias(frames + 10, torch.float32, torch.device("cpu"))
        tiny.alibi_bias(500, torch.float32, torch.device("cpu"))  # larger than the budget: not kept
    assert [key[0] for key in tiny._bias_cache] == [110]
    tiny._bias_cache.clear()


def test_slopes_follow_the_model_built_on_the_meta_device() -> None:
    """As `load_entry` builds it: on the meta device, weights assigned, then `.to(device, dtype)`."""
    from emoserve.model.checkpoint import meta_model

    config, _, state = read_published(FIXTURE / "model")
    model = meta_model(config)
    model.load_state_dict(state, strict=True, assign=True)
    model.to(device="cpu", dtype=torch.float16)
    assert model._slopes.device.type == "cpu"
    assert model._slopes.dtype == torch.float32  # .to(float16) would have rounded slopes like 2**-0.5
    assert model._slopes.tolist() == alibi_slopes(config.num_alibi_heads)


@pytest.fixture
def cuda_formulation(monkeypatch: pytest.MonkeyPatch) -> None:
    import emoserve.model.network as network

    monkeypatch.setattr(network, "lean_path", lambda x: True)


@pytest.mark.parametrize("clip", ["en_1s_16k.wav", "zh_3s_16k.wav"])
def test_cuda_formulation_gives_the_cpu_outputs(tiny: Emotion2vec, clip: str, cuda_formulation: None) -> None:
    waves = torch.from_numpy(wave(clip))[None].repeat(2, 1)
    lengths = torch.tensor([waves.shape[1], waves.shape[1] * 2 // 3])
    with torch.inference_mode():
        got = tiny.outputs(waves, lengths)
    import emoserve.model.network as network

    network.lean_path = lambda x: False  # type: ignore[assignment]  # the fixture's patch restores it
    with torch.inference_mode():
        want = tiny.outputs(waves, lengths)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g.numpy(), w.numpy(), atol=STAGE_TOL, rtol=0)


def test_bfloat16_forward_stays_near_float32(cuda_formulation: None) -> None:
    """The half-precision lines (bias and LayerNorm in the activation dtype, pooling summed in float32) on
    the CPU's bfloat16 kernels: loose, as bfloat16 keeps 8 bits. Not the GPU's kernels (review B4)."""
    config, _, state = read_published(FIXTURE / "model")
    model = Emotion2vec(config)
    model.load_state_dict(state)
    waves = torch.from_numpy(wave("zh_3s_16k.wav"))[None]
    lengths = torch.tensor([waves.shape[1]])
    with torch.inference_mode():
        want = model.eval().outputs(waves, lengths)
        got = model.to(torch.bfloat16).outputs(waves, lengths)
    assert got[1].dtype == torch.float32 and torch.isfinite(got[1]).all()
    scale = float(want[1].abs().max())
    assert float((got[1] - want[1]).abs().max()) < 0.05 * scale
    assert float((got[0] - want[0]).abs().max()) < 0.05 * max(1.0, float(want[0].abs().max()))


def test_utterance_outputs_are_outputs_without_the_frames(tiny: Emotion2vec) -> None:
    waves = torch.from_numpy(wave("en_1s_16k.wav"))[None]
    lengths = torch.tensor([waves.shape[1]])
    with torch.inference_mode():
        full = tiny.outputs(waves, lengths)
        short = tiny.utterance_outputs(waves, lengths)
    for got, want in zip(short, (full[0], full[1], full[4]), strict=True):
        assert torch.equal(got, want)
