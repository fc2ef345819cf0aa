"""Export the network to ONNX for the onnx backend: at conversion time, from our own model (torch).

    our model -> torch.onnx.export (dynamo; dynamic batch and time axes)
              -> int8 only: quantize_dynamic of the weight matmuls
              -> optimised for ONNX Runtime's CPU provider and saved that way (sessions then load with
                 optimisation off), weights in an external file that ORT memory-maps
              -> checked against the torch path on generated clips, padded batches included
              -> moved into the entry (weights first, graph next; the manifest records it last)

A failed export or check never fails a conversion: the entry records the error and the torch backend
runs it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from emoserve.constants import FALSE_WORDS, SAMPLE_RATE
from emoserve.errors import ExportError
from emoserve.model.interface import INPUTS, OUTPUTS, open_session, pad, softmax, speech_like
from emoserve.model.network import Emotion2vec
from emoserve.system import physical_cores

log = logging.getLogger(__name__)

ONNX_FILES = {"float32": "model.onnx", "int8": "model.int8.onnx"}
# what the float32 graph must meet against torch, as the fixture tests hold both backends to
SCORE_TOL = 1e-5
EMBEDDING_TOL = 1e-4  # times the largest embedding value when that is above 1


def export_enabled() -> bool:
    """`EMOSERVE_EXPORT_ONNX=0` converts without the ONNX graph (the torch backend only)."""
    return os.environ.get("EMOSERVE_EXPORT_ONNX", "1").strip().lower() not in FALSE_WORDS


def onnx_record(model: Emotion2vec, dest: Path, dtype: str = "float32") -> dict[str, Any]:
    """Write the `dtype` graph into the directory `dest`; its manifest record (or the error's)."""
    try:
        return write_onnx(model, dest, dtype)
    except Exception as err:
        reason = f"{type(err).__name__}: {err}".splitlines()[0][:400]
        log.warning("ONNX export (%s) failed, the torch backend will run this model: %s", dtype, reason)
        return {"error": reason}


def write_onnx(model: Emotion2vec, dest: Path, dtype: str = "float32") -> dict[str, Any]:
    if dtype not in ONNX_FILES:
        raise ValueError(f"no ONNX graph for dtype {dtype!r}; choose from {', '.join(ONNX_FILES)}")
    import onnxruntime

    started = time.perf_counter()
    name = ONNX_FILES[dtype]
    with tempfile.TemporaryDirectory(prefix=".onnx-", dir=dest) as tmp:
        work = Path(tmp)
        graph = export(model, work / "exported.onnx")
        if dtype == "int8":
            graph = quantize(graph, work / "quantized.onnx")
        optimise(graph, work / name)
        check = parity(model, work / name, dtype)
        for file in (f"{name}.data", name):  # the graph last: it is what readers look for
            os.replace(work / file, dest / file)
    return {
        "file": name,
        "data": f"{name}.data",
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "seconds": round(time.perf_counter() - started, 1),
        "parity": check,
    }


class _Graph(torch.nn.Module):
    def __init__(self, model: Emotion2vec) -> None:
        super().__init__()
        self.model = model

    def forward(self, waves: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.model.outputs(waves, lengths))


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter warns about things that do not concern us (torchvision ops, deprecations)."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnx_ir", "onnxscript")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def export(model: Emotion2vec, path: Path) -> Path:
    lengths = torch.tensor([SAMPLE_RATE, SAMPLE_RATE * 3 // 4])
    waves = torch.from_numpy(speech_like(np.random.default_rng(0), SAMPLE_RATE))[None].repeat(2, 1)
    batch, samples = torch.export.Dim("batch", min=1), torch.export.Dim("samples", min=400)
    with _quiet_exporter():
        program = torch.onnx.export(
            _Graph(model.float().cpu().eval()),
            (waves, lengths),
            dynamo=True,
            input_names=list(INPUTS),
            output_names=list(OUTPUTS),
            dynamic_shapes={"waves": {0: batch, 1: samples}, "lengths": {0: batch}},
            optimize=True,
            verbose=False,
        )
        if program is None:
            raise ExportError("torch.onnx.export returned no program")
        program.save(str(path), external_data=True)
    return path


def quantize(graph: Path, out: Path) -> Path:
    """int8 weights for the MatMul/Gemm nodes that multiply by a weight (activations are quantized at
    run time); attention's activation-by-activation products stay float32."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    proto = onnx.load(str(graph))
    del proto.graph.value_info[:]  # the exporter's shape annotations make the quantizer fail
    weights = {init.name for init in proto.graph.initializer}
    nodes = [
        node.name
        for node in proto.graph.node
        if node.op_type in ("MatMul", "Gemm") and any(i in weights for i in node.input)
    ]
    if not nodes:
        raise ExportError("no weight MatMul/Gemm node to quantize in the exported graph")
    stripped = out.with_name("stripped.onnx")
    onnx.save(proto, str(stripped), save_as_external_data=True, location="stripped.onnx.data")
    del proto
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer logs advice on the root logger (pre-processing)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_dynamic(
                str(stripped),
                str(out),
                op_types_to_quantize=["MatMul", "Gemm"],
                nodes_to_quantize=nodes,
                weight_type=QuantType.QInt8,
                use_external_data_format=True,
            )
    finally:
        root.setLevel(level)
    return out


def optimise(graph: Path, out: Path) -> None:
    """Run ORT's extended (CPU provider) optimisations once and save the result beside its weights."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(out)
    options.log_severity_level = 3
    options.add_session_config_entry(
        "session.optimized_model_external_initializers_file_name", f"{out.name}.data"
    )
    options.add_session_config_entry(
        "session.optimized_model_external_initializers_min_size_in_bytes", "1024"
    )
    open_session(graph, physical_cores(), options=options)
    if not out.is_file():
        raise ExportError("ONNX Runtime did not write the optimised graph")


def parity(model: Emotion2vec, graph: Path, dtype: str) -> dict[str, float]:
    """Largest differences from the torch path on generated clips, alone and as a padded batch.

    float32 must meet SCORE_TOL and EMBEDDING_TOL; int8 is reported, and only non-finite outputs fail it."""
    session = open_session(graph, physical_cores())
    rng = np.random.default_rng(1)
    worst = {"scores": 0.0, "frame_scores": 0.0, "embeddings": 0.0}
    scale = 1.0
    for seconds in ([1.0], [2.0, 1.3]):
        clips = [speech_like(rng, int(s * SAMPLE_RATE)) for s in seconds]
        waves, lengths = pad(clips)
        with torch.inference_mode():
            want = [t.numpy() for t in model.outputs(torch.from_numpy(waves), torch.from_numpy(lengths))]
        got = dict(
            zip(
                OUTPUTS,
                session.run(list(OUTPUTS), dict(zip(INPUTS, (waves, lengths), strict=True))),
                strict=True,
            )
        )
        ref = dict(zip(OUTPUTS, want, strict=True))
        if not all(np.isfinite(v).all() for v in got.values()):
            raise ExportError(f"the {dtype} ONNX graph gives non-finite outputs")
        if not np.array_equal(got["frame_lengths"], ref["frame_lengths"]):
            raise ExportError(f"frame counts differ: {got['frame_lengths']} vs torch {ref['frame_lengths']}")
        for i, n in enumerate(ref["frame_lengths"]):
            pairs = {
                "scores": (softmax(got["logits"][i]), softmax(ref["logits"][i])),
                "frame_scores": (softmax(got["frame_logits"][i, :n]), softmax(ref["frame_logits"][i, :n])),
                "embeddings": (got["frames"][i, :n], ref["frames"][i, :n]),
            }
            for key, (a, b) in pairs.items():
                worst[key] = max(worst[key], float(np.abs(a - b).max()))
            worst["embeddings"] = max(
                worst["embeddings"], float(np.abs(got["pooled"][i] - ref["pooled"][i]).max())
            )
            scale = max(scale, float(np.abs(ref["frames"][i, :n]).max()))
    if dtype == "float32":
        score_diff = max(worst["scores"], worst["frame_scores"])
        if score_diff > SCORE_TOL or worst["embeddings"] > EMBEDDING_TOL * scale:
            raise ExportError(
                f"the ONNX graph differs from torch by {score_diff:.3g} in scores (tolerance {SCORE_TOL}) "
                f"and {worst['embeddings']:.3g} in embeddings (tolerance {EMBEDDING_TOL * scale:.3g})"
            )
    return {key: float(f"{value:.3g}") for key, value in worst.items()}
