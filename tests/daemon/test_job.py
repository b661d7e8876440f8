"""The job across instances with real daemons: sessions played in a row against one store, the ledger they
leave, and `spotd history --json` with costs from moto's EC2 and a loopback Price List API."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from spotd.events import parse_time
from tests.fixtures.aws import Ec2, PriceList
from tests.util import require_tool, wait_until

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

    def completed(self, instance_id: str, *, finish_at: int = 30, **kw: Any) -> Any:
        """A session that trains to the end: saves, says finished(step), and exits; the daemon stays up."""
        d = self.start(instance_id, **kw)
        t = self.trainer_procs(d.socket, "train", "--finish-at", str(finish_at))
        assert t.proc.wait(60) == 0, t.out.lines
        (finished,) = t.events("finished")
        assert finished["answer"]["ok"] is True and finished["answer"]["status"] == "Completed"
        assert finished["answer"]["step"] == finish_at
        return d


def marker(d: Any) -> Path:
    return Path(d.socket).parent / "job-ended"


def training_unit_would_start(marker_path: Path) -> bool:
    """What systemd decides for spotd-train@.service's conditions with the job-ended marker at ``marker_path``."""
    unit = (Path(__file__).resolve().parents[2] / "systemd" / "spotd-train@.service").read_text()
    (condition,) = [
        line for line in unit.splitlines() if line.startswith("Condition") and "job-ended" in line
    ]
    assert condition == "ConditionPathExists=!/run/spotd/job-ended"
    analyze = require_tool("systemd-analyze", "systemd")
    done = subprocess.run(
        [analyze, "condition", condition.replace("/run/spotd/job-ended", str(marker_path))],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return done.returncode == 0


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


def test_interrupted_interrupted_completed_is_the_history(play: Play, ec2: Ec2) -> None:
    """Three sessions in a row against one store (spot notice, spot notice, finished): `spotd history --json`
    shows three sessions, two interruptions, the statuses in order, and savings equal to the figure worked
    out by hand from the prices the test served (moto's spot price, the loopback Price List's on-demand)."""
    seen: dict[str, float] = {}

    def job_metrics(d: Any) -> None:
        def read() -> bool:
            seen.update(job_gauges(d))
            return "spotd_job_savings_ratio" in seen

        wait_until(read, timeout_s=30, what="the job's savings on /metrics")

    play.interrupted("i-0000000000000001")
    play.interrupted("i-0000000000000002", zone="us-east-1b", during=job_metrics)
    assert seen["spotd_job_sessions"] == 2 and seen["spotd_job_interruptions"] == 1
    assert 0.99 < seen["spotd_job_savings_ratio"] <= 1.0, "moto's spot price is a millionth of on demand"
    assert seen["spotd_job_cost_dollars"] > 0 and seen["spotd_job_training_seconds"] > 0
    d = play.completed("i-0000000000000003")
    wait_until(lambda: marker(d).exists(), timeout_s=10, what="the job-ended marker")
    assert d.stop() == 0
    h = history(d)
    ids = [s["instance"]["id"] for s in h["sessions"]]
    assert ids == ["i-0000000000000001", "i-0000000000000002", "i-0000000000000003"]
    assert [s["status"] for s in h["sessions"]] == ["Interrupted", "Interrupted", "Completed"]
    assert h["interruptions"] == 2 and h["status"] == "Completed"
    assert h["end"]["status"] == "Completed" and h["end"]["reason"] == "finished" and h["end"]["step"] == 30
    first, second, third = h["sessions"]
    assert h["statuses"] == [
        *["Starting", "Training", "Interrupted"],
        *["Starting", "Downloading", "Training", "Interrupted"],
        *["Starting", "Downloading", "Training", "Uploading", "Completed"],
    ]
    assert second["restored"]["name"] == first["last_durable"]["name"]
    assert third["restored"]["name"] == second["last_durable"]["name"]
    assert third["interruptions"] == [] and third["last_durable"]["step"] == 30
    for s in (first, second):
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
    assert text.returncode == 0 and "3 sessions, 2 interruptions" in text.stdout and "savings" in text.stdout


def test_cancel_request_on_complete_and_a_fourth_session_trains_nothing(play: Play, ec2: Ec2) -> None:
    """on_complete = "cancel-request": the job's persistent spot request is cancelled and its instance
    terminated in moto. A fourth session for the same job (EC2 launched another instance) restores nothing,
    says Completed, writes the marker that keeps spotd-train@ from starting, and goes the same way."""
    policy = {"on_complete": "cancel-request"}
    play.interrupted("i-0000000000000001", policy=policy)
    request, instance = ec2.spot_instance()
    d = play.completed(instance, policy=policy)
    wait_until(lambda: d.logs.events("job.on_complete"), timeout_s=30, what="on_complete done")
    (done,) = d.logs.events("job.on_complete")
    assert done["action"] == "cancel-request" and done["request_id"] == request
    assert request not in ec2.request_states() or ec2.request_states()[request] == "cancelled"
    assert ec2.instance_state(instance) in ("shutting-down", "terminated")
    assert not training_unit_would_start(marker(d))
    assert d.stop() == 0

    request4, instance4 = ec2.spot_instance()
    d4 = play.start(instance4, policy=policy)
    assert d4.logs.events("job.already_ended")[0]["status"] == "Completed"
    assert json.loads(marker(d4).read_text())["status"] == "Completed"
    assert not training_unit_would_start(marker(d4)), "spotd-train@ is not started for a Completed job"
    assert list(d4.checkpoint_dir.iterdir()) == [], "nothing restored"
    assert not d4.logs.events("restore.done")
    status = json.loads(d4.cli("status", "--json").stdout)
    assert status["phase"] == "Completed"
    wait_until(lambda: d4.logs.events("job.on_complete"), timeout_s=30, what="on_complete again")
    assert d4.logs.events("job.on_complete")[0]["request_id"] == request4
    assert ec2.instance_state(instance4) in ("shutting-down", "terminated")
    assert d4.stop() == 0
    h = history(d4)
    assert [s["status"] for s in h["sessions"]] == ["Interrupted", "Completed", "Completed"]
    assert h["sessions"][2]["training_seconds"] == 0 and h["sessions"][2]["restored"] is None


def test_a_job_that_has_not_ended_trains(play: Play) -> None:
    """Without END.json a marker left from before (outside systemd's RuntimeDirectory) is removed at boot,
    so spotd-train@ starts."""
    d = play.start("i-0000000000000001")
    assert d.stop() == 0
    marker(d).write_text("left over from before")
    again = play.spotd_daemon(play.imds.url, store_uri=play.store_uri, env=play.env, socket_path=d.socket)
    assert not marker(d).exists() and training_unit_would_start(marker(d))
    assert again.stop() == 0


def test_max_run_exceeded_across_two_sessions_stops_the_job(play: Play, tmp_path: Path) -> None:
    """policy.max_run counts training over every session: the first trains 2 s and is interrupted, the
    second is stopped when the sum reaches 5 s, with a final checkpoint durable and the reason recorded."""
    policy = {"max_run": 5.0}
    play.interrupted("i-0000000000000001", policy=policy, during=lambda d: wait_for_training(d, 2.0))
    d = play.start("i-0000000000000002", policy=policy)
    t = play.trainer_procs(d.socket, "train")
    assert t.proc.wait(60) == 0
    (req,) = t.events("requested")
    assert req["final"] is True and req["reason"] == "MaxRuntimeExceeded"
    assert t.events("durable")[-1]["ok"] is True
    wait_until(lambda: d.logs.events("job.ended"), timeout_s=20, what="job ended")
    (ended,) = d.logs.events("job.ended")
    assert ended["status"] == "Stopped" and ended["reason"] == "MaxRuntimeExceeded"
    assert ended["step"] == req["step"], "the final checkpoint is the durable one the job ends on"
    end = json.loads((tmp_path / "store" / "test-job" / "ledger" / "END.json").read_text())
    assert end["status"] == "Stopped" and end["checkpoint"] == ended["checkpoint"]
    assert (tmp_path / "store" / "test-job" / "checkpoints" / end["checkpoint"] / "MANIFEST.json").is_file()
    assert json.loads(marker(d).read_text())["reason"] == "MaxRuntimeExceeded"
    assert d.stop() == 0
    h = history(d)
    assert [s["status"] for s in h["sessions"]] == ["Interrupted", "Stopped"]
    assert h["statuses"][-3:] == ["Training", "Uploading", "Stopped"]
    assert 5.0 <= h["training_seconds"] < 5.0 + 3.0, "stopped within a check interval or two of the budget"


def test_max_wait_counts_the_waiting_and_stops_a_late_instance_at_boot(play: Play) -> None:
    """policy.max_wait runs from the job's first start, waiting for capacity included: an instance that
    boots after it is Stopped with MaxWaitTimeExceeded before any training, and restores nothing."""
    policy = {"max_wait": 3.0, "max_run": 3.0}
    d = play.start("i-0000000000000001", policy=policy)
    started = d.logs.events("daemon.ready")[0]
    assert d.stop() == 0
    wait_until(lambda: job_age(started) > 3.0, timeout_s=10, what="max_wait to pass while no instance runs")
    late = play.start("i-0000000000000002", policy=policy)
    (exceeded,) = late.logs.events("job.budget_exceeded")
    assert exceeded["reason"] == "MaxWaitTimeExceeded" and exceeded["at"] == "boot"
    assert json.loads(late.cli("status", "--json").stdout)["phase"] == "Stopped"
    assert not training_unit_would_start(marker(late)) and not late.logs.events("restore.done")
    assert late.stop() == 0
    assert history(late)["end"]["reason"] == "MaxWaitTimeExceeded"


def wait_for_training(d: Any, seconds: float) -> None:
    wait_until(
        lambda: job_gauges(d).get("spotd_job_training_seconds", 0) >= seconds,
        timeout_s=30,
        what=f"{seconds} s of training",
    )


def job_age(event: dict[str, Any]) -> float:
    return (datetime.now(UTC) - parse_time(event["timestamp"])).total_seconds()
