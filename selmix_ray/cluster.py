"""Ray's start and stop for ``search``/``resume``: reuse an initialised Ray, else connect to an address
or start a quiet local one; end only what was started here."""

from __future__ import annotations

__all__ = ["init_ray", "shutdown_ray"]


def init_ray(address: str | None) -> bool:
    """Reuse an initialised Ray; else connect to ``address`` or start a quiet local one.

    Returns True when this call initialised Ray (then :func:`shutdown_ray` ends it), False when the
    caller had already done so (then it stays as it is).
    """
    import logging

    import ray

    if ray.is_initialized():
        return False
    ray.init(address=address or "local", include_dashboard=False, log_to_driver=False,
             logging_level=logging.WARNING, configure_logging=True)
    return True


def shutdown_ray(started: bool) -> None:
    """Disconnect from (and, for a local one, stop) a Ray that search()/resume() initialised themselves."""
    if started:
        import ray

        ray.shutdown()
