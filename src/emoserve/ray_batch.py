"""Scoring many files on a Ray cluster with Ray Data (the `ray` extra): `emoserve predict PATHS --ray`.

    files (in the CLI's order) -> Ray Data blocks -> map_batches(Scorer, ActorPoolStrategy):
    each actor loads the model once and runs batch.score_outcomes (our own load_audio, the same batching
    and error rows as the local CLI) -> outcomes streamed back in input order (preserve_order) -> the
    CLI's writers and .npy names, exactly as without --ray

Each actor decodes the files itself, so the paths must be readable where the actors run (one machine,
or a shared filesystem on a cluster).
"""

from __future__ import annotations

import logging
import math
import pickle
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import ray
import ray.data

from emoserve.constants import Granularity
from emoserve.inference.corpus import EmbeddingNames, Outcome, save_embedding, score_outcomes
from emoserve.inference.options import ModelOptions
from emoserve.inference.recognizer import load_with

# Files per block handed to an actor: a few model batches, so that length grouping has choice (as the
# local CLI's decode window) and each actor call is long enough to hide Ray's per-call overhead.
BATCHES_PER_BLOCK = 4


class Scorer:
    """A Ray Data actor: one loaded model, whose torch/onnx threads are the CPUs Ray gave the actor."""

    def __init__(self, options: ModelOptions, granularity: Granularity, embedding: bool, batch_size: int):
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
        self.recognizer = load_with(replace(options, threads=max(1, math.floor(cpus))), progress=False)
        self.granularity, self.embedding, self.batch_size = granularity, embedding, batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        files = [str(f) for f in batch["file"]]
        outcomes = score_outcomes(
            self.recognizer,
            files,
            granularity=self.granularity,
            embedding=self.embedding,
            batch_size=self.batch_size,
        )
        # Outcomes (results with their embeddings) cross to the driver pickled: our own objects only
        return {"outcome": np.array([pickle.dumps(o) for o in outcomes], dtype=object)}


def score_files(
    files: Sequence[str],
    options: ModelOptions,
    *,
    granularity: Granularity = "utterance",
    embeddings_dir: Path | None = None,
    batch_size: int = 8,
    actors: int | None = None,
    cpus_per_actor: float = 1.0,
    gpus_per_actor: float = 0.0,
) -> Iterator[Outcome]:
    """batch.score_files on the Ray cluster this process is connected to (`connect` first): outcomes
    in input order, embeddings written here as `<stem>.npy`. `actors` defaults to as many as the
    cluster's CPUs hold (and its GPUs, when each actor takes `gpus_per_actor`)."""
    names = EmbeddingNames(embeddings_dir) if embeddings_dir else None
    if actors is None:
        resources = ray.cluster_resources()
        actors = max(1, math.floor(resources.get("CPU", 1.0) / cpus_per_actor))
        if gpus_per_actor:
            actors = max(1, min(actors, math.floor(resources.get("GPU", 0.0) / gpus_per_actor)))
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # the CLI writes in input order, as it streams
    context.enable_progress_bars = False  # the CLI has its own
    blocks = max(1, math.ceil(len(files) / (batch_size * BATCHES_PER_BLOCK)))
    dataset = ray.data.from_items([{"file": f} for f in files], override_num_blocks=blocks)
    scored = dataset.map_batches(
        Scorer,
        fn_constructor_args=(options, granularity, names is not None, batch_size),
        batch_size=batch_size * BATCHES_PER_BLOCK,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=min(actors, blocks)),  # an idle actor only loads a model
        num_cpus=cpus_per_actor,
        # a GPU share when the actors run on GPUs: an actor that asks for none sees no GPU (Ray empties
        # its CUDA_VISIBLE_DEVICES) and scores on the CPU
        num_gpus=gpus_per_actor or None,
    )
    for row in scored.iter_rows():
        outcome: Outcome = pickle.loads(row["outcome"])
        yield save_embedding(outcome, names)


def connect(address: str | None) -> None:
    """Join the cluster at `address` ("auto": the one `ray start` made here), or start a local one."""
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
