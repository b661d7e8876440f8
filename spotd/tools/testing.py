"""Helpers the demo, the test suite and the benchmarks share: a subprocess's JSON log lines read on a thread,
a free loopback port, waiting on a condition under a deadline (never a fixed sleep), and moto's S3/EC2
server on loopback.

Standard library only, so a benchmark that snapshots spotd/ can import it from the snapshot.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping
from typing import IO, Any, TypeVar

__all__ = ["LineReader", "free_port", "start_moto", "wait_until"]

T = TypeVar("T")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the kernel's choice)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_until(
    predicate: Callable[[], T], *, timeout_s: float = 10.0, interval_s: float = 0.02, what: str = ""
) -> T:
    """Poll ``predicate`` until it returns something truthy; :class:`TimeoutError` naming ``what`` after
    ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:g}s waiting for {what or predicate}")
        time.sleep(interval_s)


def start_moto(
    *, env: Mapping[str, str] | None = None, timeout_s: float = 30.0
) -> tuple[subprocess.Popen[bytes], str]:
    """moto's server mode (S3, EC2, …) on a free loopback port, answering; returns it and its endpoint URL.
    The caller stops it (``kill()``, ``wait()``). RuntimeError when it exits or stays silent."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=None if env is None else dict(env),
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(endpoint + "/moto-api/", timeout=1):
                return proc, endpoint
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                proc.wait(10)
                raise RuntimeError(
                    f"moto server on port {port} did not start (exit {proc.returncode})"
                ) from None
            time.sleep(0.05)


def _trailing_object(line: str) -> dict[str, Any] | None:
    """The JSON object that ``line`` is, or that ends it after another writer's text; None if neither."""
    decoder = json.JSONDecoder()
    start = 0
    while (start := line.find("{", start)) != -1:
        try:
            value, end = decoder.raw_decode(line, start)
        except ValueError:
            start += 1
            continue
        if isinstance(value, dict) and not line[end:].strip():
            return value
        start += 1
    return None


class LineReader:
    """Reads a text pipe on a daemon thread, so a waiter never blocks on read() and every wait has a deadline.

    ``on_line`` sees each line as it arrives (the demo echoes a trainer's output). JSON object lines — spotd's
    structlog output, a trainer's event lines — are available parsed through :meth:`json` and :meth:`events`.
    """

    __slots__ = ("_cond", "_on_line", "_thread", "lines")

    def __init__(self, stream: IO[str], *, on_line: Callable[[str], None] | None = None) -> None:
        self.lines: list[str] = []
        self._on_line = on_line
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream: IO[str]) -> None:
        for raw in iter(stream.readline, ""):
            line = raw.rstrip("\n")
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()
            if self._on_line is not None:
                self._on_line(line)
        stream.close()

    def json(self) -> list[dict[str, Any]]:
        """Every line that ends in a JSON object, in order; other lines (tracebacks, prints) are skipped.

        "Ends in": processes that share one pipe (torchrun's ranks) interleave their writes, and a print()
        is two of them, the text and its newline. An event written in one write() after another process's
        text but before that text's newline lands at the end of that line."""
        out = []
        for line in list(self.lines):
            value = _trailing_object(line)
            if value is not None:
                out.append(value)
        return out

    def events(self, name: str | None = None, *, key: str = "event") -> list[dict[str, Any]]:
        """JSON lines whose ``key`` equals ``name`` (with ``name`` None: every line that has ``key``)."""
        if name is None:
            return [e for e in self.json() if key in e]
        return [e for e in self.json() if e.get(key) == name]

    def wait(self, predicate: Callable[[list[dict[str, Any]]], T], *, timeout_s: float, what: str) -> T:
        """Wait until ``predicate(self.events())`` is truthy and return it; :class:`TimeoutError` after
        ``timeout_s``. Wakes on every new line rather than polling."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                found = predicate(self.events())
                if found:
                    return found
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")
                self._cond.wait(min(left, 0.1))

    def join(self, timeout_s: float = 5.0) -> None:
        """Wait for the pipe to close (the process exited) so ``lines`` is complete."""
        self._thread.join(timeout_s)
