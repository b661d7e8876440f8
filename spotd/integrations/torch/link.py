"""The Checkpointer's view of spotd: the part of a :class:`spotd.client.Guard` it uses, and how it finds the
daemon, the checkpoint directory and its own rank."""

from __future__ import annotations

import enum
import logging
import os
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Final, Protocol

from spotd.integrations.torch.ranks import Topology

__all__ = [
    "AUTO",
    "DEFAULT_CHECKPOINT_DIR",
    "CheckpointRequestLike",
    "DaemonLink",
    "Guard",
    "connect",
    "default_socket_path",
    "resolve_dir",
]

log = logging.getLogger("spotd.torch")

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


def connect(
    name: str,
    socket_path: str,
    *,
    handle_sigterm: bool | None = None,
    topology: Topology | None = None,
    run_id: str | None = None,
) -> Guard:
    import spotd.client

    where = topology or Topology()
    guard: Guard = spotd.client.connect(
        name=name,
        socket_path=socket_path,
        handle_sigterm=handle_sigterm,
        rank=where.rank,
        world_size=where.world_size,
        local_rank=where.local_rank,
        local_world_size=where.local_world_size,
        node_rank=where.node_rank,
        run_id=run_id,
    )
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


class DaemonLink:
    """What the Checkpointer says to spotd and hears from it, through a guard that may be absent, gone, or a
    test's own object: none of the daemon's trouble ever becomes an exception in the training loop."""

    __slots__ = ("_daemon_seen", "_owned", "_socket_path", "guard")

    def __init__(self, *, guard: Guard | None, socket_path: str | None, owned: bool) -> None:
        self.guard = guard
        self._socket_path = socket_path
        self._owned = owned
        # Sticky: once a daemon is known to exist, a save is durable only when it says so.
        self._daemon_seen = False

    def connected(self) -> bool:
        if self.guard is None:
            return False
        try:
            return bool(self.guard.connected)
        except Exception:
            return False

    def notice_connection(self) -> None:
        # Cheap to read every step, so a short-lived connection is not missed.
        if not self._daemon_seen and self.connected():
            self._daemon_seen = True

    def expected(self) -> bool:
        """Whether saves must wait for the daemon's word: a daemon was connected once or its socket exists.

        Only with no daemon configured at all do saves count as durable at once (plain checkpointing).
        """
        if self._daemon_seen:
            return True
        guard = self.guard
        if guard is None:
            return False
        seen = self.connected()
        if not seen:
            try:
                seen = bool(getattr(guard, "ever_connected", False))
            except Exception:
                seen = False
        if not seen and self._socket_path:
            seen = os.path.exists(self._socket_path)
        self._daemon_seen = seen
        return seen

    def pending_request(self, handled: str | None) -> CheckpointRequestLike | None:
        """The open request, unless it is ``handled`` (the client keeps showing one after it was answered)."""
        guard = self.guard
        if guard is None:
            return None
        try:
            if not guard.checkpoint_requested:
                return None
            request = guard.request
        except Exception as exc:
            log.warning("reading the spotd request failed: %s", exc)
            return None
        if request is None or request.request_id == handled:
            return None
        return request

    def announce(
        self,
        path: Path,
        temp: Path | None,
        step: int,
        *,
        final: bool = False,
        directory: bool = False,
        shared: bool = False,
    ) -> None:
        """Tell spotd a save of ``step`` is about to be written to ``temp`` (then renamed to ``path``), or
        straight to ``path`` when ``temp`` is None: its upload may start while it is written. A
        ``directory`` (created already) has each of its files uploaded as it is closed. Nothing when the
        daemon does not take it."""
        guard = self.guard
        writing = getattr(guard, "writing", None)
        daemon_dir = guard.checkpoint_dir if guard is not None else None
        if not callable(writing) or not daemon_dir:
            return
        root = Path(daemon_dir).resolve()
        try:
            # The directory holding it exists; the file itself may not yet.
            relative = path.parent.resolve().relative_to(root) / path.name
            flags: dict[str, Any] = {"final": final}
            if temp is not None:
                flags["temp"] = str(relative.parent / temp.name)
            if directory:
                flags.update(directory=True, shared=shared)
            writing(str(relative), step, **flags)
        except Exception as exc:  # only a head start: report() still follows
            log.debug("telling spotd about the save of step %s failed: %s", step, exc)

    def report(self, path: Path, step: int, *, final: bool = False, shared: bool = False) -> str:
        """Tell spotd about a save; returns the path as told (relative to the daemon's checkpoint_dir)."""
        guard = self.guard
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
                # final: asked on another rank, maybe another node: this node's spotd must upload it now.
                # shared: a sharded directory holding every rank's part.
                flags = {k: True for k, v in (("final", final), ("shared", shared)) if v}
                guard.saved(relative, step=step, **flags)
            except Exception as exc:
                log.warning("telling spotd about %s failed: %s", relative, exc)
        return relative

    def report_failure(self, exc: Exception, *, periodic: bool) -> None:
        failed = getattr(self.guard, "failed", None)
        if not callable(failed):
            return
        try:
            if periodic:
                failed(str(exc), periodic=True)
            else:
                failed(str(exc))
        except Exception as report_exc:
            log.warning("telling spotd about the failed save failed: %s", report_exc)

    def wait_durable(self, timeout: float | None) -> bool:
        """The daemon's confirmation of the last save; rides out a disconnect until ``timeout`` runs out."""
        deadline = None if timeout is None else time.monotonic() + timeout
        remaining = timeout
        while True:
            guard = self.guard
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
            if remaining is None or remaining <= 0 or self.connected():
                return False
            time.sleep(min(0.05, remaining))
            assert deadline is not None
            remaining = max(0.0, deadline - time.monotonic())

    def finished(self, step: int, *, timeout: float) -> dict[str, Any] | None:
        """Tell spotd the job is done; its answer, or None (no daemon, an old client, or no answer)."""
        finished = getattr(self.guard, "finished", None)
        if not callable(finished):
            return None
        try:
            answer = finished(step, timeout=timeout)
        except Exception as exc:
            log.warning("telling spotd the job finished failed: %s", exc)
            return None
        return answer if isinstance(answer, dict) else None

    def close(self) -> None:
        """Disconnect, if the Checkpointer connected the guard itself."""
        if self._owned and self.guard is not None:
            self.guard.close()
            self.guard = None
