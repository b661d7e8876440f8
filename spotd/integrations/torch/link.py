"""The Checkpointer's view of spotd: the part of a :class:`spotd.client.Guard` it uses, and how it finds the
daemon, the checkpoint directory and its own rank."""

from __future__ import annotations

import enum
import os
from datetime import datetime
from pathlib import Path
from typing import Any, Final, Protocol

import torch

__all__ = [
    "AUTO",
    "DEFAULT_CHECKPOINT_DIR",
    "CheckpointRequestLike",
    "Guard",
    "connect",
    "default_socket_path",
    "rank_and_world",
    "resolve_dir",
]

DEFAULT_CHECKPOINT_DIR: Final = "/opt/ml/checkpoints"


class CheckpointRequestLike(Protocol):
    @property
    def request_id(self) -> str: ...

    @property
    def reason(self) -> str: ...

    @property
    def deadline(self) -> datetime: ...

    @property
    def final(self) -> bool: ...

    def seconds_left(self) -> float: ...


class Guard(Protocol):
    """The part of :func:`spotd.client.connect`'s object the Checkpointer uses (tests pass their own)."""

    @property
    def checkpoint_requested(self) -> bool: ...

    @property
    def request(self) -> CheckpointRequestLike | None: ...

    @property
    def checkpoint_dir(self) -> str | None: ...

    @property
    def connected(self) -> bool: ...

    def saved(self, path: str, step: int | None = None) -> Any: ...

    def wait_durable(self, timeout: float | None = None) -> bool: ...

    def close(self) -> Any: ...


class _Auto(enum.Enum):
    AUTO = "auto"


#: ``guard=AUTO``: the Checkpointer connects to spotd itself.
AUTO: Final = _Auto.AUTO


def default_socket_path() -> str:
    # The same choice spotd.client.connect makes, so retention knows whether a daemon is configured.
    from spotd.protocol import socket_path

    return socket_path()


def connect(name: str, socket_path: str, *, handle_sigterm: bool | None = None) -> Guard:
    import spotd.client

    guard: Guard = spotd.client.connect(name=name, socket_path=socket_path, handle_sigterm=handle_sigterm)
    return guard


def resolve_dir(argument: str | os.PathLike[str] | None, guard: Guard | None) -> Path:
    """The argument, else the daemon's welcome, else $SPOTD_CHECKPOINT_DIR, else SageMaker's default."""
    if argument is not None:
        return Path(argument)
    if guard is not None:
        try:
            welcome_dir = guard.checkpoint_dir
        except Exception:
            welcome_dir = None
        if welcome_dir:
            return Path(welcome_dir)
    return Path(os.environ.get("SPOTD_CHECKPOINT_DIR") or DEFAULT_CHECKPOINT_DIR)


def rank_and_world() -> tuple[int, int]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return int(dist.get_rank()), int(dist.get_world_size())
    return 0, 1
