"""Which learner earns a regression head's place: cross-validated CCC (by group, as `train-head` splits)
of candidate scikit-learn regressors on synthetic embeddings whose truth is known, against the baseline
of ridge regression at scikit-learn's default strength, measured in the same run.

    python benchmarks/regression_heads.py [--preset tiny|base|large] [--quick]

The data: embeddings with a low-rank structure (as real ones have: a few directions carry most of the
variance) in the preset's width, speakers that shift every embedding of theirs, and arousal/valence on a
1..7 scale. Three truths: `linear` (a linear function of two embedding directions plus noise), `nonlinear`
(the same directions through a tanh and a product), `small` (linear, 120 rows). Candidates: ridge with
alpha=1 (baseline), RidgeCV (the strength chosen per target inside each training fold; the default),
MLPRegressor (one hidden layer; exportable to the numpy head), and SVR with an RBF kernel (not exportable
to a head's arrays: measured only to see what a non-linear learner would buy).
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable
from typing import Any

import numpy as np

WIDTHS = {"tiny": 64, "base": 768, "large": 1024}


def make_data(rows: int, dim: int, truth: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    groups = [f"spk{i % 20}" for i in range(rows)]
    speaker_shift = rng.normal(0, 0.5, size=(20, dim))
    latent = rng.normal(size=(rows, 12))
    x = (
        latent @ rng.normal(size=(12, dim))
        + speaker_shift[np.arange(rows) % 20]
        + rng.normal(size=(rows, dim))
    )
    a, v = latent[:, 0], latent[:, 1]
    if truth == "nonlinear":
        a, v = np.tanh(1.5 * a) + 0.3 * a * v, np.tanh(v) - 0.4 * a**2
    y = np.stack([a, v], axis=1)
    y = (y - y.mean(axis=0)) / y.std(axis=0)
    y = 4.0 + y + 0.35 * rng.normal(size=y.shape)
    return x, y, groups


def candidates(seed: int) -> dict[str, Callable[[], Any]]:
    from sklearn.linear_model import Ridge, RidgeCV
    from sklearn.multioutput import MultiOutputRegressor
    from sklearn.neural_network import MLPRegressor
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVR

    from emoserve.inference.training import RIDGE_ALPHAS

    return {
        "ridge alpha=1 (baseline)": lambda: make_pipeline(StandardScaler(), Ridge(alpha=1.0)),
        "RidgeCV (default)": lambda: make_pipeline(
            StandardScaler(), RidgeCV(alphas=RIDGE_ALPHAS, alpha_per_target=True)
        ),
        "MLP 256": lambda: make_pipeline(
            StandardScaler(),
            MLPRegressor(hidden_layer_sizes=(256,), alpha=1e-3, max_iter=1000, random_state=seed),
        ),
        "SVR rbf (not exportable)": lambda: make_pipeline(StandardScaler(), MultiOutputRegressor(SVR(C=3.0))),
    }


def cross_validated(
    make: Callable[[], Any], x: np.ndarray, y: np.ndarray, groups: list[str]
) -> tuple[list[float], float]:
    """CCC per target of held-out predictions (group 5-fold, as train-head with 20 speakers), and seconds."""
    from emoserve.inference.evaluation import dimension_figures
    from emoserve.inference.training import Labelled, TrainOptions, regression_splits

    labelled = Labelled(x, [""] * len(y), list(groups), [""] * len(y), [], 0, y, ("arousal", "valence"))
    _, pairs = regression_splits(labelled, TrainOptions())
    predicted = np.empty_like(y)
    started = time.perf_counter()
    for train, test in pairs:
        predicted[test] = make().fit(x[train], y[train]).predict(x[test])
    seconds = time.perf_counter() - started
    return [dimension_figures(y[:, j], predicted[:, j])["ccc"] for j in range(y.shape[1])], seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=WIDTHS, default="base")
    parser.add_argument("--quick", action="store_true", help="fewer rows (a smoke run)")
    args = parser.parse_args()
    dim = WIDTHS[args.preset]
    rows = 200 if args.quick else 600
    print(
        f"{platform.processor() or platform.machine()}, {dim}-d embeddings, {rows} rows (small: 120), "
        "20 speakers"
    )
    for truth, n in (("linear", rows), ("nonlinear", rows), ("small", 120)):
        x, y, groups = make_data(n, dim, "linear" if truth == "small" else truth)
        baseline = None
        for name, make in candidates(0).items():
            if args.quick and name.startswith("MLP"):
                continue  # the smoke run keeps to the fast ones
            ccc, seconds = cross_validated(make, x, y, groups)
            mean = float(np.mean(ccc))
            baseline = baseline if baseline is not None else mean
            print(
                f"{truth:<10} {name:<26} CCC arousal {ccc[0]:.3f} valence {ccc[1]:.3f}  "
                f"mean CCC / ridge(alpha=1) {mean / baseline:.3f}  fit+predict {seconds:.2f} s"
            )


if __name__ == "__main__":
    main()
