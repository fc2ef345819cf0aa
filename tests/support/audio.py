"""Test audio: fixture clips joined with silence into a recording, and files written with PyAV's encoders."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from emoserve.audio.decode import load_audio

from .paths import AUDIO

RATE = 16_000
# clips whose speech has no pause of 300 ms or more inside: one segment each
SPEECH = ("en_3s_8k.wav", "zh_3s_16k.wav", "en_1s_16k.wav", "en_3s_44k_stereo.wav")
GAP_S = 1.5


def clip(name: str) -> np.ndarray:
    return load_audio(AUDIO / name).samples


def joined(
    names: tuple[str, ...], gap_s: float = GAP_S, seed: int = 0
) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """Clips separated by `gap_s` of silence, with low noise everywhere; where each clip lies (seconds)."""
    rng = np.random.default_rng(seed)
    gap = np.zeros(int(gap_s * RATE), np.float32)
    parts, truth, at = [gap], [], len(gap)
    for name in names:
        c = clip(name)
        truth.append((at / RATE, (at + len(c)) / RATE))
        parts += [c, gap]
        at += len(c) + len(gap)
    x = np.concatenate(parts)
    return (x + rng.normal(0, 1e-3, len(x))).astype(np.float32), truth


def encode_with_pyav(
    path: Path, container: str, codec: str, samples: np.ndarray, sample_rate: int, codec_rate: int
) -> None:
    """Write (samples, channels) float32 audio with PyAV's own encoders (no system ffmpeg)."""
    layout = {1: "mono", 2: "stereo"}[samples.shape[1]]
    with av.open(str(path), "w", format=container) as out:
        stream = out.add_stream(codec, rate=codec_rate, layout=layout)
        assert isinstance(stream, av.AudioStream)
        frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="flt", layout=layout)  # packed
        frame.sample_rate = sample_rate
        # Timestamps let the muxer write the encoder delay (mp4 edit list, Opus pre-skip) for the decoder.
        frame.pts, frame.time_base = 0, Fraction(1, sample_rate)
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            out.mux(packet)
