"""Sharded checkpoints through torch.distributed.checkpoint (DCP): ``Checkpointer(..., sharded=True)``.

One directory per step, ``<checkpoint_dir>/<name>/step-<9 digits>.dcp/``, written by every rank together:
each rank its ``__<rank>_0.distcp`` shard of the model and optimizer (``get_state_dict``: FSDP- and
DTensor-ready) and its own ``extra-rank<5 digits>.pt`` (step, RNG, ``state=`` objects), then rank 0 writes
``.metadata`` after every rank's write returned — DCP's own commit marker, so a directory without it is an
unfinished save and never restored. Loading reshards: a checkpoint saved by N ranks loads into M.

Per-rank extras do not reshard: a rank whose own extras file is absent (more ranks than at save time)
takes rank 0's, so its RNG and data-loader state are rank 0's — say so if that matters to you.
"""

from __future__ import annotations

import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from spotd.integrations.torch import files
from spotd.integrations.torch.files import CheckpointError
from spotd.integrations.torch.ranks import distributed
from spotd.integrations.torch.state import Components, apply_extras, extras_payload

__all__ = ["COMMIT_MARKER", "directory_name", "load", "save", "scan"]

#: Written last by DCP (rank 0, after every rank's shards): the directory is complete once it exists.
COMMIT_MARKER: Final = ".metadata"
_DIR_RE: Final = re.compile(r"^step-(\d{9})\.dcp$")


def directory_name(step: int) -> str:
    return f"step-{step:09d}.dcp"


def _extras_name(rank: int) -> str:
    return f"extra-rank{rank:05d}.pt"


def _state(parts: Components) -> dict[str, Any]:
    model_sd, optim_sd = get_state_dict(parts.model, [parts.optimizer] if parts.optimizer else [])
    state: dict[str, Any] = {"model": model_sd}
    if parts.optimizer is not None:
        state["optimizer"] = optim_sd
    return state


def save(
    directory: Path,
    parts: Components,
    *,
    step: int,
    rank: int,
    world_size: int,
    saved_at: float,
    before_write: Callable[[], None] | None = None,
) -> int:
    """Every rank calls this with the same ``directory``; returns the bytes this rank wrote.
    ``before_write()`` runs once the directory exists, before anything is written into it (the Checkpointer
    announces the directory to spotd, which then uploads each file as it is closed)."""
    directory.mkdir(parents=True, exist_ok=True)
    if before_write is not None:
        before_write()
    extras = directory / _extras_name(rank)
    size = files.write_atomic(
        extras, extras_payload(parts, step=step, rank=rank, world_size=world_size, saved_at=saved_at)
    )
    try:
        dcp.save(_state(parts), checkpoint_id=directory, no_dist=not distributed())
    except (OSError, RuntimeError) as exc:
        raise CheckpointError(f"writing the sharded checkpoint {directory} failed: {exc}") from exc
    size += sum(p.stat().st_size for p in directory.glob(f"__{rank}_*.distcp"))
    if rank == 0:
        size += (directory / COMMIT_MARKER).stat().st_size
    return size


def scan(directory: Path) -> list[tuple[int, Path]]:
    """(step, path) of complete sharded checkpoints: those whose ``.metadata`` exists."""
    found = []
    for entry in directory.iterdir():
        match = _DIR_RE.match(entry.name)
        if match and entry.is_dir() and (entry / COMMIT_MARKER).is_file():
            found.append((int(match.group(1)), entry))
    return found


def load(directory: Path, parts: Components, *, rank: int, map_location: Any, weights_only: bool) -> None:
    """Load a complete sharded checkpoint into ``parts``, resharding to this run's ranks."""
    state = _state(parts)
    try:
        with warnings.catch_warnings():
            # Loading into one process is the point (resharding), not a mistake to warn about.
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, checkpoint_id=directory, no_dist=not distributed())
    except (OSError, RuntimeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{directory} cannot be loaded into this model ({exc})") from exc
    set_state_dict(
        parts.model,
        [parts.optimizer] if parts.optimizer else [],
        model_state_dict=state["model"],
        optim_state_dict=state.get("optimizer", {}),
    )
    extras = directory / _extras_name(rank)
    if not extras.is_file():
        extras = directory / _extras_name(0)
    if extras.is_file():
        with open(extras, "rb") as f:
            payload = torch.load(f, map_location=map_location, weights_only=weights_only)
        apply_extras(parts, payload, extras)


def remove(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)
