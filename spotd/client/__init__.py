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

from typing import Final

from spotd import protocol
from spotd.client.control import control
from spotd.client.guard import CheckpointRequest, Guard, SpotdUnavailableWarning, connect

__all__ = [
    "DEFAULT_SOCKET",
    "CheckpointRequest",
    "Guard",
    "SpotdUnavailableWarning",
    "connect",
    "control",
]

DEFAULT_SOCKET: Final = protocol.DEFAULT_SOCKET
