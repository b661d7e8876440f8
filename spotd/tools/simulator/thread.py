"""The simulator on its own event loop in a daemon thread, for synchronous code and for other loops."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from spotd.tools.simulator.server import ImdsSimulator

__all__ = ["SimulatorThread"]

T = TypeVar("T")


class SimulatorThread:
    """An :class:`ImdsSimulator` on its own event loop in a daemon thread, for sync code and other loops.

    Control methods are thread-safe: each runs on the simulator's loop and returns when done."""

    __slots__ = ("_error", "_loop", "_ready", "_sim", "_thread")

    def __init__(self, **kwargs: Any) -> None:
        self._sim = ImdsSimulator(**kwargs)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def start(self, *, timeout_s: float = 10.0) -> None:
        self._thread = threading.Thread(target=self._run, name="imds-simulator", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise RuntimeError(f"IMDS simulator did not start within {timeout_s}s")
        if self._error is not None:
            raise RuntimeError(f"IMDS simulator failed to start: {self._error}") from self._error

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        # aiohttp's server looks the loop up with get_event_loop() in places.
        asyncio.set_event_loop(loop)
        self._loop = loop
        try:
            loop.run_until_complete(self._sim.start())
        except BaseException as exc:  # reported to start() in the caller's thread
            self._error = exc
            self._ready.set()
            asyncio.set_event_loop(None)
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(self._sim.close())
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            asyncio.set_event_loop(None)
            loop.close()

    def close(self, *, timeout_s: float = 10.0) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout_s)
        self._thread = None

    def __enter__(self) -> SimulatorThread:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, fn: Callable[[], T], *, timeout_s: float = 5.0) -> T:
        loop = self._loop
        if loop is None:
            raise RuntimeError("the simulator is not running; call start() first")
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)

        loop.call_soon_threadsafe(run)
        return future.result(timeout_s)

    @property
    def url(self) -> str:
        return self._sim.url

    @property
    def port(self) -> int:
        return self._sim.port

    @property
    def simulator(self) -> ImdsSimulator:
        """The simulator itself; touch it only through this thread's methods from other threads."""
        return self._sim

    def arm_instance_action(
        self, action: str = "terminate", *, after_s: float = 0.0, lead_s: float = 120.0, moving: bool = False
    ) -> None:
        self._call(
            lambda: self._sim.arm_instance_action(action, after_s=after_s, lead_s=lead_s, moving=moving)
        )

    def arm_rebalance(self, *, after_s: float = 0.0) -> None:
        self._call(lambda: self._sim.arm_rebalance(after_s=after_s))

    def add_maintenance(
        self, code: str, *, not_before_s: float, event_id: str | None = None, state: str = "active"
    ) -> str:
        return self._call(
            lambda: self._sim.add_maintenance(code, not_before_s=not_before_s, event_id=event_id, state=state)
        )

    def set_fault(self, mode: str | None, *, count: int | None = None) -> None:
        self._call(lambda: self._sim.set_fault(mode, count=count))

    def set_identity(
        self,
        *,
        instance_id: str | None = None,
        instance_type: str | None = None,
        availability_zone: str | None = None,
        life_cycle: str | None = None,
    ) -> None:
        self._call(
            lambda: self._sim.set_identity(
                instance_id=instance_id,
                instance_type=instance_type,
                availability_zone=availability_zone,
                life_cycle=life_cycle,
            )
        )

    def set_require_token(self, value: bool) -> None:
        def apply() -> None:
            self._sim.require_token = value

        self._call(apply)

    def clear(self) -> None:
        self._call(self._sim.clear)

    def state(self) -> dict[str, Any]:
        return self._call(self._sim.state)
