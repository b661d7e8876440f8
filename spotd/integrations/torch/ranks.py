"""Every rank, one decision: the stop agreement, the run identity, and the step all ranks restore.

A spot notice reaches one instance, and on it each rank reads its own guard a few milliseconds apart from the
others. If each rank decided alone, one would save and leave the loop while another went into the next
step's all-reduce and hung there (or died with "Connection closed by peer"). So with ``world_size > 1`` the
decision is collective: every rank contributes a level (:data:`NONE` < :data:`PERIODIC` < :data:`SAVE` <
:data:`STOP`) and an all-reduce MAX of one integer gives every rank the same answer at the same step.

Cost: one all-reduce of 8 bytes per synchronised step (``sync_every``); bench/agreement.py measures it. With
NCCL the tensor lives on the GPU and reading it waits for the step's kernels; ``sync_every=N`` bounds that
to one wait per N steps, at the price of up to N-1 steps of delay. Nothing here runs in a signal handler.

Custom loops call :func:`agree` at the same point of every step on every rank.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

import torch
import torch.distributed as dist

__all__ = [
    "NONE",
    "PERIODIC",
    "SAVE",
    "STOP",
    "StopAgreement",
    "Topology",
    "agree",
    "common_step",
    "run_identity",
    "topology",
]

NONE: Final = 0
#: A periodic save is due (by steps or, per rank, by seconds).
PERIODIC: Final = 1
#: Some rank was asked for a checkpoint; training goes on after it.
SAVE: Final = 2
#: Some rank was asked for a final checkpoint (spot notice, SIGTERM): save, then stop.
STOP: Final = 3


@dataclass(frozen=True, slots=True)
class Topology:
    """Where this process sits: torchrun's RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, GROUP_RANK."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, ""))
    except ValueError:
        return default


def topology() -> Topology:
    """The process group's rank and size when one is initialised, the torchrun variables for the rest."""
    if dist.is_available() and dist.is_initialized():
        rank, world = int(dist.get_rank()), int(dist.get_world_size())
    else:
        rank, world = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    local_world = _env_int("LOCAL_WORLD_SIZE", world)
    return Topology(
        rank=rank,
        world_size=world,
        local_rank=_env_int("LOCAL_RANK", rank % max(1, local_world)),
        local_world_size=local_world,
        node_rank=_env_int("GROUP_RANK", rank // max(1, local_world)),
    )


def distributed(group: Any = None) -> bool:
    """Whether there is more than one rank to agree with."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def _device(group: Any) -> torch.device:
    # NCCL reduces only CUDA tensors; gloo (and a "cpu:gloo,cuda:nccl" group) takes CPU ones.
    backend = str(dist.get_backend(group))
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def agree(level: int, *, group: Any = None) -> int:
    """The highest level any rank of ``group`` contributes; every rank must call it at the same point."""
    if not distributed(group):
        return level
    flag = torch.tensor([level], dtype=torch.int64, device=_device(group))
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return int(flag.item())


class StopAgreement:
    """:func:`agree` every ``every`` steps; a level seen between two sync points is held until the next."""

    __slots__ = ("_every", "_group", "_held")

    def __init__(self, *, group: Any = None, every: int = 1) -> None:
        if isinstance(every, bool) or every < 1:
            raise ValueError(f"sync_every={every!r}: give a whole number of steps >= 1")
        self._group = group
        self._every = every
        self._held = NONE

    def __call__(self, level: int, step: int) -> int:
        self._held = max(self._held, level)
        if step % self._every:
            return NONE
        held, self._held = self._held, NONE
        return agree(held, group=self._group)


def run_identity(*, group: Any = None) -> str:
    """One name for this run on every rank: rank 0's start time and a random tail, broadcast.

    It sorts by start time, so checkpoints named after it sort chronologically across runs too."""
    mine = f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{secrets.token_hex(3)}"
    if not distributed(group):
        return mine
    box: list[Any] = [mine]
    dist.broadcast_object_list(box, src=0, group=group)
    return str(box[0])


def common_step(available: Iterable[int], *, group: Any = None) -> int | None:
    """The newest step every rank holds, or None when the ranks have none in common."""
    steps = set(available)
    if not distributed(group):
        return max(steps, default=None)
    everyone: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, sorted(steps), group=group)
    shared = set.intersection(*(set(s) for s in everyone))
    return max(shared, default=None)


def all_ok(ok: bool, *, group: Any = None) -> bool:
    """True only when every rank says True (an all-reduce MIN)."""
    if not distributed(group):
        return ok
    flag = torch.tensor([1 if ok else 0], dtype=torch.int64, device=_device(group))
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return bool(flag.item())
