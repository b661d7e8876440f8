"""Shared fixtures. Each area keeps its own fixtures in tests/fixtures/<area>.py; all are loaded here."""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile
from collections.abc import Iterator

import pytest

pytest_plugins = sorted(
    f"tests.fixtures.{p.stem}"
    for p in (pathlib.Path(__file__).parent / "fixtures").glob("*.py")
    if p.stem != "__init__"
)


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under pytest-xdist (scripts/test: ``-n 2 --dist loadgroup``) the slow end-to-end tests share one
    worker and run one after another: each is several torch processes, and two of them side by side on a
    2-core machine would time each other out. The other tests run on the other worker meanwhile."""
    for item in items:
        if item.get_closest_marker("slow") is not None:
            item.add_marker(pytest.mark.xdist_group("slow"))


@pytest.fixture(autouse=True)
def _no_real_imds(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test may reach 169.254.169.254 or AWS: the default endpoints are replaced by a closed loopback port."""
    monkeypatch.setenv("SPOTD_IMDS_ENDPOINT", "http://127.0.0.1:9")
    # Nor AWS's EC2 or Price List API: the daemon's job metrics look prices up; a test that wants them
    # points these at moto and a loopback Price List server.
    monkeypatch.setenv("SPOTD_EC2_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("SPOTD_COST_PRICING_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("SPOTD_CONFIG", os.devnull)
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture
def short_tmp() -> Iterator[pathlib.Path]:
    """A short directory for Unix sockets: sun_path holds 107 bytes, pytest's tmp_path can exceed it."""
    path = pathlib.Path(tempfile.mkdtemp(prefix="spotd-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
