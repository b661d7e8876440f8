"""The training process's link to spotd: :class:`Guard` and :func:`connect`. Stdlib only."""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
import weakref
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, Final

from spotd import protocol
from spotd.client import signals
from spotd.client.request import CheckpointRequest
from spotd.client.wire import Wire, open_wire
from spotd.errors import ProtocolError

__all__ = ["Guard"]

#: Longest a training step can be held up by a stuck daemon on one write; also the reader's poll.
_IO_TIMEOUT_S: Final = 0.5
_HANDSHAKE_TIMEOUT_S: Final = 2.0
_JOIN_TIMEOUT_S: Final = 3.0
_ANSWERED_KEEP: Final = 256

log = logging.getLogger("spotd.client")


class Guard:
    """A training process's link to spotd. Cheap to poll; never raises because spotd is gone.

    ``request`` is the most recent checkpoint request; it stays set after ``saved()`` (so a trainer can
    read ``request.final``) while ``checkpoint_requested`` goes back to False.
    """

    __slots__ = (
        "__weakref__",
        "_answered",
        "_checkpoint_dir",
        "_closed",
        "_cond",
        "_connected",
        "_ever_connected",
        "_finished_q",
        "_hello",
        "_inert",
        "_interval_s",
        "_last_save",
        "_path",
        "_request",
        "_requested",
        "_save_state",
        "_send_lock",
        "_sigterm",
        "_sigterm_answered",
        "_sigterm_grace_s",
        "_status_lock",
        "_status_q",
        "_stop",
        "_thread",
        "_welcome",
        "_wire",
    )

    def __init__(
        self,
        *,
        socket_path: str,
        name: str,
        rank: int | None,
        world_size: int | None,
        reconnect_interval_s: float,
        sigterm_grace_s: float = signals.DEFAULT_GRACE_S,
        placement: Mapping[str, int | str | None] | None = None,
    ) -> None:
        """``placement``: local_rank, local_world_size, node_rank, run_id, said in hello when known."""
        self._path = socket_path
        self._hello = protocol.hello(
            name=name,
            pid=os.getpid(),
            rank=rank,
            world_size=world_size,
            role="trainer",
            placement=placement,
        )
        self._interval_s = reconnect_interval_s
        self._cond = threading.Condition()
        self._send_lock = threading.Lock()
        self._status_lock = threading.Lock()
        self._status_q: queue.SimpleQueue[dict[str, Any] | None] = queue.SimpleQueue()
        self._finished_q: queue.SimpleQueue[dict[str, Any] | None] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._wire: Wire | None = None
        self._connected = False
        self._ever_connected = False
        self._welcome: dict[str, Any] | None = None
        self._checkpoint_dir: str | None = None
        self._request: CheckpointRequest | None = None
        self._requested = False
        self._answered: dict[str, None] = {}  # insertion-ordered set of request ids already answered
        self._last_save: dict[str, Any] | None = None
        self._save_state = "none"  # none | pending | durable | failed
        self._inert = False
        self._closed = False
        # Set from the SIGTERM handler (plain attribute writes only): a last-chance request of our own.
        self._sigterm: CheckpointRequest | None = None
        self._sigterm_answered = False
        self._sigterm_grace_s = sigterm_grace_s
        _GUARDS.add(self)

    # -- what a training loop reads ----------------------------------------------------------------

    @property
    def checkpoint_requested(self) -> bool:
        return (self._requested or self._sigterm_pending()) and not self._inert

    @property
    def request(self) -> CheckpointRequest | None:
        if self._inert:
            return None
        if self._sigterm_pending() and not (self._requested and self._request and self._request.final):
            return self._sigterm
        return self._request

    @property
    def sigterm_received(self) -> bool:
        """SIGTERM arrived (and spotd's handler is installed): the loop should save and stop."""
        return self._sigterm is not None

    @property
    def connected(self) -> bool:
        return self._connected and not self._inert

    @property
    def checkpoint_dir(self) -> str | None:
        return self._checkpoint_dir

    @property
    def welcome(self) -> dict[str, Any] | None:
        return self._welcome

    @property
    def ever_connected(self) -> bool:
        """A daemon answered at least once: from then on a save is durable only when it says so."""
        return self._ever_connected

    @property
    def socket_path(self) -> str:
        return self._path

    # -- what a training loop calls ----------------------------------------------------------------

    def saved(
        self,
        path: str | os.PathLike[str],
        step: int | None = None,
        *,
        final: bool = False,
        shared: bool = False,
    ) -> None:
        """Report a checkpoint written under ``checkpoint_dir`` (relative, or absolute inside it).

        ``final=True``: this process was not asked, but a peer rank (maybe on another node) was, and the job
        stops after this save; the daemon uploads it at once, as it would its own final request.
        ``shared=True``: the path holds every rank's part (a sharded checkpoint directory), so the daemon
        commits it as one checkpoint rather than as this rank's."""
        if step is not None and (isinstance(step, bool) or not isinstance(step, int)):
            raise TypeError(f"step must be an int or None, not {type(step).__name__}")
        if self._inert:
            return
        with self._cond:
            request_id, last_chance = self._take_request()
            # Not asked (SIGTERM, or a peer rank was): say why, so the daemon uploads it at once.
            why = "sigterm" if last_chance else "peer" if final and request_id is None else None
            frame = protocol.saved(
                request_id=request_id,
                path=os.fspath(path),
                step=step,
                final=True if why else protocol.OMIT,
                reason=why or protocol.OMIT,
                shared=True if shared else protocol.OMIT,
            )
            self._last_save = frame
            self._save_state = "pending"
        self._send(frame)

    def writing(
        self,
        path: str | os.PathLike[str],
        step: int | None = None,
        *,
        temp: str | os.PathLike[str] | None = None,
        final: bool = False,
        directory: bool = False,
        shared: bool = False,
    ) -> bool:
        """Say a save is about to be written, before writing it: ``path`` as :meth:`saved` will report it,
        ``temp`` where its bytes go first when they are renamed into place. For an emergency save the
        daemon then uploads its parts while they are written; :meth:`saved` still has to follow (nothing
        is committed before it). Sent only when the daemon said it takes it; True when sent.

        ``directory=True``: ``path`` (or ``temp``) is a directory, already created, about to be filled
        (a sharded or framework checkpoint); the daemon uploads each file the moment it is closed.
        ``shared`` as in :meth:`saved` (the directory holds every rank's part)."""
        if step is not None and (isinstance(step, bool) or not isinstance(step, int)):
            raise TypeError(f"step must be an int or None, not {type(step).__name__}")
        welcome = self._welcome
        wanted = "writing_dirs" if directory else "writing"
        if self._inert or not welcome or not welcome.get(wanted):
            return False
        frame = protocol.writing(
            path=os.fspath(path),
            step=step,
            temp=protocol.OMIT if temp is None else os.fspath(temp),
            final=True if final else protocol.OMIT,
            dir=True if directory else protocol.OMIT,
            shared=True if shared else protocol.OMIT,
        )
        return self._send(frame)

    def failed(self, message: str, *, periodic: bool = False) -> None:
        """Report that the requested checkpoint (or with ``periodic=True``, a save of the trainer's own
        schedule, leaving any open request unanswered) could not be written."""
        if self._inert:
            return
        request_id = None
        if not periodic:
            with self._cond:
                request_id, _ = self._take_request()
        self._send(protocol.failed(request_id=request_id, message=str(message)))

    def wait_durable(self, timeout: float | None = None) -> bool:
        """True once spotd says the last saved checkpoint is in the store.

        False on timeout, when spotd refused it, or when no daemon is connected (a save made while
        disconnected is re-sent on reconnect; call again then).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                if self._inert or self._last_save is None:
                    return False
                # The answer first: a daemon that said durable and then went away did say it.
                if self._save_state != "pending":
                    return self._save_state == "durable"
                if self._closed or not self._connected:
                    return False
                remaining = _IO_TIMEOUT_S if deadline is None else deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)

    def status(self, timeout: float = 5.0) -> dict[str, Any] | None:
        """The daemon's status reply, or None without a daemon or after ``timeout``."""
        if self._inert or not self._connected:
            return None
        with self._status_lock:
            while True:  # a reply that arrived after an earlier call gave up
                try:
                    self._status_q.get_nowait()
                except queue.Empty:
                    break
            if not self._send(protocol.status()):
                return None
            try:
                return self._status_q.get(timeout=timeout)
            except queue.Empty:
                return None

    def finished(self, step: int | None = None, *, timeout: float = 120.0) -> dict[str, Any] | None:
        """The job is done: spotd marks it Completed in the store and then does ``policy.on_complete``.

        ``step`` is the steps done; report its checkpoint with :meth:`saved` first: this waits for it to be
        durable, and spotd refuses to complete a job whose newest durable checkpoint is older. Returns the
        daemon's answer (``ok``, ``status``, ``checkpoint``, ``output``…), or None without a daemon or after
        ``timeout``.
        """
        if step is not None and (isinstance(step, bool) or not isinstance(step, int)):
            raise TypeError(f"step must be an int or None, not {type(step).__name__}")
        if self._inert or not self._connected:
            return None
        deadline = time.monotonic() + timeout
        if self._save_state == "pending":
            self.wait_durable(timeout=timeout)
        while True:  # an answer to an earlier call that gave up
            try:
                self._finished_q.get_nowait()
            except queue.Empty:
                break
        if not self._send(protocol.finished(step=step)):
            return None
        try:
            return self._finished_q.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            return None

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        signals.remove(self.on_sigterm)
        if self._inert:
            return
        wire = self._wire
        if wire is not None:
            wire.shutdown()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(_JOIN_TIMEOUT_S)
        with self._cond:
            self._connected = False
            self._cond.notify_all()

    def __enter__(self) -> Guard:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- internals ---------------------------------------------------------------------------------

    def _take_request(self) -> tuple[str | None, bool]:
        """What a save or failure answers: the daemon's open request id (marked answered) and whether it
        also answers a SIGTERM of our own (then ``request`` stays that final one, so the loop stops)."""
        request = self._request
        request_id: str | None = None
        if self._requested and request is not None:
            self._requested = False
            self._answered[request.request_id] = None
            while len(self._answered) > _ANSWERED_KEEP:
                del self._answered[next(iter(self._answered))]
            request_id = request.request_id
        last_chance = self._sigterm_pending()
        if last_chance:
            self._sigterm_answered = True
            if request is None or request_id is None or not request.final:
                self._request = self._sigterm
        return request_id, last_chance

    def _sigterm_pending(self) -> bool:
        return self._sigterm is not None and not self._sigterm_answered

    def on_sigterm(self) -> None:
        """Called from the signal handler: no locks, no I/O, one attribute write the loop will read."""
        if self._sigterm is None and not self._inert and not self._closed:
            self._sigterm = CheckpointRequest(
                request_id=f"sigterm-{os.getpid()}",
                reason="sigterm",
                deadline=datetime.now(UTC) + timedelta(seconds=self._sigterm_grace_s),
                final=True,
            )

    def start(self) -> BaseException | None:
        """First connection attempt in the caller's thread, then the reader thread; returns why it failed."""
        error: BaseException | None = None
        try:
            wire, welcome = open_wire(self._path, self._hello, time.monotonic() + _HANDSHAKE_TIMEOUT_S)
        except (OSError, ProtocolError) as exc:
            error = exc
        else:
            self._on_connected(wire, welcome)
        self._thread = threading.Thread(
            target=self._run, name=f"spotd-guard-{self._hello['name']}", daemon=True
        )
        self._thread.start()
        return error

    def _on_connected(self, wire: Wire, welcome: dict[str, Any]) -> None:
        wire.sock.settimeout(_IO_TIMEOUT_S)
        with self._cond:
            self._wire = wire
            self._connected = True
            self._ever_connected = True
            self._welcome = welcome
            directory = welcome.get("checkpoint_dir")
            self._checkpoint_dir = directory if isinstance(directory, str) else None
            # The daemon may have restarted and never seen it: say it again.
            resend = self._last_save if self._save_state == "pending" else None
            self._cond.notify_all()
        if resend is not None:
            self._send(resend)

    def _on_disconnected(self, wire: Wire, reason: BaseException) -> None:
        with self._cond:
            if self._wire is wire:
                self._wire = None
            self._connected = False
            self._cond.notify_all()
        wire.close()
        self._status_q.put(None)
        self._finished_q.put(None)
        if not self._closed:
            log.warning("lost the connection to spotd at %s (%s); reconnecting", self._path, reason)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                wire = self._wire
                if wire is None:
                    if self._stop.wait(self._interval_s):
                        break
                    try:
                        wire, welcome = open_wire(
                            self._path, self._hello, time.monotonic() + _HANDSHAKE_TIMEOUT_S
                        )
                    except (OSError, ProtocolError) as exc:
                        log.debug("spotd not reachable at %s: %s", self._path, exc)
                        continue
                    if self._stop.is_set():
                        wire.close()
                        break
                    self._on_connected(wire, welcome)
                    log.info("connected to spotd at %s", self._path)
                    continue
                try:
                    frame = wire.read_frame(None)
                except (OSError, ProtocolError) as exc:
                    self._on_disconnected(wire, exc)
                    continue
                if frame is not None:
                    self._dispatch(frame)
        except Exception:
            # Training must never notice; the guard just stops asking.
            log.exception("spotd client thread failed; checkpoint requests will not be seen")
        finally:
            wire = self._wire
            if wire is not None and not self._inert:
                wire.close()
            with self._cond:
                self._wire = None
                self._connected = False
                self._cond.notify_all()

    def _send(self, frame: dict[str, Any]) -> bool:
        wire = self._wire
        if wire is None or self._inert or self._closed:
            return False
        try:
            data = protocol.encode(frame)
        except ProtocolError as exc:
            log.warning("not sent to spotd: %s", exc)
            return False
        try:
            with self._send_lock:
                wire.sock.sendall(data)
        except OSError as exc:
            # Stuck or gone: drop the connection; the reader thread reconnects and re-sends the save.
            log.warning("sending %r to spotd failed (%s); reconnecting", frame["op"], exc)
            wire.shutdown()
            return False
        return True

    def _dispatch(self, frame: dict[str, Any]) -> None:
        op = frame["op"]
        if op == "checkpoint":
            request_id = frame.get("request_id")
            if not isinstance(request_id, str):
                log.warning("ignoring a checkpoint frame without a request_id: %r", frame)
                return
            with self._cond:
                if request_id in self._answered:
                    return  # re-sent after a reconnect, already saved
                self._request = CheckpointRequest.from_frame(frame)
                self._requested = True
        elif op in ("durable", "error"):
            with self._cond:
                matched = self._matches_last_save(frame)
                if matched:
                    self._save_state = "durable" if op == "durable" else "failed"
                    self._cond.notify_all()
            if op == "error":
                log.warning("spotd error %s: %s", frame.get("code"), frame.get("message"))
                if not matched:
                    self._status_q.put(None)  # it may be the answer to a pending status()
                    self._finished_q.put(None)  # or finished()
        elif op == "status":
            self._status_q.put(frame)
        elif op == "finished":
            self._finished_q.put(frame)

    def _matches_last_save(self, frame: dict[str, Any]) -> bool:
        last = self._last_save
        if last is None or self._save_state != "pending":
            return False
        path = frame.get("path")
        if isinstance(path, str):
            return self._resolve(path) == self._resolve(last["path"])
        request_id = frame.get("request_id")
        return request_id is not None and request_id == last["request_id"]

    def _resolve(self, path: str) -> str:
        if not os.path.isabs(path) and self._checkpoint_dir:
            path = os.path.join(self._checkpoint_dir, path)
        return os.path.normpath(path)

    def _become_inert(self) -> None:
        """In a forked child: the parent's thread is gone and its socket is not ours to write."""
        self._inert = True
        self._requested = False
        self._connected = False
        # Locks may have been held by a parent thread at fork time; never touch them again.
        self._cond = threading.Condition()
        self._send_lock = threading.Lock()
        self._status_lock = threading.Lock()
        self._stop = threading.Event()
        self._stop.set()
        self._thread = None
        wire, self._wire = self._wire, None
        if wire is not None:
            # Closes only the child's copy of the fd, so the daemon still sees the parent's exit.
            wire.close()


_GUARDS: weakref.WeakSet[Guard] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for guard in list(_GUARDS):
        guard._become_inert()
    signals.after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)
