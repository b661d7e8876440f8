"""SIGTERM as a last-chance checkpoint request. Stdlib only.

systemd stops the training unit before spotd on ``systemctl restart spotd``, a reboot or a shutdown, and
torchrun forwards SIGTERM to its workers: each time the trainer gets SIGTERM first and then, after the unit's
``TimeoutStopSec``, SIGKILL. The handler installed here saves nothing itself (a signal handler may interrupt
anything, a ``torch.save`` included): it only marks every guard of this process as asked for a final
checkpoint, which the training loop's next ``checkpoint_requested`` check sees like a spot notice. Then it
calls whatever handler was installed before (a framework's or the user's), so both see the signal.

A second SIGTERM, more than :data:`REPEAT_WINDOW_S` after the first, means "really stop now": with no
earlier handler to call, the default action (terminate) runs. One inside the window is the same stop
arriving twice (systemd signalling the whole cgroup while torchrun forwards its own copy). Forked children
(data loader workers) get the earlier handler back, so they still die on SIGTERM as they did before spotd.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import weakref
from collections.abc import Callable
from types import FrameType
from typing import Any, Final

__all__ = ["DEFAULT_GRACE_S", "install", "installed", "reinstate", "sigterm_enabled", "sigterm_grace_s"]

log = logging.getLogger("spotd.client")

#: How long a trainer waits for its last-chance save to become durable: inside spotd-train@.service's
#: TimeoutStopSec (75 s) with room for the save itself. torchrun needs --shutdown-timeout above it.
DEFAULT_GRACE_S: Final = 60.0
#: SIGTERMs this close together are one stop, not a request to stop harder.
REPEAT_WINDOW_S: Final = 2.0

_Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None

_lock = threading.Lock()
_previous: _Handler = None
_installed = False
_installed_pid = 0
_received = 0
_first_at = 0.0
#: Weak, so a guard nobody holds any more is not kept alive by the handler.
_targets: list[weakref.WeakMethod[Callable[[], None]]] = []


def sigterm_enabled(argument: bool | None) -> bool:
    """``argument``, else ``$SPOTD_HANDLE_SIGTERM`` (0/false/no/off turn it off), else on."""
    if argument is not None:
        return argument
    return os.environ.get("SPOTD_HANDLE_SIGTERM", "").strip().lower() not in ("0", "false", "no", "off")


def sigterm_grace_s(argument: float | None) -> float:
    """``argument``, else ``$SPOTD_SIGTERM_GRACE`` (seconds), else :data:`DEFAULT_GRACE_S`."""
    if argument is not None:
        return float(argument)
    return env_seconds("SPOTD_SIGTERM_GRACE", DEFAULT_GRACE_S)


def peer_grace_s() -> float:
    """How long a rank that was not asked itself (a peer rank, or another node, was) waits for its final
    save to be durable: ``$SPOTD_PEER_GRACE`` (seconds), else :data:`DEFAULT_GRACE_S`. A node whose spotd
    died rides out the disconnect this long (systemd restarts spotd, the save is sent again)."""
    return env_seconds("SPOTD_PEER_GRACE", DEFAULT_GRACE_S)


def env_seconds(name: str, default: float) -> float:
    """A positive number of seconds from the environment variable ``name``, else ``default`` (a value
    that is not one is named in a warning)."""
    raw = os.environ.get(name, "").strip()
    try:
        value = float(raw) if raw else default
    except ValueError:
        log.warning("%s=%r is not a number of seconds; using %.0f", name, raw, default)
        return default
    return value if value > 0 else default


def installed() -> bool:
    return _installed


def install(on_sigterm: Callable[[], None]) -> bool:
    """Have SIGTERM call the bound method ``on_sigterm`` (then the earlier handler). False when it cannot be
    installed here: Python lets only the main thread set signal handlers."""
    global _installed, _installed_pid, _previous
    ref = weakref.WeakMethod(on_sigterm)
    with _lock:
        if _installed:
            _targets.append(ref)
            return True
        if threading.current_thread() is not threading.main_thread():
            return False
        _targets.append(ref)
        _previous = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, _handle)
        _installed = True
        _installed_pid = os.getpid()
        return True


def reinstate() -> bool:
    """Make spotd's handler the process's SIGTERM handler again after a framework put its own in front of it
    (Lightning does when ``fit`` starts, and runs a collective inside it). The handler spotd found at install
    time is still called after spotd's; the framework's is not. False when spotd's was never installed here,
    or outside the main thread."""
    with _lock:
        if not _installed or _installed_pid != os.getpid():
            return False
        if threading.current_thread() is not threading.main_thread():
            return False
        signal.signal(signal.SIGTERM, _handle)
        return True


def remove(on_sigterm: Callable[[], None]) -> None:
    """Stop telling ``on_sigterm`` (a closed guard); the handler stays, cheap and harmless."""
    with _lock:
        _targets[:] = [r for r in _targets if r() is not None and r() != on_sigterm]


def _handle(signum: int, frame: FrameType | None) -> None:
    global _received, _first_at
    if os.getpid() != _installed_pid:
        # A forked child hit by SIGTERM before its after-fork hook put the old handler back.
        _default_action(signum, frame)
        return
    now = time.monotonic()
    if _received and now - _first_at < REPEAT_WINDOW_S:
        return  # the same stop, delivered twice
    if not _received:
        _first_at = now
    _received += 1
    # No lock: a handler runs between two bytecodes of the main thread, which may hold it right now.
    for ref in list(_targets):
        target = ref()
        if target is None:
            continue
        try:
            target()
        except Exception:  # a guard's trouble must not swallow the signal
            log.exception("spotd's SIGTERM handler failed for one guard")
    previous = _previous
    if callable(previous):
        previous(signum, frame)
    elif _received > 1 and previous in (signal.SIG_DFL, None):
        log.warning("second SIGTERM: stopping without waiting for the last-chance checkpoint")
        _default_action(signum, frame)
    elif _received == 1:
        log.warning("SIGTERM: saving a last-chance checkpoint at the next step, then stopping")


def _default_action(signum: int, frame: FrameType | None) -> None:
    previous = _previous
    if callable(previous):
        previous(signum, frame)
        return
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


def after_fork_in_child() -> None:
    """A forked child is not a trainer: it gets the handler it had before spotd, and no targets."""
    global _installed, _received
    _targets.clear()
    _received = 0
    if not _installed:
        return
    _installed = False
    try:
        signal.signal(signal.SIGTERM, _previous if _previous is not None else signal.SIG_DFL)
    except (ValueError, OSError):  # forked from a thread other than the main one: nothing to undo there
        pass
