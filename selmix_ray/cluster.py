"""Ray's start and stop for ``search``/``resume``: reuse an initialised Ray, else connect to an address
or start a quiet local one; end only what was started here.

Decisions (no hangs):

- An address ``host:port`` or ``ray://host:port`` is probed with plain TCP connections first, for at most
  ``connect_timeout_s`` seconds (default :data:`CONNECT_TIMEOUT_S`); nothing listening there is an
  :class:`~selmix_ray.errors.ExperimentError` that names the address and the fix. ``ray.init`` itself
  retries an unreachable GCS for minutes. A port that listens but is not a Ray head is not detected.
- ``resources_per_trial`` is checked against the live nodes before anything is written: a request that
  no single node can hold (more CPUs than any node has, a GPU on a cluster without one), or a fixed
  ``device: cuda`` on a cluster without a GPU, is refused. Ray would otherwise wait forever with no
  trial running. A cluster that autoscales counts only the nodes that are up when the sweep starts.
"""

from __future__ import annotations

import socket
import time

from .errors import ExperimentError

__all__ = ["init_ray", "shutdown_ray", "check_resources", "CONNECT_TIMEOUT_S"]

CONNECT_TIMEOUT_S = 30.0  # how long an unreachable address is retried before search/resume refuse


def init_ray(address: str | None, *, connect_timeout_s: float | None = None) -> bool:
    """Reuse an initialised Ray; else connect to ``address`` or start a quiet local one.

    Returns True when this call initialised Ray (then :func:`shutdown_ray` ends it), False when the
    caller had already done so (then it stays as it is). An address where nothing listens raises
    ExperimentError within ``connect_timeout_s`` seconds.
    """
    import logging

    import ray

    if ray.is_initialized():
        return False
    if address not in (None, "local", "auto"):
        wait_until_listening(address, CONNECT_TIMEOUT_S if connect_timeout_s is None else connect_timeout_s)
    try:
        ray.init(address=address or "local", include_dashboard=False, log_to_driver=False,
                 logging_level=logging.WARNING, configure_logging=True)
    except ConnectionError as err:  # address="auto" with no cluster on this machine
        raise ExperimentError(f"Cannot connect to a Ray cluster at address={address!r}: {err} Start one "
                              "(`ray start --head`) or leave address unset for a local Ray.") from err
    return True


def wait_until_listening(address: str, timeout_s: float) -> None:
    """Return once something accepts TCP connections at ``address``; ExperimentError after ``timeout_s``."""
    host, port = _host_port(address)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=max(min(deadline - time.monotonic(), 2.0), 0.1)):
                return
        except OSError as err:
            if time.monotonic() >= deadline:
                raise ExperimentError(
                    f"Nothing answers at the Ray address {address!r} ({host}:{port}: {err.strerror or err}) after "
                    f"{timeout_s:g} s. Check the address (`ray status` on the head node prints it), start the "
                    "cluster with `ray start --head`, or leave address unset for a local Ray; a slow network "
                    "may need a longer connect_timeout_s (--connect-timeout).") from None
            time.sleep(0.5)


def _host_port(address: str) -> tuple[str, int]:
    rest = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ExperimentError(f"The Ray address {address!r} is not 'auto', 'host:port' or 'ray://host:port'.")
    return host.strip("[]"), int(port)


def check_resources(resources: dict[str, float] | None, *, devices=()) -> None:
    """Refuse ``resources`` (``{"cpu": 1, "gpu": 0.5}``) that no live node of the running Ray can hold,
    and a ``cuda`` device among ``devices`` when the cluster has no GPU (ExperimentError, naming the nodes)."""
    import ray

    wanted = {_RAY_NAMES.get(key, key): float(value) for key, value in (resources or {"cpu": 1}).items()
              if float(value) > 0}
    nodes = [node.get("Resources", {}) for node in ray.nodes() if node.get("Alive")]
    if not nodes:
        return  # nothing to compare with (a Ray client that cannot list nodes)
    sizes = "; ".join(", ".join(f"{k} {v:g}" for k, v in sorted(n.items()) if k in ("CPU", "GPU"))
                      for n in nodes)
    if not any(all(node.get(key, 0.0) >= amount for key, amount in wanted.items()) for node in nodes):
        raise ExperimentError(
            f"No node of the Ray cluster can run a trial that needs {_describe(wanted)} (resources_per_trial); "
            f"the nodes have: {sizes}. Ask for less per trial (--cpus-per-trial / --gpus-per-trial) or add a "
            "node that has it; Ray would otherwise wait with no trial running.")
    cuda = sorted({str(d) for d in devices if str(d).startswith("cuda")})
    if cuda and not any(node.get("GPU", 0.0) > 0 for node in nodes):
        raise ExperimentError(
            f"The space fixes device={cuda[0]!r}, but no node of the Ray cluster has a GPU (nodes: {sizes}), "
            "so every trial would fail. Use device: auto or cpu, or run on a cluster with GPUs.")


_RAY_NAMES = {"cpu": "CPU", "gpu": "GPU", "memory": "memory"}


def _describe(wanted: dict[str, float]) -> str:
    return ", ".join(f"{key} {amount:g}" for key, amount in wanted.items()) or "nothing"


def shutdown_ray(started: bool) -> None:
    """Disconnect from (and, for a local one, stop) a Ray that search()/resume() initialised themselves."""
    if started:
        import ray

        ray.shutdown()
