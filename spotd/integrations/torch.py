"""PyTorch checkpointing that spotd can make durable: three lines in a training loop.

```python
from spotd.torch import Checkpointer
ckpt = Checkpointer(model=model, optimizer=opt, scheduler=sched, every_steps=500)
start = ckpt.restore()          # next step to run: 0 if nothing to resume from
for step in range(start, total_steps):
    train_one_step(step)
    if ckpt.step(step):         # saves when due or when spotd asks; True = stop now, it is durable
        break
```

Files live at ``<checkpoint_dir>/<name>/step-<next step, 9 digits>.pt``: the number is how many steps are
done, which is also the step :meth:`Checkpointer.restore` returns. A spotd restore on a new instance puts
the store's files back at the same relative paths, so resuming is only ever "scan the directory".

Multi-rank (``torch.distributed`` initialized with ``world_size > 1``): every rank saves its own file,
``step-000000500-rank00003.pt``, and restores its own newest one. Ranks must resume from the same step:
if one rank's newest file is unreadable the ranks can disagree, so check the returned step (e.g. with an
all-reduce MIN) before training on; a single process never has that problem.

This module imports torch; the spotd daemon never imports it.
"""

from __future__ import annotations

import enum
import logging
import os
import pickle
import random
import re
import time
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Final, Protocol

import torch

from spotd.errors import SpotdError

__all__ = [
    "CheckpointError",
    "Checkpointer",
    "Guard",
    "SaveInfo",
    "Stateful",
]

log = logging.getLogger("spotd.torch")

FORMAT: Final = "spotd.torch/1"
DEFAULT_CHECKPOINT_DIR: Final = "/opt/ml/checkpoints"
_NAME_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class CheckpointError(SpotdError, OSError):
    """A checkpoint could not be written, or none of the existing ones can be used."""


class Stateful(Protocol):
    """Anything with ``state_dict()``/``load_state_dict()``: a sampler, a data iterator, an EMA."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any], /) -> Any: ...


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


AUTO: Final = _Auto.AUTO


@dataclass(frozen=True, slots=True)
class SaveInfo:
    """One checkpoint written: where, which step, how big, how long, and why."""

    path: Path
    relative: str  # what the daemon was told: relative to its checkpoint_dir when inside it
    step: int  # steps done == the step a resume starts at
    bytes: int
    seconds: float
    reason: str  # periodic | request | final | manual
    request_id: str | None = None


@dataclass(slots=True)
class _Local:
    step: int
    path: Path
    durable: bool


class Checkpointer:
    """Periodic and spotd-requested checkpoints of a PyTorch training loop, written atomically.

    ``state`` takes extra objects with ``state_dict()``/``load_state_dict()`` (the data loader's position,
    an EMA), saved under their key. Files are loaded with ``weights_only=True`` unless told otherwise:
    everything saved here is plain tensors and containers, so extra state should be too.
    """

    __slots__ = (
        "_by_step",
        "_daemon_seen",
        "_dir",
        "_every_s",
        "_every_steps",
        "_guard",
        "_handled_request",
        "_keep",
        "_last_save_t",
        "_last_saved_step",
        "_map_location",
        "_model",
        "_name",
        "_on_save",
        "_optimizer",
        "_own_guard",
        "_pending_step",
        "_rank",
        "_scaler",
        "_scheduler",
        "_socket_path",
        "_state",
        "_weights_only",
        "_world_size",
    )

    def __init__(
        self,
        *,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
        scaler: Any = None,
        state: Mapping[str, Stateful] | None = None,
        every_steps: int | None = None,
        every_seconds: float | None = None,
        keep: int = 2,
        checkpoint_dir: str | os.PathLike[str] | None = None,
        name: str = "train",
        guard: Guard | _Auto | None = AUTO,
        map_location: Any = "cpu",
        weights_only: bool = True,
        on_save: Callable[[SaveInfo], None] | None = None,
    ) -> None:
        if every_steps is not None and (isinstance(every_steps, bool) or every_steps < 1):
            raise ValueError(f"every_steps={every_steps!r}: give a whole number of steps >= 1, or None")
        if every_seconds is not None and not every_seconds > 0:
            raise ValueError(f"every_seconds={every_seconds!r}: give a number of seconds > 0, or None")
        if keep < 1:
            raise ValueError(f"keep={keep!r} would delete every checkpoint: keep at least 1 (default 2)")
        if not _NAME_RE.match(name):
            raise ValueError(f"name={name!r} is not a directory name: use letters, digits, '.', '_' or '-'")
        reserved = {"model", "optimizer", "scheduler", "scaler"}
        if state and reserved & set(state):
            raise ValueError(f"state keys {sorted(reserved & set(state))} are taken: rename them")
        self._model = model
        self._optimizer = optimizer
        self._scheduler = scheduler
        self._scaler = scaler
        self._state = dict(state or {})
        self._every_steps = every_steps
        self._every_s = every_seconds
        self._keep = keep
        self._name = name
        self._map_location = map_location
        self._weights_only = weights_only
        self._on_save = on_save
        self._own_guard = guard is AUTO
        if isinstance(guard, _Auto):
            self._socket_path: str | None = _default_socket_path()
            self._guard: Guard | None = _connect(name, self._socket_path)
        else:
            self._guard = guard
            path = getattr(guard, "socket_path", None) if guard is not None else None
            self._socket_path = os.fspath(path) if isinstance(path, (str, os.PathLike)) else None
        # Sticky: once a daemon is known to exist, a save is durable only when it says so.
        self._daemon_seen = False
        self._rank, self._world_size = _rank_and_world()
        self._dir = _resolve_dir(checkpoint_dir, self._guard) / name
        self._by_step: dict[int, _Local] = {}
        self._handled_request: str | None = None
        self._last_saved_step: int | None = None
        self._pending_step: int | None = None
        self._last_save_t = time.monotonic()

    # -- public ------------------------------------------------------------------------------------

    @property
    def directory(self) -> Path:
        """Where this process's checkpoint files go."""
        return self._dir

    @property
    def last_saved_step(self) -> int | None:
        return self._last_saved_step

    def restore(self) -> int:
        """Load the newest readable local checkpoint; returns the step to run next (0: nothing to resume).

        An unreadable file (truncated, corrupt) is skipped with a warning in favour of an older one. If
        files exist but none can be read, this raises rather than silently training from scratch.
        """
        self._dir.mkdir(parents=True, exist_ok=True)
        self._remove_stale_temps()
        found = self._scan()
        expected = self._daemon_expected()
        # A file found on disk may be a restore from the store or an unreported local save: without a daemon
        # either counts for retention; with one, it waits for a newer durable save before being deleted.
        self._by_step = {s: _Local(step=s, path=p, durable=not expected) for s, p in found}
        self._last_save_t = time.monotonic()
        failures: list[str] = []
        for step, path in sorted(found, reverse=True):
            try:
                # torch.save writes a zip whose directory is at the end: a cut-off file fails this cheaply.
                if not zipfile.is_zipfile(path):
                    raise ValueError("not a complete torch.save file (truncated or corrupt)")
                with open(path, "rb") as f:
                    payload = torch.load(f, map_location=self._map_location, weights_only=self._weights_only)
                if not isinstance(payload, dict) or payload.get("format") != FORMAT:
                    raise ValueError("not a spotd.torch checkpoint")
            except pickle.UnpicklingError as exc:
                if "unsupported global" in str(exc).lower():
                    raise CheckpointError(
                        f"{path} holds objects that weights_only loading refuses ({exc}); fix: save extra "
                        "state as tensors/containers, or pass weights_only=False if you trust the files"
                    ) from exc
                failures.append(f"{path.name}: {exc}")
                log.warning("skipping unreadable checkpoint %s (%s); trying an older one", path, exc)
                continue
            except (OSError, RuntimeError, ValueError, EOFError, KeyError) as exc:
                failures.append(f"{path.name}: {exc}")
                log.warning("skipping unreadable checkpoint %s (%s); trying an older one", path, exc)
                continue
            self._apply(payload, path)
            self._last_saved_step = step
            log.info("restored %s: resuming at step %d", path, step)
            return step
        if failures:
            raise CheckpointError(
                f"no checkpoint in {self._dir} is readable ({'; '.join(failures)}); fix: restore them again "
                "(spotd restore), or move the directory away to start from step 0"
            )
        return 0

    def step(self, step: int) -> bool:
        """Call after finishing ``step``. Saves when due or asked; True means stop now (final request)."""
        done = step + 1
        guard = self._guard
        if not self._daemon_seen and self._guard_connected():
            self._daemon_seen = True  # cheap to read every step, so a short-lived connection is not missed
        request = self._pending_request(guard)
        if request is not None and guard is not None:
            self._handled_request = request.request_id
            final = bool(request.final)
            try:
                self._save(done, reason="final" if final else "request", request_id=request.request_id)
            except CheckpointError as exc:
                # Tell spotd now, so it stops waiting for this trainer instead of burning the deadline.
                failed = getattr(guard, "failed", None)
                if callable(failed):
                    try:
                        failed(str(exc))
                    except Exception as report_exc:
                        log.warning("telling spotd about the failed save failed: %s", report_exc)
                raise
            if not final:
                return False
            timeout_s = max(0.0, float(request.seconds_left()))
            durable = self._wait_guard_durable(timeout_s)
            if durable:
                self._mark_durable(done)
                self._apply_retention()
            else:
                log.warning(
                    "checkpoint at step %d not confirmed durable within %.1fs; stopping anyway",
                    done,
                    timeout_s,
                )
            return True
        if self._due(done):
            self._save(done, reason="periodic", request_id=None)
        return False

    def save(self, step: int) -> SaveInfo:
        """Save now, as if ``step`` steps are done (the value :meth:`restore` will return)."""
        return self._save(step, reason="manual", request_id=None)

    def wait_durable(self, timeout: float | None = None) -> bool:
        """True once the daemon committed the last save; at once without a daemon (nothing to wait for).

        While the daemon is away this keeps waiting (the client re-sends the save when it is back) until
        ``timeout``; with ``timeout=None`` it returns False at once rather than hang on a daemon that is gone.
        """
        if self._pending_step is None:
            return True  # nothing saved since the last durable one, or no daemon (saves count as durable)
        durable = self._wait_guard_durable(timeout)
        if durable:
            self._mark_durable(self._pending_step)
            self._apply_retention()
        return durable

    def close(self) -> None:
        """Disconnect from the daemon if this Checkpointer connected itself."""
        if self._own_guard and self._guard is not None:
            self._guard.close()
            self._guard = None

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- saving ------------------------------------------------------------------------------------

    def _pending_request(self, guard: Guard | None) -> CheckpointRequestLike | None:
        if guard is None:
            return None
        try:
            if not guard.checkpoint_requested:
                return None
            request = guard.request
        except Exception as exc:
            log.warning("reading the spotd request failed: %s", exc)
            return None
        # The client may keep showing a request after we reported it; answer each one once.
        if request is None or request.request_id == self._handled_request:
            return None
        return request

    def _due(self, done: int) -> bool:
        if self._every_steps is not None and done % self._every_steps == 0:
            return True
        return self._every_s is not None and time.monotonic() - self._last_save_t >= self._every_s

    def _filename(self, step: int) -> str:
        suffix = f"-rank{self._rank:05d}" if self._world_size > 1 else ""
        return f"step-{step:09d}{suffix}.pt"

    def _save(self, step: int, *, reason: str, request_id: str | None) -> SaveInfo:
        started = time.monotonic()
        self._dir.mkdir(parents=True, exist_ok=True)
        final_path = self._dir / self._filename(step)
        if self._last_saved_step == step and final_path.exists():
            # Asked again at a step already on disk (periodic save, then a request): report, don't rewrite.
            size = final_path.stat().st_size
        else:
            size = self._write(final_path, self._payload(step))
        self._last_save_t = time.monotonic()
        self._last_saved_step = step
        # The client tracks only the last report: learn whether the previous one became durable first.
        self._refresh_durable()
        relative = self._report(final_path, step)
        # A save made while the daemon is away is not durable: the client re-sends it on reconnect.
        expected = self._daemon_expected()
        self._by_step[step] = _Local(step=step, path=final_path, durable=not expected)
        if expected:
            self._pending_step = step
        self._apply_retention()
        info = SaveInfo(
            path=final_path,
            relative=relative,
            step=step,
            bytes=size,
            seconds=time.monotonic() - started,
            reason=reason,
            request_id=request_id,
        )
        log.info("saved %s (%d bytes, %.3fs, %s)", final_path, size, info.seconds, reason)
        if self._on_save is not None:
            self._on_save(info)
        return info

    def _payload(self, step: int) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "format": FORMAT,
            "step": step,
            "saved_at": time.time(),
            "rank": self._rank,
            "world_size": self._world_size,
            "model": self._model.state_dict(),
            "rng": _rng_state(),
            "state": {key: obj.state_dict() for key, obj in self._state.items()},
        }
        if self._optimizer is not None:
            payload["optimizer"] = self._optimizer.state_dict()
        if self._scheduler is not None:
            payload["scheduler"] = self._scheduler.state_dict()
        if self._scaler is not None:
            payload["scaler"] = self._scaler.state_dict()
        return payload

    def _write(self, final_path: Path, payload: dict[str, Any]) -> int:
        """Temp file in the same directory, fsync, rename, fsync the directory: complete or absent."""
        tmp = final_path.with_name(f".{final_path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(payload, f)
                f.flush()
                os.fsync(f.fileno())
            size = tmp.stat().st_size
            os.replace(tmp, final_path)
        except BaseException as exc:
            tmp.unlink(missing_ok=True)
            if isinstance(exc, OSError):
                raise CheckpointError(
                    f"writing {final_path} failed: {exc}; "
                    f"fix: free space in {final_path.parent} or make it writable"
                ) from exc
            raise
        _fsync_dir(final_path.parent)
        return size

    def _report(self, path: Path, step: int) -> str:
        guard = self._guard
        daemon_dir = guard.checkpoint_dir if guard is not None else None
        relative = str(path)
        if daemon_dir:
            try:
                relative = str(path.resolve().relative_to(Path(daemon_dir).resolve()))
            except ValueError:
                log.warning(
                    "%s is outside the daemon's checkpoint_dir %s: it will not be uploaded; fix: drop the "
                    "checkpoint_dir argument or point it inside %s",
                    path,
                    daemon_dir,
                    daemon_dir,
                )
        if guard is not None:
            try:
                guard.saved(relative, step=step)
            except Exception as exc:
                log.warning("telling spotd about %s failed: %s", relative, exc)
        return relative

    # -- retention ---------------------------------------------------------------------------------

    def _guard_connected(self) -> bool:
        if self._guard is None:
            return False
        try:
            return bool(self._guard.connected)
        except Exception:
            return False

    def _daemon_expected(self) -> bool:
        """Whether saves must wait for the daemon's word: a daemon was connected once or its socket exists.

        Only with no daemon configured at all do saves count as durable at once (plain checkpointing).
        """
        if self._daemon_seen:
            return True
        guard = self._guard
        if guard is None:
            return False
        seen = self._guard_connected()
        if not seen:
            try:
                seen = bool(getattr(guard, "ever_connected", False))
            except Exception:
                seen = False
        if not seen and self._socket_path:
            seen = os.path.exists(self._socket_path)
        self._daemon_seen = seen
        return seen

    def _wait_guard_durable(self, timeout: float | None) -> bool:
        """The daemon's confirmation of the last save; rides out a disconnect until ``timeout`` runs out."""
        deadline = None if timeout is None else time.monotonic() + timeout
        remaining = timeout
        while True:
            guard = self._guard
            if guard is None:
                return False
            try:
                if guard.wait_durable(timeout=remaining):
                    return True
            except Exception as exc:  # the daemon's trouble must not turn into a crash of training
                log.warning("waiting for durability failed: %s", exc)
                return False
            # Connected and still False: spotd refused it or time ran out. Disconnected: the client re-sends
            # the save when it reconnects, so keep asking until the deadline (none given: do not hang).
            if remaining is None or remaining <= 0 or self._guard_connected():
                return False
            time.sleep(min(0.05, remaining))
            assert deadline is not None
            remaining = max(0.0, deadline - time.monotonic())

    def _mark_durable(self, step: int) -> None:
        for local in self._by_step.values():
            if local.step <= step:
                local.durable = True
        if self._pending_step is not None and self._pending_step <= step:
            self._pending_step = None

    def _refresh_durable(self) -> None:
        if self._pending_step is None or self._guard is None:
            return
        try:
            durable = self._guard.wait_durable(timeout=0)
        except Exception:
            durable = False
        if durable:
            self._mark_durable(self._pending_step)

    def _apply_retention(self) -> None:
        """Keep the newest ``keep`` files; an older one goes only once it or a newer one is durable."""
        ordered = sorted(self._by_step.values(), key=lambda c: c.step, reverse=True)
        newest_durable = max((c.step for c in ordered if c.durable), default=None)
        for local in ordered[self._keep :]:
            if newest_durable is None or local.step > newest_durable:
                continue
            try:
                local.path.unlink(missing_ok=True)
            except OSError as exc:
                log.warning("could not delete old checkpoint %s: %s", local.path, exc)
                continue
            del self._by_step[local.step]

    # -- restoring ---------------------------------------------------------------------------------

    def _scan(self) -> list[tuple[int, Path]]:
        suffix = rf"-rank{self._rank:05d}" if self._world_size > 1 else ""
        pattern = re.compile(rf"^step-(\d{{9}}){suffix}\.pt$")
        found = []
        for entry in self._dir.iterdir():
            match = pattern.match(entry.name)
            if match and entry.is_file():
                found.append((int(match.group(1)), entry))
        return found

    def _remove_stale_temps(self) -> None:
        # Left by a process killed mid-save; never complete, so never a candidate for restore.
        mine = f".tmp-{os.getpid()}"
        for entry in self._dir.glob(".step-*.pt.tmp-*"):
            ours = self._world_size == 1 or f"-rank{self._rank:05d}." in entry.name
            if ours and not entry.name.endswith(mine):
                entry.unlink(missing_ok=True)

    def _apply(self, payload: dict[str, Any], path: Path) -> None:
        try:
            self._model.load_state_dict(payload["model"])
            if self._optimizer is not None and "optimizer" in payload:
                self._optimizer.load_state_dict(payload["optimizer"])
            if self._scheduler is not None and "scheduler" in payload:
                self._scheduler.load_state_dict(payload["scheduler"])
            if self._scaler is not None and "scaler" in payload:
                self._scaler.load_state_dict(payload["scaler"])
            saved_state = payload.get("state", {})
            for key, obj in self._state.items():
                if key in saved_state:
                    obj.load_state_dict(saved_state[key])
                else:
                    log.warning("%s has no saved state for %r; it starts fresh", path, key)
        except (RuntimeError, KeyError, ValueError, TypeError) as exc:
            raise CheckpointError(
                f"{path} does not fit this model/optimizer ({exc}); "
                "fix: use a checkpoint_dir of this model, or move the old checkpoints away"
            ) from exc
        _set_rng_state(payload.get("rng", {}))


def _default_socket_path() -> str:
    # The same choice spotd.client.connect makes, kept here so retention knows whether a daemon is configured.
    from spotd.client import DEFAULT_SOCKET

    return os.environ.get("SPOTD_SOCKET") or DEFAULT_SOCKET


def _connect(name: str, socket_path: str) -> Guard:
    import spotd.client

    guard: Guard = spotd.client.connect(name=name, socket_path=socket_path)
    return guard


def _resolve_dir(argument: str | os.PathLike[str] | None, guard: Guard | None) -> Path:
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


def _rank_and_world() -> tuple[int, int]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return int(dist.get_rank()), int(dist.get_world_size())
    return 0, 1


def _fsync_dir(path: Path) -> None:
    # Without this the rename itself may not survive a power cut, even though the data does.
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
