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

import logging
import os
import pickle
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import torch

from spotd.integrations.torch import files
from spotd.integrations.torch.files import CheckpointError, LocalCheckpoint
from spotd.integrations.torch.link import (
    AUTO,
    CheckpointRequestLike,
    Guard,
    _Auto,
    connect,
    default_socket_path,
    rank_and_world,
    resolve_dir,
)
from spotd.integrations.torch.state import (
    RESERVED_KEYS,
    Components,
    Stateful,
    apply_payload,
    build_payload,
    load_payload,
)

__all__ = ["Checkpointer", "SaveInfo"]

log = logging.getLogger("spotd.torch")

_NAME_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True, slots=True)
class SaveInfo:
    """One checkpoint written: where, which step, how big, how long, and why."""

    path: Path
    relative: str  # what the daemon was told: relative to its checkpoint_dir when inside it
    step: int  # steps done == the step a resume starts at
    bytes: int
    seconds: float
    reason: str  # periodic | request | final | sigterm | manual
    request_id: str | None = None


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
        "_name",
        "_on_save",
        "_own_guard",
        "_parts",
        "_pending_step",
        "_rank",
        "_socket_path",
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
        handle_sigterm: bool | None = None,
    ) -> None:
        if every_steps is not None and (isinstance(every_steps, bool) or every_steps < 1):
            raise ValueError(f"every_steps={every_steps!r}: give a whole number of steps >= 1, or None")
        if every_seconds is not None and not every_seconds > 0:
            raise ValueError(f"every_seconds={every_seconds!r}: give a number of seconds > 0, or None")
        if keep < 1:
            raise ValueError(f"keep={keep!r} would delete every checkpoint: keep at least 1 (default 2)")
        if not _NAME_RE.match(name):
            raise ValueError(f"name={name!r} is not a directory name: use letters, digits, '.', '_' or '-'")
        if state and RESERVED_KEYS & set(state):
            raise ValueError(f"state keys {sorted(RESERVED_KEYS & set(state))} are taken: rename them")
        self._parts = Components(
            model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, state=state or {}
        )
        self._every_steps = every_steps
        self._every_s = every_seconds
        self._keep = keep
        self._name = name
        self._map_location = map_location
        self._weights_only = weights_only
        self._on_save = on_save
        self._own_guard = guard is AUTO
        if isinstance(guard, _Auto):
            self._socket_path: str | None = default_socket_path()
            self._guard: Guard | None = connect(name, self._socket_path, handle_sigterm=handle_sigterm)
        else:
            self._guard = guard
            path = getattr(guard, "socket_path", None) if guard is not None else None
            self._socket_path = os.fspath(path) if isinstance(path, (str, os.PathLike)) else None
        # Sticky: once a daemon is known to exist, a save is durable only when it says so.
        self._daemon_seen = False
        self._rank, self._world_size = rank_and_world()
        self._dir = resolve_dir(checkpoint_dir, self._guard) / name
        self._by_step: dict[int, LocalCheckpoint] = {}
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
        files.remove_stale_temps(self._dir, rank=self._rank, world_size=self._world_size)
        found = files.scan(self._dir, rank=self._rank, world_size=self._world_size)
        expected = self._daemon_expected()
        # A file found on disk may be a restore from the store or an unreported local save: without a daemon
        # either counts for retention; with one, it waits for a newer durable save before being deleted.
        self._by_step = {s: LocalCheckpoint(step=s, path=p, durable=not expected) for s, p in found}
        self._last_save_t = time.monotonic()
        failures: list[str] = []
        for step, path in sorted(found, reverse=True):
            try:
                payload = load_payload(path, map_location=self._map_location, weights_only=self._weights_only)
            except CheckpointError:
                raise
            except (OSError, RuntimeError, ValueError, EOFError, KeyError, pickle.UnpicklingError) as exc:
                failures.append(f"{path.name}: {exc}")
                log.warning("skipping unreadable checkpoint %s (%s); trying an older one", path, exc)
                continue
            apply_payload(self._parts, payload, path)
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
            reason = "sigterm" if request.reason == "sigterm" else "final" if final else "request"
            try:
                self._save(done, reason=reason, request_id=request.request_id)
            except CheckpointError as exc:
                # Tell spotd now, so it stops waiting for this trainer instead of burning the deadline.
                self._report_failure(exc, periodic=False)
                if final:
                    raise  # the instance is going away with nothing saved: say so, loudly
                log.error(
                    "the checkpoint spotd asked for at step %d failed (%s); training goes on", done, exc
                )
                return False
            if not final:
                return False
            timeout_s = max(0.0, float(request.seconds_left()))
            # With no daemon configured there is nothing to wait for: the local save is all there is.
            if not self.wait_durable(timeout=timeout_s):
                log.warning(
                    "checkpoint at step %d not confirmed durable within %.1fs; stopping anyway",
                    done,
                    timeout_s,
                )
            return True
        if self._due(done):
            try:
                self._save(done, reason="periodic", request_id=None)
            except CheckpointError as exc:
                # One missed periodic save costs a little work; a crash would cost the whole run.
                self._report_failure(exc, periodic=True)
                log.error("periodic checkpoint at step %d failed (%s); training goes on", done, exc)
        return False

    def _report_failure(self, exc: CheckpointError, *, periodic: bool) -> None:
        failed = getattr(self._guard, "failed", None)
        if not callable(failed):
            return
        try:
            if periodic:
                failed(str(exc), periodic=True)
            else:
                failed(str(exc))
        except Exception as report_exc:
            log.warning("telling spotd about the failed save failed: %s", report_exc)

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

    def _save(self, step: int, *, reason: str, request_id: str | None) -> SaveInfo:
        started = time.monotonic()
        self._dir.mkdir(parents=True, exist_ok=True)
        final_path = self._dir / files.filename(step, rank=self._rank, world_size=self._world_size)
        if self._last_saved_step == step and final_path.exists():
            # Asked again at a step already on disk (periodic save, then a request): report, don't rewrite.
            size = final_path.stat().st_size
        else:
            size = files.write_atomic(
                final_path,
                build_payload(
                    self._parts, step=step, rank=self._rank, world_size=self._world_size, saved_at=time.time()
                ),
            )
        self._last_save_t = time.monotonic()
        self._last_saved_step = step
        # The client tracks only the last report: learn whether the previous one became durable first.
        self._refresh_durable()
        relative = self._report(final_path, step)
        # A save made while the daemon is away is not durable: the client re-sends it on reconnect.
        expected = self._daemon_expected()
        self._by_step[step] = LocalCheckpoint(step=step, path=final_path, durable=not expected)
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
        for local in files.expired(self._by_step.values(), keep=self._keep):
            try:
                local.path.unlink(missing_ok=True)
            except OSError as exc:
                log.warning("could not delete old checkpoint %s: %s", local.path, exc)
                continue
            del self._by_step[local.step]
