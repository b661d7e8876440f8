"""Progress for ``spotd restore`` / ``list``: one ``\\r``-updated line on a TTY, plain lines otherwise."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

__all__ = ["Progress", "restore_progress"]

_TTY_EVERY_S = 0.1  # redraw at most ten times a second
_LINE_EVERY_S = 10.0  # off a TTY (journald, CI logs) a line every ten seconds is plenty


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    raise AssertionError("unreachable")


class Progress:
    __slots__ = ("_clock", "_done", "_last", "_started", "_tty", "label", "stream", "total")

    def __init__(
        self,
        *,
        total: int,
        label: str,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total = total
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self._clock = clock
        self._tty = self.stream.isatty()
        self._started = clock()
        self._last = float("-inf")
        self._done = 0

    def render(self) -> str:
        elapsed = max(self._clock() - self._started, 1e-9)
        rate = self._done / elapsed
        pct = 100.0 * self._done / self.total if self.total else 100.0
        eta = (self.total - self._done) / rate if rate > 0 else float("inf")
        eta_text = f"{eta:.0f}s" if eta != float("inf") else "?"
        return (
            f"{self.label}: {_human(self._done)} / {_human(self.total)} ({pct:.0f}%) "
            f"{rate / 1e6:.1f} MB/s ETA {eta_text}"
        )

    def set(self, done: int) -> None:
        self._done = done
        now = self._clock()
        if now - self._last < (_TTY_EVERY_S if self._tty else _LINE_EVERY_S) and done < self.total:
            return
        self._last = now
        self._write()

    def update(self, n: int) -> None:
        self.set(self._done + n)

    def _write(self) -> None:
        if self._tty:
            self.stream.write("\r\x1b[K" + self.render())
        else:
            self.stream.write(self.render() + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self._tty:
            self._write()
            self.stream.write("\n")
            self.stream.flush()


def restore_progress(progress: Progress) -> Callable[[int, int], None]:
    """Adapt a Progress to ``restore(progress=...)``, which reports (done, total)."""

    def report(done: int, total: int) -> None:
        progress.total = total
        progress.set(done)

    return report
