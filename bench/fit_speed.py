"""Benchmark: ridge readouts for many channels on wide features (dual form, nested CV)."""

from __future__ import annotations

import argparse
import time

import numpy as np

from pbv_onnx.method.ridge import DEFAULT_ALPHAS, gram, ridge_cv


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--channels", type=int, default=200)
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--features", type=int, default=100_000)
    ap.add_argument("--folds", type=int, default=5)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    n, d, c = args.images, args.features, args.channels
    # Non-negative, correlated features as after a ReLU; responses a noisy linear map of them.
    X = np.maximum(
        rng.standard_normal((n, 64)).astype(np.float32) @ rng.standard_normal((64, d)).astype(np.float32)
        + rng.standard_normal((n, d)).astype(np.float32),
        0,
    )
    w = rng.standard_normal((c, d)).astype(np.float32) / np.sqrt(d)
    Y = (X @ w.T).astype(np.float64)
    Y += rng.standard_normal(Y.shape) * Y.std(0)
    t0 = time.perf_counter()
    gram(X)
    t1 = time.perf_counter()
    fit = ridge_cv(X, Y, DEFAULT_ALPHAS, folds=args.folds, seed=0)
    t2 = time.perf_counter()
    r = [np.corrcoef(fit.heldout[:, i], Y[:, i])[0, 1] for i in range(c)]
    print(
        f"{c} channels x {n} images x {d} features, {len(DEFAULT_ALPHAS)} penalties, "
        f"{args.folds}-fold nested CV: Gram matrix {t1 - t0:.2f} s, full fit {t2 - t1:.2f} s "
        f"(mean held-out r {np.mean(r):.3f})"
    )


if __name__ == "__main__":
    main()
