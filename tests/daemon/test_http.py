"""The daemon's HTTP endpoint in process: /metrics from the injected registry, /healthz from IMDS's last answer."""

from __future__ import annotations

import socket

import aiohttp
import pytest
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families

from spotd.daemon.http import MetricsServer, healthy
from spotd.errors import ConfigError


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_port_zero_binds_a_free_port_and_serves_the_registry():
    """With port 0 the server reports the port it bound (runner.addresses), and /metrics is the injected registry's exposition."""
    registry = CollectorRegistry()
    Counter("spotd_example", "An example.", registry=registry).inc(3)
    server = MetricsServer(
        listen="127.0.0.1:0",
        registry=registry,
        phase=lambda: "Training",
        imds_last_ok=lambda: None,
        poll_interval_s=1.0,
        imds_timeout_s=1.0,
    )
    await server.start()
    try:
        assert server.port and server.port > 0
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{server.port}/metrics") as resp:
                assert resp.status == 200 and resp.content_type == "text/plain"
                families = {f.name: f for f in text_string_to_metric_families(await resp.text())}
            openmetrics = {"Accept": "application/openmetrics-text; version=1.0.0"}
            async with http.get(f"http://127.0.0.1:{server.port}/metrics", headers=openmetrics) as resp:
                assert resp.content_type == "application/openmetrics-text"
                assert (await resp.text()).endswith("# EOF\n")
    finally:
        await server.close()
    assert families["spotd_example"].samples[0].value == 3


async def test_healthz_follows_imds_last_answer():
    """/healthz is 503 before IMDS ever answered and after three silent poll intervals, 200 in between, and reports the phase."""
    clock = FakeClock()
    last_ok: list[float | None] = [None]
    server = MetricsServer(
        listen="127.0.0.1:0",
        registry=CollectorRegistry(),
        phase=lambda: "Training",
        imds_last_ok=lambda: last_ok[0],
        poll_interval_s=1.0,
        imds_timeout_s=0.5,
        clock=clock,
    )
    await server.start()
    url = f"http://127.0.0.1:{server.port}/healthz"
    seen = []
    try:
        async with aiohttp.ClientSession() as http:
            for ok_at in (None, clock.now - 1.0, clock.now - 3.5):
                last_ok[0] = ok_at
                async with http.get(url) as resp:
                    seen.append((resp.status, await resp.json()))
    finally:
        await server.close()
    assert [status for status, _ in seen] == [503, 200, 503]
    assert seen[1][1] == {"ok": True, "imds_last_ok_seconds_ago": 1.0, "phase": "Training"}
    assert seen[0][1]["imds_last_ok_seconds_ago"] is None


def test_health_limit_is_three_polls_or_three_timeouts():
    """IMDS counts as down after max(3 poll intervals, 3 timeouts) without an answer."""
    assert healthy(imds_last_ok=0.0, now=3.0, poll_interval_s=1.0, imds_timeout_s=0.5) == (True, 3.0)
    assert healthy(imds_last_ok=0.0, now=3.1, poll_interval_s=1.0, imds_timeout_s=0.5)[0] is False
    assert healthy(imds_last_ok=0.0, now=5.9, poll_interval_s=1.0, imds_timeout_s=2.0)[0] is True


async def test_a_taken_port_is_a_config_error_naming_metrics_listen():
    """A port another process listens on is a ConfigError naming metrics.listen and the fix, not an OSError traceback."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        server = MetricsServer(
            listen=f"127.0.0.1:{port}",
            registry=CollectorRegistry(),
            phase=lambda: "Training",
            imds_last_ok=lambda: None,
            poll_interval_s=1.0,
            imds_timeout_s=1.0,
        )
        with pytest.raises(ConfigError) as info:
            await server.start()
        await server.close()
    assert info.value.key == "metrics.listen"
    assert f"127.0.0.1:{port}" in info.value.problem and "in use" in info.value.problem
    assert "free port" in info.value.fix and '""' in info.value.fix
