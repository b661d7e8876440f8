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
``step-000000500-rank00003.pt``. Build the Checkpointer and call :meth:`~Checkpointer.step` and
:meth:`~Checkpointer.restore` on every rank: both are collectives (:mod:`spotd.integrations.torch.ranks`).
``step()`` stops every rank at the same step when any rank was asked; ``restore()`` returns the newest step
every rank can read, the same on all of them.

A smaller emergency save, when the user says what may be left out: with
``Checkpointer(..., emergency_exclude=("optimizer",))``, a request whose upload spotd estimates will not
fit before the deadline (its measured upload rate against the size of the last checkpoint) is saved
without the optimizer state: the weights reach the store in time instead of the whole checkpoint not at
all. The log says so at the save; the file records what it lacks, and :meth:`Checkpointer.restore` loads
the weights, leaves the optimizer fresh and warns. Without ``emergency_exclude`` every save is whole (a
request that will not fit is only a warning).

This module imports torch; the spotd daemon never imports it.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import torch

from spotd.client import signals
from spotd.integrations.torch import files, ranks, sharded
from spotd.integrations.torch.files import CheckpointError, LocalCheckpoint
from spotd.integrations.torch.link import (
    AUTO,
    DaemonLink,
    Guard,
    _Auto,
    connect,
    default_socket_path,
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
#: How long finish() waits for the final checkpoint to be durable, and then for spotd's answer.
FINISH_TIMEOUT_S: Final = 300.0


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
    #: Components this save left out (``emergency_exclude``, when the upload would not fit the deadline).
    excluded: tuple[str, ...] = ()


class Checkpointer:
    """Periodic and spotd-requested checkpoints of a PyTorch training loop, written atomically.

    ``state`` takes extra objects with ``state_dict()``/``load_state_dict()`` (the data loader's position,
    an EMA), saved under their key. Files are loaded with ``weights_only=True`` unless told otherwise:
    everything saved here is plain tensors and containers, so extra state should be too.

    ``emergency_exclude`` names what a requested save may leave out when spotd says its upload will not
    fit before the deadline: ``"optimizer"``, ``"scheduler"``, ``"scaler"`` or keys of ``state`` (never
    the model). Empty (the default): every save is whole.
    """

    __slots__ = (
        "_agreement",
        "_by_step",
        "_dir",
        "_emergency_exclude",
        "_every_s",
        "_every_steps",
        "_handled_request",
        "_keep",
        "_last_save_t",
        "_last_saved_step",
        "_last_step_done",
        "_link",
        "_map_location",
        "_name",
        "_on_save",
        "_parts",
        "_pending_step",
        "_rank",
        "_run_id",
        "_sharded",
        "_topology",
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
        sync_every: int = 1,
        process_group: Any = None,
        sharded: bool = False,
        emergency_exclude: Sequence[str] = (),
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
        self._emergency_exclude = _check_exclude(
            emergency_exclude,
            optimizer=optimizer,
            scheduler=scheduler,
            scaler=scaler,
            state=state or {},
            sharded=sharded,
        )
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
        self._sharded = sharded
        self._topology = ranks.topology()
        self._rank, self._world_size = self._topology.rank, self._topology.world_size
        # Collective: every rank must build its Checkpointer, as every rank must call step().
        self._run_id = ranks.run_identity(group=process_group)
        self._agreement = (
            ranks.StopAgreement(group=process_group, every=sync_every)
            if ranks.distributed(process_group)
            else None
        )
        if isinstance(guard, _Auto):
            socket_path = default_socket_path()
            self._link = DaemonLink(
                guard=connect(
                    name,
                    socket_path,
                    handle_sigterm=handle_sigterm,
                    topology=self._topology,
                    run_id=self._run_id,
                ),
                socket_path=socket_path,
                owned=True,
            )
        else:
            path = getattr(guard, "socket_path", None) if guard is not None else None
            self._link = DaemonLink(
                guard=guard,
                socket_path=os.fspath(path) if isinstance(path, (str, os.PathLike)) else None,
                owned=False,
            )
        self._dir = resolve_dir(checkpoint_dir, self._link.guard) / name
        self._by_step: dict[int, LocalCheckpoint] = {}
        self._handled_request: str | None = None
        self._last_saved_step: int | None = None
        self._last_step_done: int | None = None
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
        if self._sharded:
            found = sharded.scan(self._dir)
        else:
            found = files.scan(self._dir, rank=self._rank, world_size=self._world_size)
        expected = self._link.expected()
        # A file found on disk may be a restore from the store or an unreported local save: without a daemon
        # either counts for retention; with one, it waits for a newer durable save before being deleted.
        self._by_step = {s: LocalCheckpoint(step=s, path=p, durable=not expected) for s, p in found}
        self._last_save_t = time.monotonic()
        if self._agreement is not None:
            return self._restore_agreed(dict(found))
        failures: list[str] = []
        for step, path in sorted(found, reverse=True):
            if self._load(step, path, failures):
                return step
        if failures:
            raise CheckpointError(
                f"no checkpoint in {self._dir} is readable ({'; '.join(failures)}); fix: restore them again "
                "(spotd restore), or move the directory away to start from step 0"
            )
        return 0

    def _load(self, step: int, path: Path, failures: list[str]) -> bool:
        if self._sharded:
            try:
                sharded.load(
                    path,
                    self._parts,
                    rank=self._rank,
                    map_location=self._map_location,
                    weights_only=self._weights_only,
                )
            except CheckpointError as exc:
                failures.append(f"{path.name}: {exc}")
                log.warning("skipping unloadable checkpoint %s (%s); trying an older one", path, exc)
                return False
            self._last_saved_step = step
            log.info("restored %s: resuming at step %d", path, step)
            return True
        try:
            payload = load_payload(path, map_location=self._map_location, weights_only=self._weights_only)
        except CheckpointError:
            raise
        except (OSError, RuntimeError, ValueError, EOFError, KeyError, pickle.UnpicklingError) as exc:
            failures.append(f"{path.name}: {exc}")
            log.warning("skipping unreadable checkpoint %s (%s); trying an older one", path, exc)
            return False
        apply_payload(self._parts, payload, path)
        self._last_saved_step = step
        log.info("restored %s: resuming at step %d", path, step)
        return True

    def _restore_agreed(self, found: dict[int, Path]) -> int:
        """Every rank loads the newest step that every rank can read, so all resume at the same step."""
        failures: list[str] = []
        candidates = set(found)
        while True:
            common = ranks.common_step(candidates)
            if common is None:
                anyone_had_files = not ranks.all_ok(not found)
                if anyone_had_files:
                    raise CheckpointError(
                        f"the ranks hold no readable checkpoint step in common (rank {self._rank} has "
                        f"{sorted(found) or 'none'}{'; ' + '; '.join(failures) if failures else ''}); fix: "
                        "restore them again (spotd restore), or move the directories away to start at step 0"
                    )
                return 0
            ok = self._load(common, found[common], failures)
            if ranks.all_ok(ok):
                return common
            candidates.discard(common)

    def step(self, step: int) -> bool:
        """Call after finishing ``step``. Saves when due or asked; True means stop now (final request)."""
        done = step + 1
        self._last_step_done = done
        self._link.notice_connection()
        request = self._link.pending_request(self._handled_request)
        level = ranks.NONE
        if request is not None:
            level = ranks.STOP if request.final else ranks.SAVE
        elif self._due(done):
            level = ranks.PERIODIC
        if self._agreement is not None:
            # Collective: every rank gets the same answer here, whichever rank (or node) was asked.
            level = self._agreement(level, step)
        if level == ranks.NONE:
            return False
        if level == ranks.PERIODIC:
            try:
                self._save(done, reason="periodic", request_id=None)
            except CheckpointError as exc:
                # One missed periodic save costs a little work; a crash would cost the whole run.
                self._link.report_failure(exc, periodic=True)
                log.error("periodic checkpoint at step %d failed (%s); training goes on", done, exc)
            return False
        final = level == ranks.STOP
        if request is not None:
            self._handled_request = request.request_id
            reason = "sigterm" if request.reason == "sigterm" else "final" if request.final else "request"
            request_id: str | None = request.request_id
        else:
            reason, request_id = ("final" if final else "request"), None
        exclude = self._exclude_for(request)
        try:
            self._save(done, reason=reason, request_id=request_id, for_peer=request is None, exclude=exclude)
        except CheckpointError as exc:
            # Tell spotd now, so it stops waiting for this trainer instead of burning the deadline.
            self._link.report_failure(exc, periodic=False)
            if final:
                raise  # the instance is going away with nothing saved: say so, loudly
            log.error("the checkpoint spotd asked for at step %d failed (%s); training goes on", done, exc)
            return False
        if not final:
            return False
        timeout_s = max(0.0, float(request.seconds_left())) if request is not None else signals.peer_grace_s()
        # With no daemon configured there is nothing to wait for: the local save is all there is.
        if not self.wait_durable(timeout=timeout_s):
            log.warning(
                "checkpoint at step %d not confirmed durable within %.1fs; stopping anyway",
                done,
                timeout_s,
            )
        return True

    def save(self, step: int) -> SaveInfo:
        """Save now, as if ``step`` steps are done (the value :meth:`restore` will return)."""
        return self._save(step, reason="manual", request_id=None)

    def finish(self, step: int | None = None, *, timeout: float = FINISH_TIMEOUT_S) -> bool:
        """The training is done: save the final checkpoint, wait for it to be durable, and tell spotd, which
        marks the job Completed (so no new instance trains it again) and does ``policy.on_complete``.

        ``step`` is the steps done, by default one past the last step given to :meth:`step`. Collective with
        several ranks: every rank saves and waits, then rank 0 tells spotd. True once spotd says the job is
        Completed; False without a daemon (the final checkpoint is on disk all the same) or when it refused.
        """
        done = self._last_step_done if step is None else step
        if done is None:
            raise ValueError("finish() needs the number of steps done: call step() first or pass step=")
        self._save(done, reason="final", request_id=None)
        durable = self.wait_durable(timeout=timeout)
        if not durable:
            log.warning(
                "the final checkpoint at step %d is not confirmed durable within %.1fs", done, timeout
            )
        if self._agreement is not None and not ranks.all_ok(durable):
            durable = False
        if self._rank not in (None, 0) or not durable or not self._link.expected():
            return False
        answer = self._link.finished(done, timeout=timeout)
        if answer is None or not answer.get("ok"):
            log.warning(
                "spotd did not mark the job completed: %s", (answer or {}).get("message", "no answer")
            )
            return False
        log.info("job %s at step %d: %s", answer.get("status"), done, answer.get("checkpoint"))
        return True

    def wait_durable(self, timeout: float | None = None) -> bool:
        """True once the daemon committed the last save; at once without a daemon (nothing to wait for).

        While the daemon is away this keeps waiting (the client re-sends the save when it is back) until
        ``timeout``; with ``timeout=None`` it returns False at once rather than hang on a daemon that is gone.
        """
        if self._pending_step is None:
            return True  # nothing saved since the last durable one, or no daemon (saves count as durable)
        durable = self._link.wait_durable(timeout)
        if durable:
            self._mark_durable(self._pending_step)
            self._apply_retention()
        return durable

    def close(self) -> None:
        """Disconnect from the daemon if this Checkpointer connected itself."""
        self._link.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- saving ------------------------------------------------------------------------------------

    def _due(self, done: int) -> bool:
        if self._every_steps is not None and done % self._every_steps == 0:
            return True
        return self._every_s is not None and time.monotonic() - self._last_save_t >= self._every_s

    def _exclude_for(self, request: Any) -> frozenset[str]:
        """What this requested save leaves out: ``emergency_exclude`` when spotd says the whole upload will
        not fit (on every rank when any rank was told so: the ranks must restore alike), else nothing."""
        fits = getattr(request, "fits", None) if request is not None else None
        slim = fits is False and bool(self._emergency_exclude)
        if self._agreement is not None:
            slim = not ranks.all_ok(not slim)  # collective: every rank is saving this step
        if fits is False and not self._emergency_exclude:
            log.warning(
                "spotd estimates the upload of this checkpoint takes %.1fs with %.1fs left; saving it whole "
                "(give Checkpointer emergency_exclude=('optimizer',) to save less when time is short)",
                float(getattr(request, "estimate_seconds", None) or 0.0),
                request.seconds_left(),
            )
        if not slim:
            return frozenset()
        if request is not None:
            log.warning(
                "spotd estimates the whole upload takes %.1fs with %.1fs left: this emergency save leaves "
                "out %s (emergency_exclude)",
                float(getattr(request, "estimate_seconds", None) or 0.0),
                request.seconds_left(),
                ", ".join(sorted(self._emergency_exclude)),
            )
        return self._emergency_exclude

    def _save(
        self,
        step: int,
        *,
        reason: str,
        request_id: str | None,
        for_peer: bool = False,
        exclude: frozenset[str] = frozenset(),
    ) -> SaveInfo:
        started = time.monotonic()
        self._dir.mkdir(parents=True, exist_ok=True)
        if self._sharded:
            final_path = self._dir / sharded.directory_name(step)
        else:
            final_path = self._dir / files.filename(step, rank=self._rank, world_size=self._world_size)
        if self._last_saved_step == step and final_path.exists() and not exclude:
            # Asked again at a step already on disk (periodic save, then a request): report, don't rewrite.
            size = final_path.stat().st_size
        elif self._sharded:
            # An asked-for (emergency) save's directory is announced by its reporter (local rank 0) before
            # anything is written into it: spotd uploads each shard the moment it is closed. Other ranks'
            # shards are written only after DCP's planning collective, which the reporter joins after this.
            announce_dir: Callable[[], None] | None = None
            if reason != "periodic" and self._topology.local_rank == 0:
                final = reason == "sigterm" or (for_peer and reason == "final")

                def _announce_dir() -> None:
                    self._link.announce(final_path, None, step, final=final, directory=True, shared=True)

                announce_dir = _announce_dir
            # Collective: every rank writes its shard, rank 0 the .metadata last.
            size = sharded.save(
                final_path,
                self._parts,
                step=step,
                rank=self._rank,
                world_size=self._world_size,
                saved_at=time.time(),
                before_write=announce_dir,
            )
        else:
            # An asked-for (emergency) save is announced first: spotd uploads its parts while it is written.
            announce: Callable[[Path], None] | None = None
            if reason != "periodic":
                final = reason == "sigterm" or (for_peer and reason == "final")

                def _announce(temp: Path) -> None:
                    self._link.announce(final_path, temp, step, final=final)

                announce = _announce

            size = files.write_atomic(
                final_path,
                build_payload(
                    self._parts,
                    step=step,
                    rank=self._rank,
                    world_size=self._world_size,
                    saved_at=time.time(),
                    exclude=exclude,
                ),
                before_write=announce,
            )
        self._last_save_t = time.monotonic()
        self._last_saved_step = step
        # A sharded directory is one checkpoint per node: its local rank 0 reports it and keeps it.
        reporter = not self._sharded or self._topology.local_rank == 0
        relative = str(final_path)
        if reporter:
            # The client tracks only the last report: learn whether the previous one became durable first.
            self._refresh_durable()
            relative = self._link.report(
                final_path, step, final=for_peer and reason == "final", shared=self._sharded
            )
        # A save made while the daemon is away is not durable: the client re-sends it on reconnect.
        expected = reporter and self._link.expected()
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
            excluded=tuple(sorted(exclude)),
        )
        log.info("saved %s (%d bytes, %.3fs, %s)", final_path, size, info.seconds, reason)
        if self._on_save is not None:
            self._on_save(info)
        return info

    def _mark_durable(self, step: int) -> None:
        for local in self._by_step.values():
            if local.step <= step:
                local.durable = True
        if self._pending_step is not None and self._pending_step <= step:
            self._pending_step = None

    def _refresh_durable(self) -> None:
        if self._pending_step is not None and self._link.wait_durable(0):
            self._mark_durable(self._pending_step)

    def _apply_retention(self) -> None:
        """Keep the newest ``keep`` files; an older one goes only once it or a newer one is durable."""
        if self._sharded and self._topology.local_rank != 0:
            return  # the node's sharded directories are local rank 0's to delete
        for local in files.expired(self._by_step.values(), keep=self._keep):
            try:
                if local.path.is_dir():
                    sharded.remove(local.path)
                else:
                    local.path.unlink(missing_ok=True)
            except OSError as exc:
                log.warning("could not delete old checkpoint %s: %s", local.path, exc)
                continue
            del self._by_step[local.step]


def _check_exclude(
    names: Sequence[str],
    *,
    optimizer: Any,
    scheduler: Any,
    scaler: Any,
    state: Mapping[str, Stateful],
    sharded: bool,
) -> frozenset[str]:
    """``emergency_exclude`` checked against what this Checkpointer saves; ValueError naming the fix."""
    if isinstance(names, str):
        raise ValueError(f"emergency_exclude={names!r}: give a sequence of names, e.g. ('optimizer',)")
    chosen = frozenset(names)
    if not chosen:
        return chosen
    if sharded:
        raise ValueError(
            "emergency_exclude is not supported with sharded=True (a sharded checkpoint is written by every "
            "rank at once); fix: leave it out"
        )
    if "model" in chosen:
        raise ValueError(
            "emergency_exclude may not name 'model': the weights are what an emergency save keeps; fix: "
            "name what may be left out, e.g. ('optimizer',)"
        )
    given = {"optimizer": optimizer, "scheduler": scheduler, "scaler": scaler}
    known = {k for k, v in given.items() if v is not None} | set(state)
    unknown = chosen - known
    if unknown:
        raise ValueError(
            f"emergency_exclude names {sorted(unknown)}, which this Checkpointer does not save; fix: use "
            f"some of {sorted(known)}"
        )
    return chosen
