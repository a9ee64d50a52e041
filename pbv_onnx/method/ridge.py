"""Per-channel ridge readouts in the dual (Gram) form: fitting and nested cross-validation (numpy only).

All channels and all penalties share one eigendecomposition of the centred n x n Gram matrix per
training set, so the cost is one Gram matrix (n^2 D) plus small n^3 solves, whatever D is.
Penalties are scale-free: a relative `alpha` means lambda = alpha * (mean eigenvalue of the
centred Gram matrix of the training images), i.e. alpha * trace(K_c) / n.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from pbv_onnx.runtime.sessions import one_blas_thread

DEFAULT_ALPHAS = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
CHUNK = 8192  # feature columns per Gram-matrix block: bounds float64 temporaries to n x 8192


# -- the numerical core (numpy only) -----------------------------------------------------------

def gram(X: np.ndarray, chunk: int = CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """(K, mu): Gram matrix in float64 of the rows of X [n, D] after subtracting their mean mu.

    Centred kernels are invariant to a common shift of all rows, and subtracting the mean first
    keeps the large shared component of non-negative (ReLU) features out of the products.
    """
    n, d = X.shape
    mu = np.zeros(d)
    for j in range(0, d, chunk):
        mu[j:j + chunk] = X[:, j:j + chunk].mean(0, dtype=np.float64)
    K = np.zeros((n, n))
    for j in range(0, d, chunk):
        B = X[:, j:j + chunk] - mu[j:j + chunk]
        K += B @ B.T
    return K, mu


@dataclass
class _Solver:
    """One training set: eigendecomposition of its centred Gram matrix, shared by all channels
    and penalties."""

    K: np.ndarray        # full Gram matrix (any common centring)
    train: np.ndarray    # indices into K
    Y: np.ndarray        # [n_train, C] targets

    def __post_init__(self):
        Ktt = self.K[np.ix_(self.train, self.train)]
        self.a = Ktt.mean(1)
        self.c = self.a.mean()
        Kc = Ktt - self.a[:, None] - self.a[None, :] + self.c
        s, self.V = np.linalg.eigh((Kc + Kc.T) / 2)
        self.s = np.clip(s, 0.0, None)
        self.scale = self.s.sum() / len(self.train)  # mean eigenvalue
        self.ybar = self.Y.mean(0)
        self.Q = self.V.T @ (self.Y - self.ybar)

    def penalties(self, alphas: np.ndarray) -> np.ndarray:
        scale = self.scale if self.scale > 0 else 1.0  # all training features identical
        return np.asarray(alphas, np.float64) * scale

    def coef(self, lam: np.ndarray) -> np.ndarray:
        """Dual coefficients [n_train, C] with one penalty per channel."""
        return self.V @ (self.Q / (self.s[:, None] + lam[None, :]))

    def predict_all(self, test: np.ndarray, alphas: np.ndarray) -> np.ndarray:
        """Predictions [A, n_test, C] on `test` for every relative penalty."""
        Kte = self.K[np.ix_(test, self.train)]
        Kte_c = Kte - Kte.mean(1)[:, None] - self.a[None, :] + self.c
        P = Kte_c @ self.V
        lam = self.penalties(alphas)
        return np.stack([P @ (self.Q / (self.s + l)[:, None]) for l in lam]) + self.ybar


def make_folds(n: int, k: int, rng: np.random.Generator) -> list[np.ndarray]:
    """k disjoint, shuffled, near-equal folds of range(n)."""
    return [np.sort(f) for f in np.array_split(rng.permutation(n), k)]


def select_alphas(K: np.ndarray, Y: np.ndarray, idx: np.ndarray, alphas: np.ndarray, folds: int,
                  rng: np.random.Generator) -> np.ndarray:
    """Per-channel index of the penalty with the smallest k-fold CV squared error on `idx`."""
    preds = np.empty((len(alphas), len(idx), Y.shape[1]))
    for test in make_folds(len(idx), folds, rng):
        train = np.setdiff1d(np.arange(len(idx)), test)
        preds[:, test] = _Solver(K, idx[train], Y[idx[train]]).predict_all(idx[test], alphas)
    mse = ((preds - Y[idx][None]) ** 2).mean(1)  # [A, C]
    return np.argmin(mse, axis=0)


@dataclass
class RidgeFit:
    weight: np.ndarray      # [C, D] in the raw feature space
    bias: np.ndarray        # [C]
    alpha: np.ndarray       # [C] chosen relative penalty
    penalty: np.ndarray     # [C] the absolute lambda it meant on all preferred images
    heldout: np.ndarray     # [n, C] nested-CV predictions, each from a fit that never saw it


def min_images(folds: int) -> int:
    """Fewest images nested k-fold CV can work with: two per outer test fold."""
    return 2 * folds


def ridge_cv(X: np.ndarray, Y: np.ndarray, alphas: Sequence[float], folds: int = 5, seed: int = 0,
             progress: bool = False) -> RidgeFit:
    """Ridge of every column of Y [n, C] on X [n, D], the penalty chosen per channel by k-fold CV.

    Held-out predictions are nested: for each outer fold the penalty is chosen by an inner k-fold
    CV on the outer training images only, then the model is refit on them and predicts the
    outer test fold. The returned weights come from all images with the penalty chosen by a
    plain k-fold CV over all of them.
    """
    from tqdm import tqdm

    X = np.asarray(X)
    Y = np.asarray(Y, np.float64)
    alphas = np.asarray(sorted(float(a) for a in alphas))
    n = X.shape[0]
    if n < min_images(folds):
        raise ValueError(f"{n} images; {folds}-fold nested CV needs at least {min_images(folds)}")
    K, mu = gram(X)
    rng = np.random.default_rng(seed)
    heldout = np.empty_like(Y)
    everything = np.arange(n)
    outer = make_folds(n, folds, rng)
    # many small n x n eigendecompositions: multithreaded LAPACK is slower on them, and
    # pathologically so on a busy machine
    with one_blas_thread():
        for test in tqdm(outer, desc="nested CV", unit="fold", disable=None if progress else True):
            train = np.setdiff1d(everything, test)
            best = select_alphas(K, Y, train, alphas, folds, rng)
            preds = _Solver(K, train, Y[train]).predict_all(test, alphas)
            heldout[test] = preds[best, :, np.arange(Y.shape[1])].T
        best = select_alphas(K, Y, everything, alphas, folds, rng)
        full = _Solver(K, everything, Y)
    lam = full.penalties(alphas[best])
    coef = full.coef(lam)                        # [n, C]
    # w = Xc^T coef with Xc centred by the training mean; computed blockwise in float64.
    weight = np.empty((Y.shape[1], X.shape[1]))
    for j in range(0, X.shape[1], CHUNK):
        weight[:, j:j + CHUNK] = ((X[:, j:j + CHUNK] - mu[j:j + CHUNK]).T @ coef).T
    bias = full.ybar - weight @ mu
    return RidgeFit(weight=weight, bias=bias, alpha=alphas[best], penalty=lam, heldout=heldout)


