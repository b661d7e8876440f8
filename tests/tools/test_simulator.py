"""The IMDS simulator speaks IMDSv2 like EC2 does, and its control API and faults work."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any

import pytest

from spotd.events import parse_time
from spotd.tools.simulator import HUGE_BODY_BYTES, SimulatorThread
from tests.util import wait_until

TOKEN = "X-aws-ec2-metadata-token"
TTL = "X-aws-ec2-metadata-token-ttl-seconds"


def call(
    url: str,
    *,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    data: bytes | None = None,
    timeout_s: float = 5.0,
) -> tuple[int, str, str]:
    """(status, content type, body) of one request; HTTP errors are answers too."""
    req = urllib.request.Request(url, method=method, headers=headers or {}, data=data)
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), resp.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.headers.get("Content-Type", ""), exc.read().decode()


def token(sim: SimulatorThread, ttl: int = 60) -> str:
    status, _, body = call(f"{sim.url}/latest/api/token", method="PUT", headers={TTL: str(ttl)})
    assert status == 200
    return body


def meta(sim: SimulatorThread, path: str, tok: str | None = None, **kw: Any) -> tuple[int, str, str]:
    return call(f"{sim.url}/latest/meta-data/{path}", headers={TOKEN: tok} if tok else {}, **kw)


def control(sim: SimulatorThread, op: str, body: object = None) -> tuple[int, dict[str, Any]]:
    data = json.dumps(body or {}).encode()
    status, _, text = call(f"{sim.url}/_sim/{op}", method="POST", data=data)
    return status, json.loads(text)


def test_token_then_identity(imds_sim: SimulatorThread) -> None:
    """A token from PUT /latest/api/token unlocks the identity paths."""
    tok = token(imds_sim)
    assert meta(imds_sim, "instance-id", tok)[::2] == (200, "i-0123456789abcdef0")
    assert meta(imds_sim, "instance-type", tok)[2] == "g5.2xlarge"
    assert meta(imds_sim, "placement/availability-zone", tok)[2] == "us-east-1a"
    assert meta(imds_sim, "instance-life-cycle", tok)[2] == "spot"
    assert imds_sim.state()["tokens_issued"] == 1


@pytest.mark.parametrize("ttl", [None, "0", "21601", "-5", "abc"])
def test_token_ttl_out_of_bounds_is_400(imds_sim: SimulatorThread, ttl: str | None) -> None:
    """A token PUT whose TTL header is missing or outside 1..21600 gets 400."""
    headers = {} if ttl is None else {TTL: ttl}
    assert call(f"{imds_sim.url}/latest/api/token", method="PUT", headers=headers)[0] == 400


def test_ttl_bounds_inclusive(imds_sim: SimulatorThread) -> None:
    """TTLs of exactly 1 and 21600 seconds are accepted."""
    token(imds_sim, ttl=1)
    token(imds_sim, ttl=21600)


def test_missing_or_bad_token_is_401(imds_sim: SimulatorThread) -> None:
    """With tokens required, a GET without a token or with an unknown one gets 401."""
    assert meta(imds_sim, "instance-id")[0] == 401
    assert meta(imds_sim, "instance-id", "not-a-token")[0] == 401


def test_v1_served_when_tokens_optional(imds_sim: SimulatorThread) -> None:
    """With require_token off, a GET without a token is served (IMDSv1), but a bad token is still 401."""
    imds_sim.set_require_token(False)
    assert meta(imds_sim, "instance-id")[::2] == (200, "i-0123456789abcdef0")
    assert meta(imds_sim, "instance-id", "bogus")[0] == 401


def test_expired_token_is_401(imds_sim: SimulatorThread) -> None:
    """A token with a 1 s TTL stops working once it expires."""
    tok = token(imds_sim, ttl=1)
    assert meta(imds_sim, "instance-id", tok)[0] == 200
    wait_until(lambda: meta(imds_sim, "instance-id", tok)[0] == 401, timeout_s=5, what="token expiry")


def test_expired_token_with_injected_clock() -> None:
    """Token expiry follows the injected clock, so tests need not wait in real time."""
    now = [1000.0]
    with SimulatorThread(clock=lambda: now[0]) as sim:
        tok = token(sim, ttl=10)
        assert meta(sim, "instance-id", tok)[0] == 200
        now[0] += 10.5
        assert meta(sim, "instance-id", tok)[0] == 401


def test_notice_paths_404_before_notice(imds_sim: SimulatorThread) -> None:
    """Notice paths answer 404 until a notice is armed."""
    tok = token(imds_sim)
    for path in ("spot/instance-action", "events/recommendations/rebalance", "events/maintenance/scheduled"):
        assert meta(imds_sim, path, tok)[0] == 404
    assert meta(imds_sim, "no/such/path", tok)[0] == 404


def test_instance_action_format_and_stable_time(imds_sim: SimulatorThread) -> None:
    """The ITN is JSON as text/plain with an RFC 3339 time lead_s ahead that stays put between polls."""
    tok = token(imds_sim)
    before = time.time()
    imds_sim.arm_instance_action("stop", lead_s=120)
    status, ctype, body = meta(imds_sim, "spot/instance-action", tok)
    assert status == 200 and ctype.startswith("text/plain")
    data = json.loads(body)
    assert data["action"] == "stop" and data["time"].endswith("Z")
    assert before + 118 <= parse_time(data["time"]).timestamp() <= time.time() + 121
    assert json.loads(meta(imds_sim, "spot/instance-action", tok)[2]) == data
    assert imds_sim.state()["notice_first_served_at"] >= before


def test_instance_action_after_delay_and_moving_time() -> None:
    """A notice armed with after_s appears only then; moving=True recomputes its time on each poll."""
    now = [1_800_000_000.0]
    with SimulatorThread(clock=lambda: now[0]) as sim:
        tok = token(sim)
        sim.arm_instance_action("terminate", after_s=5, lead_s=120, moving=True)
        assert meta(sim, "spot/instance-action", tok)[0] == 404
        now[0] += 5
        first = json.loads(meta(sim, "spot/instance-action", tok)[2])["time"]
        now[0] += 3
        second = json.loads(meta(sim, "spot/instance-action", tok)[2])["time"]
        assert parse_time(second).timestamp() - parse_time(first).timestamp() == 3


def test_rebalance_and_maintenance_formats(imds_sim: SimulatorThread) -> None:
    """Rebalance carries noticeTime; maintenance is a list with EC2's "21 Jan 2019 09:00:43 GMT" times."""
    tok = token(imds_sim)
    imds_sim.arm_rebalance()
    assert "noticeTime" in json.loads(meta(imds_sim, "events/recommendations/rebalance", tok)[2])
    event_id = imds_sim.add_maintenance("system-reboot", not_before_s=300, event_id="instance-event-1")
    assert event_id == "instance-event-1"
    status, ctype, body = meta(imds_sim, "events/maintenance/scheduled", tok)
    assert status == 200 and ctype.startswith("text/plain")
    (event,) = json.loads(body)
    assert set(event) == {"Code", "Description", "EventId", "NotAfter", "NotBefore", "State"}
    assert event["NotBefore"].endswith(" GMT") and event["State"] == "active"
    assert abs(parse_time(event["NotBefore"]).timestamp() - (time.time() + 300)) < 3


def test_control_api(imds_sim: SimulatorThread) -> None:
    """The /_sim/ control endpoints arm notices, faults and clear them; bad input gets a 4xx naming it."""
    tok = token(imds_sim)
    status, state = control(imds_sim, "notice", {"action": "hibernate", "after": 0, "lead": 60})
    assert status == 200 and state["instance_action"] == "hibernate"
    assert json.loads(meta(imds_sim, "spot/instance-action", tok)[2])["action"] == "hibernate"
    assert control(imds_sim, "rebalance", {"after": 0})[0] == 200
    assert control(imds_sim, "maintenance", {"code": "instance-stop", "not_before": 60})[0] == 200
    status, state = control(imds_sim, "fault", {"mode": "503", "count": 2})
    assert status == 200 and state["faults_left"] == 2
    codes = [meta(imds_sim, "instance-id", tok)[0] for _ in range(3)]
    assert codes == [503, 503, 200]
    assert imds_sim.state()["faults_left"] == 0
    status, state = control(imds_sim, "clear")
    assert status == 200 and state["instance_action"] is None and state["maintenance"] == []
    assert meta(imds_sim, "spot/instance-action", tok)[0] == 404
    status, _, body = call(f"{imds_sim.url}/_sim/state")
    assert status == 200 and json.loads(body)["requests"]["instance-id"] == 3
    status, reply = control(imds_sim, "notice", {"action": "explode"})
    assert status == 400 and "explode" in reply["error"]
    assert control(imds_sim, "fault", {"mode": "nope"})[0] == 400
    assert control(imds_sim, "bogus")[0] == 404
    bad = call(f"{imds_sim.url}/_sim/notice", method="POST", data=b"{not json")
    assert bad[0] == 400


def test_fault_bodies(imds_sim: SimulatorThread) -> None:
    """Garbage answers 200 with a non-JSON body; huge answers a 1 MiB body."""
    tok = token(imds_sim)
    imds_sim.arm_instance_action()
    imds_sim.set_fault("garbage", count=1)
    status, _, body = meta(imds_sim, "spot/instance-action", tok)
    assert status == 200
    with pytest.raises(ValueError):
        json.loads(body)
    imds_sim.set_fault("huge", count=1)
    status, _, body = meta(imds_sim, "spot/instance-action", tok)
    assert status == 200 and len(body) == HUGE_BODY_BYTES
    assert meta(imds_sim, "spot/instance-action", tok)[0] == 200


def test_fault_reset_and_slow(imds_sim: SimulatorThread) -> None:
    """Reset closes the connection without an answer; slow outlasts a short client timeout."""
    tok = token(imds_sim)
    imds_sim.set_fault("reset", count=1)
    with pytest.raises((http.client.RemoteDisconnected, ConnectionError, urllib.error.URLError)):
        meta(imds_sim, "instance-id", tok)
    imds_sim.set_fault("slow", count=1)
    with pytest.raises((TimeoutError, urllib.error.URLError)):
        meta(imds_sim, "instance-id", tok, timeout_s=0.2)
    assert meta(imds_sim, "instance-id", tok)[0] == 200


def test_token_faults_hit_only_the_token_put(imds_sim: SimulatorThread) -> None:
    """token-* faults change the token PUT's answer and leave metadata GETs alone."""
    tok = token(imds_sim)
    imds_sim.set_fault("token-405")
    assert call(f"{imds_sim.url}/latest/api/token", method="PUT", headers={TTL: "60"})[0] == 405
    assert meta(imds_sim, "instance-id", tok)[0] == 200


def test_simulate_imds_command() -> None:
    """`spotd simulate-imds` prints its URL, serves an armed notice, and exits 0 on SIGTERM."""
    code = (
        "import argparse, sys\n"
        "from spotd.tools import simulator\n"
        "p = argparse.ArgumentParser()\n"
        "simulator.add_arguments(p)\n"
        "sys.exit(simulator.main(p.parse_args(sys.argv[1:])))\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "--port", "0", "--action", "terminate", "--lead", "90"],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert "listening on http://127.0.0.1:" in first
        url = first.rsplit(" ", 1)[1].strip()
        status, _, tok = call(f"{url}/latest/api/token", method="PUT", headers={TTL: "60"})
        status, _, body = call(f"{url}/latest/meta-data/spot/instance-action", headers={TOKEN: tok})
        assert status == 200 and json.loads(body)["action"] == "terminate"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def test_simulate_imds_reports_the_identity_it_is_given() -> None:
    """`spotd simulate-imds --instance-id … --instance-type … --availability-zone … --life-cycle …` answers
    those on the identity paths (region included), so a drill can match a real or moto instance."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "spotd",
            "simulate-imds",
            "--port",
            "0",
            "--instance-id",
            "i-0feedface0000001",
            "--instance-type",
            "p4d.24xlarge",
            "--availability-zone",
            "us-west-2-lax-1a",
            "--life-cycle",
            "on-demand",
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().rsplit(" ", 1)[1].strip()
        _, _, tok = call(f"{url}/latest/api/token", method="PUT", headers={TTL: "60"})
        answers = {
            path: call(f"{url}/latest/meta-data/{path}", headers={TOKEN: tok})[2]
            for path in (
                "instance-id",
                "instance-type",
                "placement/availability-zone",
                "placement/region",
                "instance-life-cycle",
            )
        }
        assert answers == {
            "instance-id": "i-0feedface0000001",
            "instance-type": "p4d.24xlarge",
            "placement/availability-zone": "us-west-2-lax-1a",
            "placement/region": "us-west-2",
            "instance-life-cycle": "on-demand",
        }
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def test_identity_changes_through_the_control_api(imds_sim: SimulatorThread) -> None:
    """POST /_sim/identity (and set_identity) change what the identity paths answer; a bad life cycle is 400."""
    status, state = control(
        imds_sim, "identity", {"instance_id": "i-0aaa", "availability_zone": "eu-west-1c"}
    )
    assert status == 200 and state["identity"]["instance-id"] == "i-0aaa"
    imds_sim.set_identity(instance_type="g6.xlarge")
    tok = token(imds_sim)
    assert meta(imds_sim, "instance-id", tok)[2] == "i-0aaa"
    assert meta(imds_sim, "instance-type", tok)[2] == "g6.xlarge"
    assert meta(imds_sim, "placement/region", tok)[2] == "eu-west-1"
    assert control(imds_sim, "identity", {"life_cycle": "reserved"})[0] == 400
