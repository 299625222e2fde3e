"""The starting head: fitted once on the cached training features, or brought by the user (docs/method.md, One trial).

Every trial and every baseline starts from the FeatureSet's head, ``weight`` (K, d) and ``bias`` (K,).
:func:`fit_erm_head` fits it by multinomial logistic regression (ERM) on the labeled training split;
:func:`load_head` reads one the user trained elsewhere; :func:`head_problems` checks either.

Decisions, written once here:

- **Minibatch Adam, cost bounded in passes.** The fit runs ``max(steps, ceil(epochs * n / batch_size))``
  Adam steps on minibatches of ``batch_size`` rows, reshuffled (seeded) at every pass, from a zero head.
  Its cost is therefore about ``epochs`` passes over the data at scale, and ``steps`` cheap steps on small
  data. The learning rate is constant, except that minibatch fits decay it (cosine, to 0) over the last
  :data:`ANNEAL_FRACTION` of the steps to damp the minibatch noise. When ``batch_size >= n`` every step is
  full-batch, without noise to damp, and the fit is exactly the former one (300 full-batch Adam steps,
  lr 0.01, weight decay 1e-4): small datasets (digits, mnist) keep the head they had.
  At ImageNet-LT shape (K = 1000, d = 512, 230k rows) one full-batch step took 19.5-26.9 s on this 2-core
  machine under load (300 steps: about 2 hours); the minibatch fit (450 steps, two passes) took 33 s,
  about 250 times less, in the same process (benchmarks/bench_scale.py).
  Validation cross-entropy against the full-batch fit (lower is better; probes on this machine, minibatch
  numbers are means over 5 seeds): digits rho=10 0.371 -> 0.371 and mnist-shaped Gaussian clusters (740
  rows) 2.767 -> 2.767 (identical: full batch); Gaussian clusters K=100, d=128, 7k rows 2.894 -> 2.623;
  K=10, d=64, 3k rows 1.120 -> 1.106; K=10, d=64, 7.4k rows 0.753 -> 0.761 (1% worse: the one loss
  seen). Without the decay the last was 0.780 and K=100 2.706; with it over every step, K=10 7.4k rows
  0.768. Larger batches (2048, 4096) did not help.
  One pass is the default (``head_epochs=1``; with ``head_steps=300`` that is 300 steps, 1.3 passes, at
  ImageNet-LT shape): there it gave validation cross-entropy 3.161 and mean recall 0.462 against 3.201 and
  0.456 for two passes (450 steps), one seed on bench_scale's data, with a third less head time (155 vs
  235 s under load average 25). Below about 150k rows both settings give the ``head_steps`` floor (300
  steps), so smaller data keep the head they had.
- **Deterministic for a seed** on a given device: the zero start and the seeded shuffles fix everything
  (CUDA kernels may differ from CPU in the last bits).
- **One CPU thread by default**: each step is a few GEMMs of (batch_size, d) x (d, K), too short for two
  threads to share well when other processes compete. At ImageNet-LT shape on this 2-core machine under load
  (load average 5-8), a step took 81-110 ms with one thread and 320 ms with two (interleaved runs); on an
  idle machine two threads would save at most about half. ``build_features(num_threads=...)`` overrides it.
- **Device**: the fit runs on ``device`` (CUDA when the build runs there); the training features are
  copied there once in their stored dtype, and each minibatch is converted to float32.
- **A user head** is a ``.npz`` file (``np.savez(path, weight=W, bias=b)``): ``weight`` (K, d) real,
  ``bias`` (K,) real and optional (zeros when absent, for a classifier without bias), every value
  finite. It is stored as float32.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import numpy as np

from .errors import DataError

__all__ = ["HEAD_FIT", "ANNEAL_FRACTION", "fit_erm_head", "fit_steps", "head_problems", "load_head"]

HEAD_FIT = "minibatch-adam-1"  # names the fitting algorithm in the cache key; change it when the algorithm changes
ANNEAL_FRACTION = 0.3  # minibatch fits: the learning rate decays (cosine, to 0) over this last fraction of the steps


def fit_steps(n: int, *, steps: int, epochs: float, batch_size: int) -> int:
    """Adam steps of :func:`fit_erm_head` for ``n`` rows: ``max(steps, ceil(epochs * n / batch_size))``."""
    return max(int(steps), math.ceil(epochs * n / min(batch_size, max(n, 1))))


def fit_erm_head(
    x: np.ndarray,
    y: np.ndarray,
    *,
    n_classes: int,
    steps: int = 300,
    epochs: float = 1.0,
    batch_size: int = 1024,
    lr: float = 0.01,
    weight_decay: float = 1e-4,
    seed: int = 0,
    device=None,
    progress: bool = False,
    num_threads: int | None = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression by minibatch Adam on (n, d) features (see the module docstring).

    Args:
        x: (n, d) float32 or float16 training features (read, never written).
        y: (n,) int class labels in [0, n_classes).
        steps: at least this many Adam steps; epochs: at least this many passes over the n rows.
        batch_size: rows per step (all rows when n <= batch_size: full-batch Adam).
        lr: Adam's learning rate (decayed over the last ANNEAL_FRACTION of minibatch fits); weight_decay: Adam's L2 term (weight and bias).
        device: torch device or None (CPU).
        progress: a tqdm bar on a terminal's stderr, else one log line per 10 % (``progress.bar``).
        num_threads: torch CPU threads during the fit (None: leave torch's setting).

    Returns:
        (weight (K, d), bias (K,)) float32 numpy arrays.
    """
    import torch
    from torch import nn

    from .device import torch_threads
    from .progress import bar as progress_bar

    device = torch.device("cpu") if device is None else torch.device(device)
    n, d = x.shape
    if n == 0:
        raise DataError("The ERM head needs training rows, but the train split is empty.")
    batch = min(int(batch_size), n)
    total = fit_steps(n, steps=steps, epochs=epochs, batch_size=batch)
    rngs = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rngs), torch_threads(num_threads):
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        with warnings.catch_warnings():  # a read-only (cached) array: torch warns, but x is never written
            warnings.simplefilter("ignore", UserWarning)
            xt = torch.from_numpy(np.ascontiguousarray(x)).to(device)  # zero-copy on CPU; stored dtype
        yt = torch.from_numpy(np.asarray(y, dtype=np.int64)).to(device)
        weight = torch.zeros(n_classes, d, device=device, requires_grad=True)
        bias = torch.zeros(n_classes, device=device, requires_grad=True)
        optimizer = torch.optim.Adam([weight, bias], lr=lr, weight_decay=weight_decay)
        full = batch == n
        order, position = None, n
        bar = progress_bar(range(total), desc="fitting the ERM head", enabled=progress, unit="step")
        anneal_from = total if full else int(total * (1 - ANNEAL_FRACTION))
        for step in bar:
            if step >= anneal_from:  # minibatch noise: cosine decay to 0 over the last steps
                for group in optimizer.param_groups:
                    group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * (step - anneal_from) / (total - anneal_from)))
            if full:
                xb, yb = xt, yt
            else:
                if position + batch > n:  # a new pass: reshuffle (the last partial batch is dropped)
                    order, position = torch.randperm(n, generator=generator).to(device), 0
                index = order[position:position + batch]
                position += batch
                xb, yb = xt[index], yt[index]
            loss = nn.functional.cross_entropy(nn.functional.linear(xb.float(), weight, bias), yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        bar.close()
    return (
        weight.detach().cpu().numpy().astype(np.float32),
        bias.detach().cpu().numpy().astype(np.float32),
    )


def head_problems(weight, bias, *, n_classes: int | None, dim: int | None, where: str) -> list[str]:
    """Every problem of a head against K classes and d features, one sentence each (empty when valid).

    ``weight`` must be a real (K, d) array and ``bias`` a real (K,) array, every value finite; ``None``
    for ``n_classes`` or ``dim`` skips that comparison. ``where`` names the head in the messages.
    """
    problems = []
    arrays = {"weight": weight, "bias": bias}
    for name, array in arrays.items():
        if array.dtype.kind not in "iuf":
            problems.append(f"{where}: {name} must hold real numbers, but its dtype is {array.dtype}.")
    if problems:
        return problems
    if weight.ndim != 2:
        problems.append(f"{where}: weight must be 2-D (K, d), but got shape {weight.shape}.")
    elif (n_classes is not None and weight.shape[0] != n_classes) or (dim is not None and weight.shape[1] != dim):
        expected = f"({'K' if n_classes is None else n_classes}, {'d' if dim is None else dim})"
        problems.append(
            f"{where}: weight must have shape (K, d) = {expected} for these features, but got {weight.shape}; "
            f"a head for other classes or another backbone does not fit."
        )
    k = weight.shape[0] if weight.ndim == 2 else n_classes
    if bias.shape != (k,):
        problems.append(f"{where}: bias must have shape ({k},), one value per class, but got {bias.shape}.")
    for name, array in arrays.items():
        bad = np.argwhere(~np.isfinite(array))
        if bad.size:
            at = ", ".join(map(str, bad[0]))
            problems.append(
                f"{where}: {name} has {len(bad)} non-finite value(s), the first {array[tuple(bad[0])]} at "
                f"index ({at}); every value must be finite."
            )
    return problems


def load_head(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read a user head from ``path`` (``.npz`` with ``weight`` (K, d) and optional ``bias`` (K,)).

    Only the file's form is checked here (present, readable, no pickled objects, real arrays); the shapes
    against the features and finiteness are checked by :func:`head_problems` once d and K are known.
    Returns (weight, bias) as stored (bias zeros when absent).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"head file {path} does not exist; pass head=<.npz file with weight (K, d) and bias (K,)>.")
    try:
        stored = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:  # not an npz/npy file, or a pickled one
        raise DataError(f"head file {path} is not a readable .npz file ({exc}); save it with "
                        f"np.savez(path, weight=W, bias=b).") from exc
    if not hasattr(stored, "files"):
        raise DataError(f"head file {path} is a single .npy array; save weight and bias with np.savez(path, weight=W, bias=b).")
    with stored:
        if "weight" not in stored.files:
            raise DataError(
                f"head file {path} has no 'weight' array (it holds {', '.join(stored.files) or 'nothing'}); "
                f"save it with np.savez(path, weight=W, bias=b), W of shape (K, d)."
            )
        try:
            weight = np.asarray(stored["weight"])
            bias = np.asarray(stored["bias"]) if "bias" in stored.files else np.zeros(weight.shape[:1], np.float32)
        except ValueError as exc:  # object arrays under allow_pickle=False
            raise DataError(
                f"head file {path} cannot be read as numeric arrays ({exc}); save real-valued arrays with "
                f"np.savez(path, weight=W, bias=b)."
            ) from exc
    return weight, bias
