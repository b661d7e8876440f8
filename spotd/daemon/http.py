"""The daemon's HTTP endpoint: ``/metrics`` for Prometheus and ``/healthz`` for load balancers and people.

``/healthz`` is 503 while IMDS has not answered for three poll intervals: the daemon would not see a notice.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.aiohttp import make_aiohttp_handler

from spotd.errors import ConfigError
from spotd.logs import get_logger

__all__ = ["MetricsServer", "healthy"]

log = get_logger("spotd.http")


def healthy(
    *, imds_last_ok: float | None, now: float, poll_interval_s: float, imds_timeout_s: float
) -> tuple[bool, float | None]:
    """Whether IMDS answered recently enough to see a notice, and how many seconds ago it last did."""
    age = None if imds_last_ok is None else now - imds_last_ok
    limit = max(3 * poll_interval_s, 3 * imds_timeout_s)
    return age is not None and age <= limit, age


class MetricsServer:
    """``start()`` listens on ``listen`` (``host:port``; port 0 picks one, see :attr:`port`); ``close()``.

    A port that cannot be bound raises :class:`ConfigError` naming ``metrics.listen``.
    """

    __slots__ = (
        "_clock",
        "_imds_last_ok",
        "_imds_timeout_s",
        "_listen",
        "_phase",
        "_poll_interval_s",
        "_registry",
        "_runner",
        "port",
    )

    def __init__(
        self,
        *,
        listen: str,
        registry: CollectorRegistry,
        phase: Callable[[], str],
        imds_last_ok: Callable[[], float | None],
        poll_interval_s: float,
        imds_timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._listen = listen
        self._registry = registry
        self._phase = phase
        self._imds_last_ok = imds_last_ok
        self._poll_interval_s = poll_interval_s
        self._imds_timeout_s = imds_timeout_s
        self._clock = clock
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    async def start(self) -> None:
        host, _, port = self._listen.rpartition(":")
        host = host.strip("[]") or "0.0.0.0"
        app = web.Application()
        # prometheus_client's own handler: content negotiation (text or OpenMetrics) and compression.
        app.router.add_get("/metrics", make_aiohttp_handler(self._registry))
        app.router.add_get("/healthz", self._handle_health)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        self._runner = runner
        try:
            await web.TCPSite(runner, host, int(port)).start()
        except OSError as exc:
            await self.close()
            # A port someone else holds does not free itself on a restart: a configuration error (78).
            reason = "already in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
            raise ConfigError(
                "metrics.listen",
                f"cannot listen on {self._listen}: {reason}",
                f'stop what holds it (ss -ltnp "sport = :{port}"), set metrics.listen to a free port, '
                'or set it to "" to turn the metrics endpoint off',
            ) from exc
        addresses: list[Any] = runner.addresses
        self.port = int(addresses[0][1]) if addresses else int(port)
        log.info("metrics.listening", host=host, port=self.port)

    async def _handle_health(self, request: web.Request) -> web.Response:
        ok, age = healthy(
            imds_last_ok=self._imds_last_ok(),
            now=self._clock(),
            poll_interval_s=self._poll_interval_s,
            imds_timeout_s=self._imds_timeout_s,
        )
        body = {
            "ok": ok,
            "imds_last_ok_seconds_ago": None if age is None else round(age, 3),
            "phase": self._phase(),
        }
        return web.json_response(body, status=200 if ok else 503)

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
