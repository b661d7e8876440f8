"""The job across instances with real daemons: sessions played in a row against one store, the ledger they
leave, and `spotd history --json` with costs from moto's EC2 and a loopback Price List API."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.aws import Ec2, PriceList
from tests.util import wait_until

ON_DEMAND = 1.212  # what the loopback Price List API serves for a g5.2xlarge in us-east-1


@dataclass
class Play:
    """Plays instance sessions of one job against one store, each on an instance the simulator pretends to be."""

    imds: Any
    spotd_daemon: Any
    trainer_procs: Any
    store_uri: str
    env: dict[str, str]
    short_tmp: Path
    n: int = 0

    def start(
        self,
        instance_id: str,
        *,
        zone: str = "us-east-1a",
        policy: dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> Any:
        self.imds.clear()
        self.imds.set_identity(instance_id=instance_id, instance_type="g5.2xlarge", availability_zone=zone)
        self.n += 1
        sock_dir = self.short_tmp / f"i{self.n}"
        sock_dir.mkdir()
        return self.spotd_daemon(
            self.imds.url,
            store_uri=self.store_uri,
            env=self.env,
            policy=policy,
            extra=extra,
            socket_path=str(sock_dir / "spotd.sock"),
        )

    def interrupted(self, instance_id: str, *, during: Any = None, **kw: Any) -> Any:
        """A session that trains until a spot notice, saves, and is gone; ``during(d)`` runs while it trains."""
        d = self.start(instance_id, **kw)
        t = self.trainer_procs(d.socket, "train")
        wait_until(lambda: t.events("connected"), timeout_s=20, what="trainer connected")
        if during is not None:
            during(d)
        self.imds.arm_instance_action("terminate", after_s=0, lead_s=120)
        assert t.proc.wait(60) == 0
        assert t.events("durable")[-1]["ok"] is True
        wait_until(lambda: d.logs.events("interruption.handled"), timeout_s=20, what="interruption handled")
        assert d.stop() == 0
        return d


@pytest.fixture
def play(
    imds_sim: Any,
    spotd_daemon: Any,
    trainer_procs: Any,
    tmp_path: Path,
    short_tmp: Path,
    ec2: Ec2,
    price_list: PriceList,
) -> Play:
    price_list.prices[("g5.2xlarge", "us-east-1")] = ON_DEMAND
    env = {
        "SPOTD_EC2_ENDPOINT_URL": ec2.endpoint_url,
        "SPOTD_COST_PRICING_ENDPOINT_URL": price_list.endpoint_url,
    }
    return Play(imds_sim, spotd_daemon, trainer_procs, (tmp_path / "store").as_uri(), env, short_tmp)


def history(d: Any) -> dict[str, Any]:
    done = d.cli("history", "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def job_gauges(d: Any) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    status, text = d.get("/metrics")
    assert status == 200
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith("spotd_job_")
    }


def savings_by_hand(h: dict[str, Any], spot: float, on_demand: float) -> float:
    billable = sum(s["instance_seconds"] * spot / on_demand for s in h["sessions"])
    training = sum(s["training_seconds"] for s in h["sessions"])
    return (1 - billable / training) * 100


def test_two_interrupted_sessions_make_a_history_with_costs(play: Play, ec2: Ec2) -> None:
    """Two sessions on two instances, each interrupted by a spot notice after its emergency checkpoint is
    durable: the ledger tells both, and the savings equal the figure worked out from the prices served."""
    seen: dict[str, float] = {}

    def job_metrics(d: Any) -> None:
        def read() -> bool:
            seen.update(job_gauges(d))
            return "spotd_job_savings_ratio" in seen

        wait_until(read, timeout_s=30, what="the job's savings on /metrics")

    play.interrupted("i-0000000000000001")
    d = play.interrupted("i-0000000000000002", zone="us-east-1b", during=job_metrics)
    assert seen["spotd_job_sessions"] == 2 and seen["spotd_job_interruptions"] == 1
    assert 0.99 < seen["spotd_job_savings_ratio"] <= 1.0, "moto's spot price is a millionth of on demand"
    assert seen["spotd_job_cost_dollars"] > 0 and seen["spotd_job_training_seconds"] > 0
    h = history(d)
    assert [s["instance"]["id"] for s in h["sessions"]] == ["i-0000000000000001", "i-0000000000000002"]
    assert [s["status"] for s in h["sessions"]] == ["Interrupted", "Interrupted"]
    assert h["interruptions"] == 2 and h["status"] == "Interrupted"
    first, second = h["sessions"]
    assert [t["status"] for t in first["timeline"]] == ["Starting", "Training", "Interrupted"]
    assert [t["status"] for t in second["timeline"]] == ["Starting", "Downloading", "Training", "Interrupted"]
    assert second["restored"]["name"] == first["last_durable"]["name"]
    for s in h["sessions"]:
        (i,) = s["interruptions"]
        assert i["kind"] == "spot" and i["durable"] and i["bytes"] == 4096 and i["lost"] == []
        assert s["lost_seconds"] == 0 and s["lost_steps"] == 0
        assert 0 < s["training_seconds"] < s["instance_seconds"]
        assert s["on_demand_hourly_usd"] == ON_DEMAND
    spot = ec2.spot_price("g5.2xlarge", "us-east-1a")
    assert h["pricing_errors"] == []
    assert h["cost_usd"] == pytest.approx(
        sum(s["instance_seconds"] for s in h["sessions"]) / 3600 * spot, rel=1e-5
    )
    assert h["savings_percent"] == pytest.approx(savings_by_hand(h, spot, ON_DEMAND), rel=1e-6)
    text = d.cli("history")
    assert text.returncode == 0 and "2 sessions, 2 interruptions" in text.stdout and "savings" in text.stdout
