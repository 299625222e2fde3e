"""Benchmark the gain matrix against a plain-GEMM floor and the released K^4-tensor form.

    .venv/bin/python benchmarks/bench_gain.py                 # K = 10, 100, 1000; d = 512
    .venv/bin/python benchmarks/bench_gain.py --sizes 10 100 --dim 64 --repeats 5

Prints a markdown table. For each K: the time of ``gain_matrix`` (min_recall, form "exact", hard target,
trained bias, surrogate Jacobian: the engine's defaults), the time of the same closed form written here
directly as a handful of GEMMs (the floor), their ratio, the time of the released code's K^4-tensor
formula (form "official") where it fits (K <= 100), and the peak extra memory of ``gain_matrix``
(tracemalloc, which sees numpy's allocations). Every time is the best of ``--repeats`` interleaved runs, after
checking that the three computations agree numerically.
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

import numpy as np

from selmix_ray.gain import gain_matrix
from selmix_ray.objectives import get_objective

LAMBDA_MIN = 0.6
MIX = (LAMBDA_MIN + 1) / 2


def make_problem(K: int, d: int, seed: int = 0):
    """Centroids (K, d), a head with bias, non-balanced validation counts (K, K), an updated objective."""
    rng = np.random.default_rng(seed)
    Z = rng.normal(size=(K, d)) / np.sqrt(d) * 8.0  # feature norms about 8
    W = rng.normal(size=(K, d)) * 0.05 + 0.1 * np.eye(K, d)
    b = rng.normal(size=K) * 0.1
    counts = rng.integers(0, 3, size=(K, K)) + np.diag(rng.integers(1, 30, size=K))
    counts = counts * rng.integers(1, 4, size=K)[:, None]
    objective = get_objective("min_recall")
    objective.update(counts)
    return counts, Z, W, b, objective


def floor_gain(counts, Z, W, b, lam):
    """The same closed form as plain numpy GEMMs, for min_recall (dM/dC = diag(lambda / pi))."""
    C = counts / counts.sum()
    prior = C.sum(axis=1)
    A = Z @ W.T + b
    shifted = A - A.max(axis=1, keepdims=True)
    softmax = np.exp(shifted)
    softmax /= softmax.sum(axis=1, keepdims=True)
    C_tilde = prior[:, None] * softmax
    H = lam / prior * np.diag(C_tilde)  # dM/dC_kk * C~_kk
    D = -C_tilde * (H / prior)[:, None]
    D[np.diag_indices(len(D))] += H
    S = Z @ Z.T + 1.0
    T = S @ D
    E1, E2 = np.exp(MIX * shifted), np.exp((1 - MIX) * shifted)
    contraction = (MIX * ((E1 * T) @ E2.T) + (1 - MIX) * (E1 @ (E2 * T).T)) / (E1 @ E2.T)
    return MIX * np.diag(T)[:, None] + (1 - MIX) * T.T - contraction


def released_tensor_gain(counts, Z, W, b, objective):
    """The released formula (form "official") built the released way: a K^3 Jacobian and a K^4 tensor."""
    K = len(counts)
    C = counts / counts.sum()
    prior = C.sum(axis=1)
    eye = np.eye(K)
    jacobian = C[:, :, None] * (eye[None, :, :] - (C / prior[:, None])[:, None, :])  # dC_kl/dA_km, (K,K,K)
    D = np.einsum("kl,klm->km", objective.grad(C), jacobian)
    z_mix = MIX * Z[:, None, :] + (1 - MIX) * Z[None, :, :]  # (K, K, d)
    logits = z_mix @ W.T + b  # (K, K, K)
    p = np.exp(logits - logits.max(axis=2, keepdims=True))
    p /= p.sum(axis=2, keepdims=True)
    S = Z @ Z.T
    mixed_similarity = z_mix @ Z.T  # <z_ij, z_q>, (K, K, K)
    delta_logits = (
        eye[:, None, None, :] * S[:, None, :, None] - p[:, :, None, :] * mixed_similarity[..., None]
    )
    return np.einsum("ijqm,qm->ij", delta_logits, D)  # (K, K, K, K) contracted with D


def best_times(functions, repeats: int) -> list[float]:
    """Best wall time of each function over ``repeats`` rounds, interleaved so load changes hit all alike."""
    times = [[] for _ in functions]
    for _ in range(repeats):
        for function, timings in zip(functions, times):
            start = time.perf_counter()
            function()
            timings.append(time.perf_counter() - start)
    return [min(timings) for timings in times]


def peak_extra_mb(function) -> float:
    tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    result = function()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    del result
    return (peak - base) / 2**20


def relative_difference(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def measure(K: int, d: int, repeats: int, tensor_max_k: int) -> dict:
    """Time and check the three computations for one K."""
    counts, Z, W, b, objective = make_problem(K, d)
    lam = np.asarray(objective.state_dict()["lambda"])
    gain = lambda: gain_matrix(counts, Z, W, b, objective, lambda_min=LAMBDA_MIN)
    floor = lambda: floor_gain(counts, Z, W, b, lam)
    row = {
        "K": K,
        "agreement": relative_difference(gain(), floor()),
        "tensor_time": None,
        "tensor_agreement": None,
    }
    if K <= tensor_max_k:
        official = gain_matrix(counts, Z, W, b, objective, lambda_min=LAMBDA_MIN, form="official")
        tensor = lambda: released_tensor_gain(counts, Z, W, b, objective)
        row["tensor_agreement"] = relative_difference(official, tensor())
        row["tensor_time"] = best_times([tensor], min(repeats, 2))[0]
    if row["agreement"] > 1e-9 or (row["tensor_agreement"] or 0.0) > 1e-9:
        raise SystemExit(f"K={K}: the computations disagree: {row}.")
    row["gain_time"], row["floor_time"] = best_times([gain, floor], repeats)
    row["gain_mb"], row["floor_mb"] = peak_extra_mb(gain), peak_extra_mb(floor)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000], help="values of K")
    parser.add_argument("--dim", type=int, default=512, help="feature dimension d")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (best is kept)")
    parser.add_argument("--tensor-max-k", type=int, default=100, help="largest K for the K^4 tensor form")
    args = parser.parse_args()

    rows = [measure(K, args.dim, args.repeats, args.tensor_max_k) for K in args.sizes]
    print(f"d = {args.dim}, best of {args.repeats} runs, numpy {np.__version__}\n")
    print(
        "| K | gain_matrix (s) | GEMM floor (s) | ratio | released K^4 tensor (s) | max rel diff exact vs floor "
        "| max rel diff official vs K^4 | peak extra MB gain | peak extra MB floor |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        tensor = "does not fit" if row["tensor_time"] is None else f"{row['tensor_time']:.4f}"
        tensor_diff = "-" if row["tensor_agreement"] is None else f"{row['tensor_agreement']:.1e}"
        print(
            f"| {row['K']} | {row['gain_time']:.4f} | {row['floor_time']:.4f} | "
            f"{row['gain_time'] / row['floor_time']:.2f} | {tensor} | {row['agreement']:.1e} | {tensor_diff} | "
            f"{row['gain_mb']:.1f} | {row['floor_mb']:.1f} |"
        )


if __name__ == "__main__":
    main()
