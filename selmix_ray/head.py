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
- **Cheap steps: a closed-form gradient, Adam written out, bfloat16 products.** Each step computes the
  cross-entropy gradient in closed form, ((softmax - one-hot) / B)ᵀ x_B and its column sums, instead of
  autograd, and applies torch's Adam update written out (:class:`_Adam`: a ``torch.optim`` optimizer
  imports ``torch._dynamo``, 2 s); on a CPU with native bfloat16 (AVX512-BF16 or AMX) the two
  (B, d) x (d, K) products of a minibatch fit run in bfloat16 (float32 accumulation, bfloat16 results; softmax, gradient
  and parameters stay float32) when the head has at least :data:`BFLOAT16_MIN_WEIGHTS` weights, below
  which they were no faster. At ImageNet-LT shape, one thread, load average 1.2-2.3, in one process (a
  probe on this machine; ``benchmarks/bench_scale.py`` times the build): 300 steps took 8.8-10.7 s with the
  former autograd loop (its first call in a process, as in a build, includes 1.3-2 s of importing
  ``torch._dynamo``), 6.1 s in float32 and 3.1-3.8 s in bfloat16 (2.8x), with the same validation cross-entropy
  3.158 and mean recall 0.466 to three digits. Over 3 seeds on K = 10 / K = 100 Gaussian clusters
  (7.4k / 7.2k rows), digits and mnist at rho = 1 (1040 and 3000 rows: minibatch fits) with pixels or CNN
  features (float32 products: their heads are under 2^16 weights), the validation cross-entropy and
  mean recall equalled the former fit's to four digits. Full-batch fits (the bundled data at their
  default rho) keep float32 and give the former head.
- **No closed-form warm start (tried, rejected).** A shrinkage-LDA start (class means, shared
  covariance, a temperature fitted on a held-out part of the training split, then Adam with early
  stopping on that part) gave validation cross-entropy 5.72 against 3.16 at ImageNet-LT shape (mean recall
  0.560 vs 0.466: right more often, over-confident on the 5-row classes) and 0.196 against 0.088 on
  mnist CNN features, where the held-out training rows (cross-entropy 0.016) cannot show the
  over-confidence because the backbone was trained on them; early stopping kept the start. A log-prior
  bias start made the validation loss worse (3.43 vs 3.16: the balanced validation split prefers a head
  that has not learned the training prior yet), and so did a larger learning rate with fewer steps (lr
  0.02 for 150 steps 3.94, 0.03 for 100 steps 5.36). One pass (225 steps at ImageNet-LT shape, what
  ``head_steps=0`` gives) reached 3.04 with a quarter less time; the default keeps 300 steps.
- **Deterministic for a seed** on a given machine: the zero start and the seeded shuffles fix everything
  (CUDA kernels may differ from CPU in the last bits, and a CPU without native bfloat16 multiplies in
  float32: a cache folder shared by such machines may hold either head, :data:`HEAD_FIT` is the same).
- **One CPU thread by default**: each step is a few GEMMs of (batch_size, d) x (d, K), too short for two
  threads to share well when other processes compete. At ImageNet-LT shape on this 2-core machine under load
  (load average 5-8), a step took 81-110 ms with one thread and 320 ms with two (interleaved runs); on an
  idle machine two threads would save at most about half. ``build_features(num_threads=...)`` overrides it.
- **Device**: the fit runs on ``device`` (CUDA when the build runs there); the training features are
  copied there once in their stored dtype, and each minibatch is converted to the products' dtype.
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

__all__ = ["HEAD_FIT", "ANNEAL_FRACTION", "BFLOAT16_MIN_WEIGHTS", "fit_erm_head", "fit_steps", "head_problems",
           "load_head", "matmul_dtype"]

HEAD_FIT = "minibatch-adam-2"  # names the fitting algorithm in the cache key; change it when the algorithm changes
BFLOAT16_MIN_WEIGHTS = 1 << 16  # K * d from which minibatch fits on a CPU with native bfloat16 multiply in bfloat16
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

    from .device import torch_threads
    from .progress import bar as progress_bar

    device = torch.device("cpu") if device is None else torch.device(device)
    n, d = x.shape
    if n == 0:
        raise DataError("The ERM head needs training rows, but the train split is empty.")
    batch = min(int(batch_size), n)
    total = fit_steps(n, steps=steps, epochs=epochs, batch_size=batch)
    full = batch == n
    compute = matmul_dtype(device, full=full, n_weights=n_classes * d)
    rngs = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rngs), torch_threads(num_threads), torch.no_grad():
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        with warnings.catch_warnings():  # a read-only (cached) array: torch warns, but x is never written
            warnings.simplefilter("ignore", UserWarning)
            xt = torch.from_numpy(np.ascontiguousarray(x)).to(device)  # zero-copy on CPU; stored dtype
        yt = torch.from_numpy(np.asarray(y, dtype=np.int64)).to(device)
        weight = torch.zeros(n_classes, d, device=device)  # (K, d) float32: the parameters Adam updates
        bias = torch.zeros(n_classes, device=device)  # (K,)
        weight.grad, bias.grad = torch.zeros_like(weight), torch.zeros_like(bias)
        adam = _Adam([weight, bias], weight_decay=weight_decay)
        order, position = None, n
        bar = progress_bar(range(total), desc="fitting the ERM head", enabled=progress, unit="step")
        anneal_from = total if full else int(total * (1 - ANNEAL_FRACTION))
        xb_full = xt.to(compute) if full else None  # full batch: converted once
        for step in bar:
            step_lr = lr
            if step >= anneal_from:  # minibatch noise: cosine decay to 0 over the last steps
                step_lr = lr * 0.5 * (1 + math.cos(math.pi * (step - anneal_from) / (total - anneal_from)))
            if full:
                xb, yb = xb_full, yt
            else:
                if position + batch > n:  # a new pass: reshuffle (the last partial batch is dropped)
                    order, position = torch.randperm(n, generator=generator).to(device), 0
                index = order[position:position + batch]
                position += batch
                xb, yb = xt[index].to(compute), yt[index]
            _cross_entropy_gradient(xb, yb, weight, bias, compute)
            adam.step(step_lr)
        bar.close()
    return (
        weight.cpu().numpy().astype(np.float32),
        bias.cpu().numpy().astype(np.float32),
    )


def _cross_entropy_gradient(xb, yb, weight, bias, compute) -> None:
    """Write the gradient of the mean cross-entropy of ``xb @ weight.T + bias`` into ``weight.grad``, ``bias.grad``.

    The closed form (softmax - one-hot) / B replaces autograd (half the time of a step at ImageNet-LT shape);
    the two products run in ``compute`` (bfloat16 on CPUs with native bfloat16, see :func:`matmul_dtype`),
    the softmax and the parameters in float32. Shapes: xb (B, d) in ``compute``, yb (B,), weight (K, d).
    """
    import torch

    logits = torch.mm(xb, weight.to(compute).T).float()  # (B, K)
    logits += bias
    prob = torch.softmax(logits, dim=1)  # (B, K), overwritten by the gradient of the logits
    prob[torch.arange(len(yb), device=prob.device), yb] -= 1.0
    prob /= len(yb)
    weight.grad.copy_(torch.mm(prob.T.to(compute), xb))  # (K, d)
    torch.sum(prob, dim=0, out=bias.grad)  # (K,)


def matmul_dtype(device, *, full: bool, n_weights: int):
    """The dtype of the fit's two products: bfloat16 for minibatch fits of a head with at least
    :data:`BFLOAT16_MIN_WEIGHTS` weights (K * d) on a CPU with native bfloat16 (AVX512-BF16 or AMX), else
    float32 (full-batch fits, small heads, CUDA, other CPUs). See the module docstring."""
    import torch

    if full or torch.device(device).type != "cpu" or n_weights < BFLOAT16_MIN_WEIGHTS:
        return torch.float32
    cpu = getattr(torch, "cpu", None)
    native = any(getattr(cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return torch.bfloat16 if native else torch.float32


class _Adam:
    """Adam with L2 weight decay, the update of ``torch.optim.Adam`` (betas 0.9, 0.999, eps 1e-8), on
    tensors whose ``.grad`` the caller fills. Written out because constructing a ``torch.optim`` optimizer
    imports ``torch._dynamo`` (2 s on this machine, half of the whole fit at ImageNet-LT shape)."""

    def __init__(self, params, *, weight_decay: float, betas=(0.9, 0.999), eps: float = 1e-8):
        import torch

        self.params, self.weight_decay, self.betas, self.eps, self.t = list(params), weight_decay, betas, eps, 0
        self.moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in self.params]

    def step(self, lr: float) -> None:
        self.t += 1
        beta1, beta2 = self.betas
        correction1, correction2_sqrt = 1 - beta1 ** self.t, (1 - beta2 ** self.t) ** 0.5
        for param, (mean, square) in zip(self.params, self.moments):
            grad = param.grad.add_(param, alpha=self.weight_decay) if self.weight_decay else param.grad
            mean.lerp_(grad, 1 - beta1)
            square.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denominator = square.sqrt().div_(correction2_sqrt).add_(self.eps)
            param.addcdiv_(mean, denominator, value=-lr / correction1)


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
