"""What a checkpoint holds: the model, optimizer, scheduler, scaler, extra state and every RNG; how it is
read back (refusing what ``weights_only`` loading refuses, naming the fix)."""

from __future__ import annotations

import logging
import pickle
import random
import zipfile
from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Any, Final, Protocol

import torch

from spotd.integrations.torch.files import CheckpointError

__all__ = [
    "EXCLUDED_KEY",
    "FORMAT",
    "RESERVED_KEYS",
    "Components",
    "Stateful",
    "apply_extras",
    "apply_payload",
    "build_payload",
    "excluded",
    "extras_payload",
    "load_payload",
]

log = logging.getLogger("spotd.torch")

FORMAT: Final = "spotd.torch/1"
#: Top-level keys the payload uses for the components; extra ``state`` may not take them.
RESERVED_KEYS: Final = frozenset({"model", "optimizer", "scheduler", "scaler"})
#: The payload key listing what an emergency save left out (``Checkpointer(emergency_exclude=...)``).
EXCLUDED_KEY: Final = "excluded"


class Stateful(Protocol):
    """Anything with ``state_dict()``/``load_state_dict()``: a sampler, a data iterator, an EMA."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any], /) -> Any: ...


class Components:
    """The objects one checkpoint saves and restores."""

    __slots__ = ("model", "optimizer", "scaler", "scheduler", "state")

    def __init__(
        self,
        *,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None,
        scheduler: Any,
        scaler: Any,
        state: Mapping[str, Stateful],
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.scaler = scaler
        self.state = dict(state)


def extras_payload(
    parts: Components,
    *,
    step: int,
    rank: int,
    world_size: int,
    saved_at: float,
    exclude: AbstractSet[str] = frozenset(),
) -> dict[str, Any]:
    """Everything but the model and optimizer: what a sharded checkpoint keeps per rank beside its shards.
    ``exclude`` names components (scheduler, scaler, ``state`` keys) left out."""
    payload: dict[str, Any] = {
        "format": FORMAT,
        "step": step,
        "saved_at": saved_at,
        "rank": rank,
        "world_size": world_size,
        "rng": _rng_state(),
        "state": {key: obj.state_dict() for key, obj in parts.state.items() if key not in exclude},
    }
    if parts.scheduler is not None and "scheduler" not in exclude:
        payload["scheduler"] = parts.scheduler.state_dict()
    if parts.scaler is not None and "scaler" not in exclude:
        payload["scaler"] = parts.scaler.state_dict()
    if exclude:
        # Says on restore what is missing on purpose, rather than leaving it to look like a bug.
        payload[EXCLUDED_KEY] = sorted(exclude)
    return payload


def build_payload(
    parts: Components,
    *,
    step: int,
    rank: int,
    world_size: int,
    saved_at: float,
    exclude: AbstractSet[str] = frozenset(),
) -> dict[str, Any]:
    """The whole checkpoint, less the components named in ``exclude`` (an emergency save the user made
    smaller: see ``Checkpointer(emergency_exclude=...)``); the model is always in it."""
    payload = extras_payload(
        parts, step=step, rank=rank, world_size=world_size, saved_at=saved_at, exclude=exclude
    )
    payload["model"] = parts.model.state_dict()
    if parts.optimizer is not None and "optimizer" not in exclude:
        payload["optimizer"] = parts.optimizer.state_dict()
    return payload


def excluded(payload: Mapping[str, Any]) -> list[str]:
    """The components an emergency save left out (empty for a whole checkpoint)."""
    value = payload.get(EXCLUDED_KEY)
    return [str(v) for v in value] if isinstance(value, list) else []


def load_payload(path: Path, *, map_location: Any, weights_only: bool) -> dict[str, Any]:
    """The file's payload. :class:`CheckpointError` when ``weights_only`` refuses an object in it (no older
    file fixes that); ValueError/OSError/RuntimeError/EOFError/KeyError/UnpicklingError when the file is
    unreadable, so the caller can fall back to an older one."""
    # torch.save writes a zip whose directory is at the end: a cut-off file fails this cheaply.
    if not zipfile.is_zipfile(path):
        raise ValueError("not a complete torch.save file (truncated or corrupt)")
    try:
        with open(path, "rb") as f:
            payload = torch.load(f, map_location=map_location, weights_only=weights_only)
    except pickle.UnpicklingError as exc:
        if "unsupported global" in str(exc).lower():
            raise CheckpointError(
                f"{path} holds objects that weights_only loading refuses ({exc}); fix: save extra "
                "state as tensors/containers, or pass weights_only=False if you trust the files"
            ) from exc
        raise
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError("not a spotd.torch checkpoint")
    return payload


def apply_payload(parts: Components, payload: dict[str, Any], path: Path) -> None:
    left_out = excluded(payload)
    if left_out:
        log.warning(
            "%s is an emergency checkpoint saved without %s (emergency_exclude: its upload would not have "
            "fitted the deadline); restoring the model weights, and what it left out starts fresh",
            path,
            ", ".join(left_out),
        )
    try:
        parts.model.load_state_dict(payload["model"])
        if parts.optimizer is not None and "optimizer" in payload:
            parts.optimizer.load_state_dict(payload["optimizer"])
    except (RuntimeError, KeyError, ValueError, TypeError) as exc:
        raise _misfit(path, exc) from exc
    apply_extras(parts, payload, path)


def apply_extras(parts: Components, payload: dict[str, Any], path: Path) -> None:
    """Scheduler, scaler, ``state=`` objects and RNGs (the model and optimizer are someone else's)."""
    try:
        if parts.scheduler is not None and "scheduler" in payload:
            parts.scheduler.load_state_dict(payload["scheduler"])
        if parts.scaler is not None and "scaler" in payload:
            parts.scaler.load_state_dict(payload["scaler"])
        saved_state = payload.get("state", {})
        for key, obj in parts.state.items():
            if key in saved_state:
                obj.load_state_dict(saved_state[key])
            elif key not in excluded(payload):  # left out on purpose: apply_payload said so
                log.warning("%s has no saved state for %r; it starts fresh", path, key)
    except (RuntimeError, KeyError, ValueError, TypeError) as exc:
        raise _misfit(path, exc) from exc
    _set_rng_state(payload.get("rng", {}))


def _misfit(path: Path, exc: Exception) -> CheckpointError:
    return CheckpointError(
        f"{path} does not fit this model/optimizer ({exc}); "
        "fix: use a checkpoint_dir of this model, or move the old checkpoints away"
    )


def _rng_state() -> dict[str, Any]:
    # Only tensors and plain containers, so weights_only loading accepts them.
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np
    except ImportError:
        pass
    else:
        kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
        state["numpy"] = (
            str(kind),
            torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            int(pos),
            int(has_gauss),
            float(cached),
        )
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "numpy" in state:
        try:
            import numpy as np
        except ImportError:
            log.warning("checkpoint has numpy RNG state but numpy is not installed; it is not restored")
        else:
            kind, keys, pos, has_gauss, cached = state["numpy"]
            np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        if len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
        else:
            log.warning(
                "checkpoint has RNG state for %d GPUs, this machine has %d; CUDA RNG not restored",
                len(state["cuda"]),
                torch.cuda.device_count(),
            )
