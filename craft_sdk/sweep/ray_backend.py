"""Run sweep runs as Ray tasks (optional: ``pip install 'craft-sdk[ray]'``).

Each run is one task reserving ``threads`` CPUs; records come back to the driver,
which writes them (so workers need no shared file system, only craft-sdk, the
model and the task folders at the same paths).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from craft_sdk.errors import ConfigError, require

from .runner import safe_execute
from .spec import RunSpec

logger = logging.getLogger(__name__)


def _import_ray() -> Any:
    return require("ray", "ray", "Ray mode")


def run_on_ray(runs: list[RunSpec], address: str, threads: int, finish: Callable[[RunSpec, str, Any], None]) -> None:
    """Submit every run to Ray and call ``finish(run, status, value)`` as each completes.

    Args:
        runs: the runs to execute.
        address: ``"local"``, ``"auto"`` or ``"ray://host:port"``; ignored when Ray is already initialised.
        threads: CPUs reserved by, and torch threads of, each task.
        finish: called in the driver with ``("ok", record)`` or ``("error", message)``.
    """
    ray = _import_ray()
    started = not ray.is_initialized()
    if started:
        kwargs: dict[str, Any] = {"include_dashboard": False} if address == "local" else {}
        try:
            ray.init(address=address, **kwargs)
        except (ConnectionError, ValueError, RuntimeError) as exc:  # Ray's own text names its CLI's --address
            first = (str(exc).splitlines() or [exc.__class__.__name__])[0].split(". Please specify")[0]
            raise ConfigError(f"cannot start Ray with --ray {address} ({first}); start a cluster (ray start --head) "
                              "and pass --ray auto or --ray ray://HOST:PORT, or pass --ray local") from None
    pending: dict[Any, RunSpec] = {}
    try:
        remote = ray.remote(num_cpus=threads, max_retries=0)(safe_execute)
        pending = {remote.remote(run.to_dict(), threads): run for run in runs}
        logger.info("submitted %d runs to Ray (%s)", len(pending), address)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                run = pending.pop(ref)
                try:
                    status, value = ray.get(ref)
                except Exception as exc:  # a worker died (out of memory, node lost)
                    status, value = "error", f"{exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                finish(run, status, value)
    except BaseException:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
    finally:
        if started:
            ray.shutdown()
