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
        mu[j : j + chunk] = X[:, j : j + chunk].mean(0, dtype=np.float64)
    K = np.zeros((n, n))
    for j in range(0, d, chunk):
        B = X[:, j : j + chunk] - mu[j : j + chunk]
        K += B @ B.T
    return K, mu


@dataclass
class _Solver:
    """One training set: eigendecomposition of its centred Gram matrix, shared by all channels
    and penalties."""

    K: np.ndarray  # full Gram matrix (any common centring)
    train: np.ndarray  # indices into K
    Y: np.ndarray  # [n_train, C] targets

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
        return np.stack([P @ (self.Q / (self.s + one)[:, None]) for one in lam]) + self.ybar


def make_folds(n: int, k: int, rng: np.random.Generator) -> list[np.ndarray]:
    """k disjoint, shuffled, near-equal folds of range(n)."""
    return [np.sort(f) for f in np.array_split(rng.permutation(n), k)]


def group_ids(groups: Sequence) -> np.ndarray:
    """Integer ids 0..G-1 of the labels in `groups`, numbered in order of first appearance."""
    _, first, inverse = np.unique(np.asarray(groups).astype(str), return_index=True, return_inverse=True)
    rank = np.empty(len(first), np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    return rank[inverse.ravel()]


def make_group_folds(groups: Sequence, k: int, rng: np.random.Generator, min_train: int = 1) -> list[np.ndarray]:
    """k disjoint folds of range(len(groups)) that never split a group, each training set (the
    other folds) holding at least `min_train` groups.

    The groups, in a random order, are cut into k contiguous runs whose stimulus counts come
    closest to the ungrouped fold sizes. With one stimulus per group this is exactly
    make_folds(n, k, rng) (the same draws, the same folds).
    """
    g = group_ids(groups)
    n_groups = int(g.max()) + 1 if len(g) else 0
    most = n_groups - min_train  # groups one test fold may hold
    if n_groups < k or most < 1 or k * most < n_groups:
        raise ValueError(f"{n_groups} groups cannot fill {k} folds leaving {min_train} group(s) to train on")
    order = rng.permutation(n_groups)
    cum = np.cumsum(np.bincount(g, minlength=n_groups)[order])
    ends = np.cumsum([len(f) for f in np.array_split(np.arange(len(g)), k)])  # ungrouped fold ends
    cuts = [0]
    for i in range(1, k):
        # every fold holds 1..most groups, so the remaining k - i folds must still fit
        lo = max(cuts[-1] + 1, n_groups - (k - i) * most)
        hi = min(cuts[-1] + most, n_groups - (k - i))
        cand = np.arange(lo, hi + 1)
        cuts.append(int(cand[np.argmin(np.abs(cum[cand - 1] - ends[i - 1]))]))
    cuts.append(n_groups)
    return [np.flatnonzero(np.isin(g, order[a:b])) for a, b in zip(cuts[:-1], cuts[1:])]


def _folds(n: int, k: int, rng: np.random.Generator, groups: np.ndarray | None, min_train: int = 1):
    return make_folds(n, k, rng) if groups is None else make_group_folds(groups, k, rng, min_train)


def select_alphas(
    K: np.ndarray,
    Y: np.ndarray,
    idx: np.ndarray,
    alphas: np.ndarray,
    folds: int,
    rng: np.random.Generator,
    groups: np.ndarray | None = None,
) -> np.ndarray:
    """Per-channel index of the penalty with the smallest k-fold CV squared error on `idx`
    (folds keep each of `groups`, labels of all rows of K, whole)."""
    preds = np.empty((len(alphas), len(idx), Y.shape[1]))
    for test in _folds(len(idx), folds, rng, None if groups is None else groups[idx]):
        train = np.setdiff1d(np.arange(len(idx)), test)
        preds[:, test] = _Solver(K, idx[train], Y[idx[train]]).predict_all(idx[test], alphas)
    mse = ((preds - Y[idx][None]) ** 2).mean(1)  # [A, C]
    return np.argmin(mse, axis=0)


@dataclass
class RidgeFit:
    weight: np.ndarray  # [C, D] in the raw feature space
    bias: np.ndarray  # [C]
    alpha: np.ndarray  # [C] chosen relative penalty
    penalty: np.ndarray  # [C] the absolute lambda it meant on all preferred images
    heldout: np.ndarray  # [n, C] nested-CV predictions, each from a fit that never saw it
    at_edge: np.ndarray  # [C] bool: the chosen penalty is the smallest or largest of a grid of several


def min_images(folds: int) -> int:
    """Fewest images (or groups of images) nested k-fold CV can work with: two per outer test fold."""
    return 2 * folds


def ridge_cv(
    X: np.ndarray,
    Y: np.ndarray,
    alphas: Sequence[float],
    folds: int = 5,
    seed: int = 0,
    progress: bool = False,
    groups: Sequence | None = None,
) -> RidgeFit:
    """Ridge of every column of Y [n, C] on X [n, D], the penalty chosen per channel by k-fold CV.

    Held-out predictions are nested: for each outer fold the penalty is chosen by an inner k-fold
    CV on the outer training images only, then the model is refit on them and predicts the
    outer test fold. The returned weights come from all images with the penalty chosen by a
    plain k-fold CV over all of them. With `groups` (a label per image), every split, outer and
    inner, keeps the images of a group on one side.
    """
    from tqdm import tqdm

    X = np.asarray(X)
    Y = np.asarray(Y, np.float64)
    alphas = np.asarray(sorted(float(a) for a in alphas))
    n = X.shape[0]
    if n < min_images(folds):
        raise ValueError(f"{n} images; {folds}-fold nested CV needs at least {min_images(folds)}")
    if groups is not None:
        groups = group_ids(groups)
        if len(groups) != n:
            raise ValueError(f"{len(groups)} group labels for {n} images")
        n_groups = int(groups.max()) + 1
        if n_groups < min_images(folds):
            raise ValueError(f"{n_groups} groups; grouped {folds}-fold nested CV needs at least {min_images(folds)}")
    K, mu = gram(X)
    rng = np.random.default_rng(seed)
    heldout = np.empty_like(Y)
    everything = np.arange(n)
    # each outer training set keeps >= `folds` groups so that its inner CV can be grouped too
    outer = _folds(n, folds, rng, groups, min_train=folds)
    # many small n x n eigendecompositions: multithreaded LAPACK is slower on them, and
    # pathologically so on a busy machine
    with one_blas_thread():
        for test in tqdm(outer, desc="nested CV", unit="fold", disable=None if progress else True):
            train = np.setdiff1d(everything, test)
            best = select_alphas(K, Y, train, alphas, folds, rng, groups)
            preds = _Solver(K, train, Y[train]).predict_all(test, alphas)
            heldout[test] = preds[best, :, np.arange(Y.shape[1])].T
        best = select_alphas(K, Y, everything, alphas, folds, rng, groups)
        full = _Solver(K, everything, Y)
    lam = full.penalties(alphas[best])
    coef = full.coef(lam)  # [n, C]
    # w = Xc^T coef with Xc centred by the training mean; computed blockwise in float64.
    weight = np.empty((Y.shape[1], X.shape[1]))
    for j in range(0, X.shape[1], CHUNK):
        weight[:, j : j + CHUNK] = ((X[:, j : j + CHUNK] - mu[j : j + CHUNK]).T @ coef).T
    bias = full.ybar - weight @ mu
    # a single penalty was not chosen, so it cannot sit at the edge of a choice
    at_edge = ((best == 0) | (best == len(alphas) - 1)) & (len(alphas) > 1)
    return RidgeFit(weight=weight, bias=bias, alpha=alphas[best], penalty=lam, heldout=heldout, at_edge=at_edge)
