"""The daemon end to end: a real `spotd run`, the IMDS simulator, trainer subprocesses, a file:// store."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from datetime import datetime
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from spotd import __version__
from tests.util import wait_until

DESIGN_METRICS = {
    "spotd_imds_requests",
    "spotd_notices",
    "spotd_checkpoint_requests",
    "spotd_upload_bytes",
    "spotd_upload_failures",
    "spotd_detect_seconds",
    "spotd_checkpoint_seconds",
    "spotd_upload_seconds",
    "spotd_notice_to_durable_seconds",
    "spotd_phase",
    "spotd_trainers",
    "spotd_interruption_deadline_timestamp_seconds",
    "spotd_last_durable_checkpoint_timestamp_seconds",
    "spotd_last_durable_step",
    "spotd_imds_up",
}


def metrics(d) -> dict[str, list]:
    status, text = d.get("/metrics")
    assert status == 200
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def sample(d, name: str, **labels: str) -> float:
    for s in metrics(d).get(name.removesuffix("_total"), []):
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
            return float(s.value)
    return 0.0


def manifests(store: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(store.glob("test-job/checkpoints/*/MANIFEST.json"))]


def test_terminate_notice_checkpoints_every_trainer(imds_sim, spotd_daemon, trainer_procs, tmp_path):
    """A spot terminate notice asks all three trainers with final=True and the notice deadline; each save is committed and answered durable."""
    d = spotd_daemon(imds_sim.url)
    trainers = [trainer_procs(d.socket, f"rank{i}") for i in range(3)]
    wait_until(lambda: sample(d, "spotd_trainers") == 3, timeout_s=20, what="3 trainers registered")
    imds_sim.arm_instance_action("terminate", after_s=0, lead_s=120)
    for t in trainers:
        assert t.proc.wait(30) == 0
    for t in trainers:
        (req,) = t.events("requested")
        assert req["final"] is True
        deadline = datetime.fromisoformat(req["deadline"])
        # deadline = notice time (armed + 120 s) - deadline_margin (5 s)
        assert 100 < deadline.timestamp() - req["received"] <= 115.5
        (durable,) = t.events("durable")
        assert durable["ok"] is True
    store = tmp_path / "store"
    found = manifests(store)
    assert sorted(m["trainer"] for m in found) == ["rank0", "rank1", "rank2"]
    for m in found:
        for f in m["files"]:
            assert (store / "test-job" / "checkpoints" / m["name"] / f["path"]).stat().st_size == f["size"]
    latest = (store / "test-job" / "LATEST").read_text().strip()
    assert latest in {m["name"] for m in found}
    wait_until(lambda: d.logs.events("interruption.handled"), what="canonical interruption line")
    (line,) = d.logs.events("interruption.handled")
    assert line["trainers"] == 3 and line["lost"] == [] and line["bytes"] == 3 * 4096
    for key in ("detect_seconds", "checkpoint_seconds", "upload_seconds", "notice_to_durable_seconds"):
        assert isinstance(line[key], float), key
    assert sample(d, "spotd_phase", phase="Completed") == 1
    assert sample(d, "spotd_notices_total", kind="spot", action="terminate") == 1
    assert list(store.glob("test-job/events/*.json")), "an events/ record per interruption"


def test_metrics_exposition_has_the_design_names(imds_sim, spotd_daemon):
    """/metrics parses with prometheus_client's parser and has every metric design.md names; /healthz is 200 while IMDS answers."""
    d = spotd_daemon(imds_sim.url)
    wait_until(lambda: sample(d, "spotd_imds_up") == 1, what="imds up")
    names = set(metrics(d))
    assert names >= DESIGN_METRICS, DESIGN_METRICS - names
    assert d.get("/healthz")[0] == 200
    assert sample(d, "spotd_info", version=__version__, sync_mode="client") == 1


def test_rebalance_asks_for_a_non_final_checkpoint(imds_sim, spotd_daemon, trainer_procs):
    """A rebalance recommendation asks for a non-final checkpoint and training continues."""
    d = spotd_daemon(imds_sim.url)
    t = trainer_procs(d.socket, "solo")
    wait_until(lambda: sample(d, "spotd_trainers") == 1, what="trainer registered")
    imds_sim.arm_rebalance()
    wait_until(lambda: t.events("durable"), timeout_s=20, what="durable after rebalance")
    (req,) = t.events("requested")
    assert req["final"] is False and req["reason"] == "rebalance"
    step = t.events("durable")[0]["step"]
    wait_until(lambda: any(e["step"] > step for e in t.events("step")), what="training continues")
    assert t.proc.poll() is None
    assert sample(d, "spotd_phase", phase="Training") == 1


def test_hibernate_saves_at_once_and_training_goes_on(imds_sim, spotd_daemon, trainer_procs):
    """A hibernate ITN asks for a non-final save due now: it is committed, reported with nothing lost, and the trainer keeps training."""
    d = spotd_daemon(imds_sim.url)
    t = trainer_procs(d.socket, "solo")
    wait_until(lambda: sample(d, "spotd_trainers") == 1, what="trainer registered")
    imds_sim.arm_instance_action("hibernate", after_s=0, lead_s=120)
    wait_until(lambda: t.events("durable"), timeout_s=20, what="durable after hibernate")
    (req,) = t.events("requested")
    assert req["final"] is False and req["reason"] == "spot-hibernate"
    assert datetime.fromisoformat(req["deadline"]).timestamp() - req["received"] < 2, "due now"
    step = t.events("durable")[0]["step"]
    wait_until(lambda: any(e["step"] > step for e in t.events("step")), what="training goes on")
    assert t.proc.poll() is None
    (line,) = wait_until(lambda: d.logs.events("checkpoint.handled"), what="the hibernate record")
    assert line["action"] == "hibernate" and line["lost"] == [] and line["durable"][0]["trainer"] == "solo"
    assert sample(d, "spotd_phase", phase="Training") == 1


def test_a_withdrawn_notice_gives_the_phase_back_to_training(imds_sim, spotd_daemon, trainer_procs):
    """`spotd status` no longer says Completed once the spot notice it completed is withdrawn: the instance stays, so does the job."""
    d = spotd_daemon(imds_sim.url)
    t = trainer_procs(d.socket, "solo")
    wait_until(lambda: sample(d, "spotd_trainers") == 1, what="trainer registered")
    imds_sim.arm_instance_action("stop", after_s=0, lead_s=120)
    assert t.proc.wait(30) == 0
    wait_until(lambda: sample(d, "spotd_phase", phase="Completed") == 1, what="Completed")
    imds_sim.clear()
    wait_until(lambda: sample(d, "spotd_phase", phase="Training") == 1, what="Training again")
    assert json.loads(d.cli("status", "--json").stdout)["phase"] == "Training"


def test_token_expiry_is_renewed_and_a_later_notice_caught(imds_sim, spotd_daemon, trainer_procs):
    """With a 2 s token TTL the daemon renews its token and still catches a notice armed later."""
    d = spotd_daemon(imds_sim.url, extra={"imds": {"token_ttl": 2}})
    t = trainer_procs(d.socket, "solo")
    wait_until(lambda: imds_sim.state()["tokens_issued"] >= 3, timeout_s=20, what="token renewals")
    imds_sim.arm_instance_action("terminate")
    assert t.proc.wait(30) == 0
    assert t.events("requested")[0]["final"] is True
    assert sample(d, "spotd_imds_requests_total", path="spot/instance-action", code="401") == 0


def test_imds_faults_keep_the_daemon_up_and_a_later_notice_caught(imds_sim, spotd_daemon, trainer_procs):
    """500, 503, slow, garbage, huge and reset answers are counted, the daemon stays up, and a notice after recovery is caught."""
    d = spotd_daemon(imds_sim.url)
    t = trainer_procs(d.socket, "solo")
    wait_until(lambda: sample(d, "spotd_trainers") == 1, what="trainer registered")
    for mode in ("500", "503", "slow", "garbage", "huge", "reset"):
        imds_sim.set_fault(mode, count=4)
        wait_until(lambda: imds_sim.state()["faults_left"] == 0, timeout_s=20, what=f"fault {mode} served")
    assert d.proc.poll() is None
    codes = {s.labels.get("code") for s in metrics(d)["spotd_imds_requests"]}
    assert {"500", "503", "timeout"} <= codes, codes
    assert sum(s.value for s in metrics(d)["spotd_imds_malformed"] if s.name.endswith("_total")) >= 1
    imds_sim.arm_instance_action("terminate")
    assert t.proc.wait(30) == 0
    assert t.events("durable")[0]["ok"] is True


def test_imds_down_makes_healthz_503(imds_sim, spotd_daemon):
    """/healthz answers 503 once IMDS has not answered for three poll intervals, and the daemon keeps running."""
    d = spotd_daemon(imds_sim.url)
    wait_until(lambda: d.get("/healthz")[0] == 200, what="healthy")
    imds_sim.set_fault("500", count=None)
    wait_until(lambda: d.get("/healthz")[0] == 503, timeout_s=20, what="unhealthy")
    assert sample(d, "spotd_imds_up") == 0
    imds_sim.set_fault(None)
    wait_until(lambda: d.get("/healthz")[0] == 200, timeout_s=20, what="healthy again")


def test_sigterm_is_a_last_chance_checkpoint(imds_sim, spotd_daemon, trainer_procs):
    """SIGTERM asks trainers for a final checkpoint, exits 0 once it is durable, and removes the socket."""
    d = spotd_daemon(imds_sim.url)
    t = trainer_procs(d.socket, "solo")
    wait_until(lambda: sample(d, "spotd_trainers") == 1, what="trainer registered")
    d.proc.send_signal(signal.SIGTERM)
    assert t.proc.wait(30) == 0
    assert d.proc.wait(30) == 0
    (req,) = t.events("requested")
    assert req["final"] is True and req["reason"] == "shutdown"
    assert t.events("durable")[0]["ok"] is True
    assert not os.path.exists(d.socket)
    assert d.logs.events("interruption.handled")[0]["kind"] == "shutdown"


def test_status_and_checkpoint_commands(imds_sim, spotd_daemon, trainer_procs):
    """`spotd status` shows the trainers and `spotd checkpoint` runs a drill that ends durable."""
    d = spotd_daemon(imds_sim.url)
    t = trainer_procs(d.socket, "solo")
    wait_until(lambda: sample(d, "spotd_trainers") == 1, what="trainer registered")
    out = d.cli(
        "status",
        "--json",
    )
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    assert status["phase"] == "Training" and [x["name"] for x in status["trainers"]] == ["solo"]
    human = d.cli("status")
    assert "phase" in human.stdout and "solo" in human.stdout
    drill = d.cli("checkpoint", "--reason", "drill", "--json")
    assert drill.returncode == 0, drill.stdout + drill.stderr
    result = json.loads(drill.stdout)
    assert result["ok"] is True and result["durable"][0]["trainer"] == "solo"
    assert t.events("requested")[0]["final"] is False
    listed = d.cli("list")
    assert listed.returncode == 0 and "solo" in listed.stdout


def test_checkpoint_with_no_trainer_exits_1_saying_why(imds_sim, spotd_daemon):
    """`spotd checkpoint` with no trainer connected answers at once: exit 1, the reason and the fix on stderr."""
    d = spotd_daemon(imds_sim.url)
    drill = d.cli("checkpoint", timeout=20)
    assert drill.returncode == 1, drill.stdout + drill.stderr
    assert "no trainer connected; start the training process with spotd.client" in drill.stderr
    assert drill.stdout == ""


def test_second_daemon_on_the_same_socket_exits_clearly(imds_sim, spotd_daemon):
    """A second daemon on a live socket exits 1 naming the socket, and the first keeps serving."""
    d = spotd_daemon(imds_sim.url)
    second = spotd_daemon(imds_sim.url, socket_path=d.socket, wait_ready=False)
    assert second.proc.wait(30) == 1
    assert any(d.socket in line for line in second.logs.lines)
    assert d.proc.poll() is None and os.path.exists(d.socket)


def test_bad_config_exits_78_naming_the_key(tmp_path):
    """An unknown key, a wrong type and an impossible value each exit 78 with the key named."""
    cases = {
        "[imds]\npoll_intervall = 1.0\n": "imds.poll_intervall",
        '[imds]\npoll_interval = "fast"\n': "imds.poll_interval",
        "[imds]\npoll_interval = 0\n": "imds.poll_interval",
        f'[socket]\npath = "/tmp/{"x" * 120}.sock"\n': "socket.path",
        '[policy]\non_rebalance = "panic"\n': "policy.on_rebalance",
    }
    for text, key in cases.items():
        cfg = tmp_path / "bad.toml"
        cfg.write_text('[store]\nuri = "file:///tmp/x"\n' + text if not text.startswith("[store]") else text)
        out = subprocess.run(
            [sys.executable, "-m", "spotd", "run", "--config", str(cfg)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert out.returncode == 78, (text, out.stderr)
        assert key in out.stderr and "fix:" in out.stderr, out.stderr


def test_a_taken_metrics_port_exits_78_in_one_line(imds_sim, spotd_daemon):
    """A metrics port another process holds stops `spotd run` with exit 78 and one line naming metrics.listen and the fix, no traceback."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        d = spotd_daemon(imds_sim.url, extra={"metrics": {"listen": f"127.0.0.1:{port}"}}, wait_ready=False)
        assert d.proc.wait(30) == 78
    d.logs.join()
    text = "\n".join(d.logs.lines)
    assert "Traceback" not in text
    (line,) = [x for x in d.logs.lines if "metrics.listen" in x]
    assert line.startswith("spotd: bad configuration:") and "fix:" in line and str(port) in line
    assert not os.path.exists(d.socket), "the socket is removed on the way out"


def test_missing_store_uri_is_a_config_error(tmp_path):
    """`spotd run` without store.uri exits 78 and says how to set it."""
    cfg = tmp_path / "c.toml"
    cfg.write_text('job_id = "j"\n')
    out = subprocess.run(
        [sys.executable, "-m", "spotd", "run", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert out.returncode == 78 and "store.uri" in out.stderr and "SPOTD_STORE_URI" in out.stderr


def test_every_command_has_help():
    """Every subcommand answers --help with exit 0."""
    for cmd in (
        "run",
        "status",
        "checkpoint",
        "list",
        "restore",
        "history",
        "simulate-imds",
        "install",
        "demo",
    ):
        out = subprocess.run(
            [sys.executable, "-m", "spotd", cmd, "--help"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert out.returncode == 0 and "--config" in out.stdout, (cmd, out.stderr)


def test_watch_mode_commits_what_appears_in_checkpoint_dir(imds_sim, spotd_daemon, tmp_path):
    """With [sync] mode = "watch", a checkpoint written by a script that never talks to spotd is committed once it settles."""
    d = spotd_daemon(imds_sim.url, extra={"sync": {"mode": "watch", "settle": 0.3}})
    (d.checkpoint_dir / "model-000100.pt.tmp").write_bytes(b"partial")
    (d.checkpoint_dir / "model-000100.pt.tmp").rename(d.checkpoint_dir / "model-000100.pt")
    store = tmp_path / "store"
    found = wait_until(lambda: manifests(store), timeout_s=20, what="a watch-mode commit")
    assert [f["path"] for f in found[0]["files"]] == ["model-000100.pt"]
    assert found[0]["trainer"] == "watch"
    first = found[0]["name"]
    (d.checkpoint_dir / "model-000100.pt").unlink()
    (d.checkpoint_dir / "model-000200.pt").write_bytes(b"later")
    # Once the later file is committed the watcher has run past the deletion.
    wait_until(lambda: len(manifests(store)) == 2, timeout_s=20, what="the second watch-mode commit")
    assert first in {m["name"] for m in manifests(store)}, "a local deletion is never mirrored into the store"


def test_a_notice_in_watch_mode_commits_what_is_settled_without_an_error(imds_sim, spotd_daemon, tmp_path):
    """In watch mode a spot notice is answered by the watcher (what is settled, at emergency priority): logged at info, never as an error or as a missing trainer."""
    d = spotd_daemon(imds_sim.url, extra={"sync": {"mode": "watch", "settle": 0.3}})
    (d.checkpoint_dir / "model-000100.pt").write_bytes(b"w" * 100)
    wait_until(lambda: manifests(tmp_path / "store"), timeout_s=20, what="the watch-mode commit")
    imds_sim.arm_instance_action("terminate", after_s=0, lead_s=120)
    (line,) = wait_until(lambda: d.logs.events("interruption.handled"), timeout_s=20, what="the record")
    assert line["lost"] == [] and line["durable"][0]["trainer"] == "watch"
    (handled,) = d.logs.events("watch.notice_handled")
    assert handled["newest"] == line["durable"][0]["name"]
    assert [e["event"] for e in d.logs.json() if e.get("level") == "error"] == []
    assert not d.logs.events("checkpoint.no_trainers")
    assert sample(d, "spotd_phase", phase="Completed") == 1
