"""The training-side client: stdlib, :mod:`spotd.protocol` and :mod:`spotd.errors` only.

::

    guard = spotd.client.connect("train")
    for step in range(steps):
        train_step()
        if guard.checkpoint_requested:
            path = save_checkpoint(guard.checkpoint_dir, step)
            guard.saved(path, step=step)
            if guard.request and guard.request.final:
                guard.wait_durable(timeout=guard.request.seconds_left())
                break

Training never fails because spotd is absent or dies: the guard warns once and then behaves as
"never requested", reconnecting in the background.
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Final

from spotd import protocol
from spotd.client import signals
from spotd.client.control import control
from spotd.client.guard import Guard
from spotd.client.request import CheckpointRequest, SpotdUnavailableWarning
from spotd.client.wire import FIX

__all__ = [
    "DEFAULT_SOCKET",
    "CheckpointRequest",
    "Guard",
    "SpotdUnavailableWarning",
    "connect",
    "control",
]

DEFAULT_SOCKET: Final = protocol.DEFAULT_SOCKET

log = logging.getLogger("spotd.client")


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    try:
        return int(value) if value else None
    except ValueError:
        return None


def connect(
    name: str = "train",
    *,
    socket_path: str | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    reconnect_interval_s: float = 1.0,
    handle_sigterm: bool | None = None,
    sigterm_grace_s: float | None = None,
    local_rank: int | None = None,
    local_world_size: int | None = None,
    node_rank: int | None = None,
    run_id: str | None = None,
) -> Guard:
    """Register this process with spotd. Without a daemon: one SpotdUnavailableWarning, then a quiet guard.

    The socket is ``socket_path``, else ``$SPOTD_SOCKET``, else /run/spotd/spotd.sock; rank, world size,
    local rank, local world size and node default to torchrun's ``$RANK``, ``$WORLD_SIZE``, ``$LOCAL_RANK``,
    ``$LOCAL_WORLD_SIZE`` and ``$GROUP_RANK``; ``run_id`` names the run (the same on every rank).

    SIGTERM (systemd stopping the unit, torchrun forwarding a stop) becomes a final checkpoint request of
    this guard's own, with ``sigterm_grace_s`` (default ``$SPOTD_SIGTERM_GRACE`` or 60 s) to become durable;
    the handler only sets a flag and calls any handler installed before it (:mod:`spotd.client.signals`).
    Opt out with ``handle_sigterm=False`` or ``SPOTD_HANDLE_SIGTERM=0``. Only the main thread can install it.
    """
    guard = Guard(
        socket_path=protocol.socket_path(socket_path),
        name=name,
        rank=rank if rank is not None else _env_int("RANK"),
        world_size=world_size if world_size is not None else _env_int("WORLD_SIZE"),
        reconnect_interval_s=reconnect_interval_s,
        sigterm_grace_s=signals.sigterm_grace_s(sigterm_grace_s),
        placement={
            "local_rank": local_rank if local_rank is not None else _env_int("LOCAL_RANK"),
            "local_world_size": local_world_size
            if local_world_size is not None
            else _env_int("LOCAL_WORLD_SIZE"),
            "node_rank": node_rank if node_rank is not None else _env_int("GROUP_RANK"),
            "run_id": run_id,
        },
    )
    if signals.sigterm_enabled(handle_sigterm) and not signals.install(guard.on_sigterm):
        log.warning(
            "spotd.client.connect() ran outside the main thread, so SIGTERM cannot be turned into a "
            "last-chance checkpoint; fix: connect from the main thread, or pass handle_sigterm=False"
        )
    error = guard.start()
    if error is not None:
        warnings.warn(
            f"spotd is not reachable at {guard.socket_path} ({error}); training continues without emergency "
            f"checkpoints and reconnects in the background. {FIX}",
            SpotdUnavailableWarning,
            stacklevel=2,
        )
    return guard
