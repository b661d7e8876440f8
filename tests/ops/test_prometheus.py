"""A real Prometheus (Debian's package) scrapes two `spotd run` daemons found through file-based service
discovery shaped like docs/prometheus-scrape.yml's EC2 example, loads docs/prometheus-alerts.yml, and fires
the interruption alert for the one daemon whose instance gets a spot notice; every dashboard query runs
against what it scraped."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from spotd.tools.simulator import SimulatorThread
from tests.util import free_port, require_tool, wait_until

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
HOSTS = ("127.0.0.2", "127.0.0.3")  # one loopback address per "instance", the same port on each


def shared_free_port() -> int:
    """A port free on every address of HOSTS, as 9127 is on every instance."""
    for _ in range(50):
        port = free_port()
        try:
            for host in HOSTS:
                with socket.socket() as s:
                    s.bind((host, port))
        except OSError:
            continue
        return port
    raise AssertionError("no port free on every loopback address")


def prometheus_config(tmp_path: Path, port: int, targets: Path) -> Path:
    """docs/prometheus-scrape.yml with its ec2_sd_configs replaced by a file_sd of the same labels, the
    metrics port it writes into __address__ set to ours, and second-long intervals."""
    cfg = yaml.safe_load((DOCS / "prometheus-scrape.yml").read_text())
    (job,) = cfg["scrape_configs"]
    assert "ec2_sd_configs" in job and job["job_name"] == "spotd"
    del job["ec2_sd_configs"]
    job["file_sd_configs"] = [{"files": [str(targets)], "refresh_interval": "1s"}]
    job["scrape_interval"] = "1s"
    job["scrape_timeout"] = "1s"
    for rule in job["relabel_configs"]:
        if rule.get("target_label") == "__address__":
            assert rule["replacement"] == "${1}:9127"
            rule["replacement"] = f"${{1}}:{port}"
    cfg["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    cfg["rule_files"] = [str(DOCS / "prometheus-alerts.yml")]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def ec2_target(host: str, instance_id: str, zone: str) -> dict[str, Any]:
    """What EC2 service discovery would say about the instance, as file_sd labels."""
    return {
        "targets": [f"{host}:80"],  # replaced by the relabelling, as EC2 SD's would be
        "labels": {
            "__meta_ec2_instance_id": instance_id,
            "__meta_ec2_instance_state": "running",
            "__meta_ec2_private_ip": host,
            "__meta_ec2_tag_spotd_job": "test-job",
            "__meta_ec2_instance_lifecycle": "spot",
            "__meta_ec2_instance_type": "g5.2xlarge",
            "__meta_ec2_availability_zone": zone,
        },
    }


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def api(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}{query}", timeout=5) as resp:
            body = json.loads(resp.read())
        assert body["status"] == "success", body
        return body["data"]

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as resp:
                return resp.status == 200
        except OSError:
            return False

    def targets_up(self) -> dict[str, str]:
        return {t["labels"]["instance"]: t["health"] for t in self.api("targets")["activeTargets"]}

    def firing(self, alert: str) -> list[dict[str, str]]:
        return [
            a["labels"]
            for a in self.api("alerts")["alerts"]
            if a["labels"]["alertname"] == alert and a["state"] == "firing"
        ]


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_prometheus_scrapes_two_daemons_and_fires_the_interruption_alert(
    spotd_daemon: Any, trainer_procs: Any, imds_sim: SimulatorThread, tmp_path: Path
) -> None:
    """Two daemons, two instances: after a spot notice on the first, SpotdInterruptionNotice fires through
    Prometheus's API for that instance only, with the labels the scrape config's relabelling gives; every
    dashboard query evaluates on the scraped data, the instance-level ones with a series per instance."""
    binary = require_tool("prometheus", "prometheus")
    port = shared_free_port()
    other = SimulatorThread(
        host="127.0.0.1", port=0, instance_id="i-0bbbbbbbbbbbbbbbb", availability_zone="us-east-1b"
    )
    other.start()
    try:
        imds_sim.set_identity(instance_id="i-0aaaaaaaaaaaaaaaa")
        a = spotd_daemon(imds_sim.url, extra={"metrics": {"listen": f"{HOSTS[0]}:{port}"}})
        b = spotd_daemon(other.url, extra={"metrics": {"listen": f"{HOSTS[1]}:{port}"}})
        ta = trainer_procs(a.socket, "train-a")
        tb = trainer_procs(b.socket, "train-b")
        wait_until(lambda: ta.events("connected") and tb.events("connected"), timeout_s=20, what="trainers")
        targets = tmp_path / "targets.json"
        targets.write_text(
            json.dumps(
                [
                    ec2_target(HOSTS[0], "i-0aaaaaaaaaaaaaaaa", "us-east-1a"),
                    ec2_target(HOSTS[1], "i-0bbbbbbbbbbbbbbbb", "us-east-1b"),
                ]
            )
        )
        config = prometheus_config(tmp_path, port, targets)
        promtool = require_tool("promtool", "prometheus")
        checked = subprocess.run(
            [promtool, "check", "config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert checked.returncode == 0, checked.stdout + checked.stderr
        web = free_port()
        log = (tmp_path / "prometheus.log").open("w")
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{web}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        prom = Prometheus(f"http://127.0.0.1:{web}")
        try:
            wait_until(lambda: proc.poll() is not None or prom.ready(), timeout_s=60, what="prometheus ready")
            assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()
            wait_until(
                lambda: prom.targets_up() == {"i-0aaaaaaaaaaaaaaaa": "up", "i-0bbbbbbbbbbbbbbbb": "up"},
                timeout_s=30,
                what="both daemons scraped",
            )
            rules = {r["name"] for g in prom.api("rules")["groups"] for r in g["rules"]}
            assert {"SpotdInterruptionNotice", "SpotdUploadFailures", "SpotdWebhookFailing"} <= rules
            # A sample of the notice counter at 0 first: increase() needs two.
            wait_until(
                lambda: prom.api("query", query='spotd_notices_total{kind="spot",action="terminate"}')[
                    "result"
                ],
                timeout_s=30,
                what="the notice counter scraped at 0",
            )
            imds_sim.arm_instance_action("terminate", after_s=0, lead_s=120)
            firing = wait_until(
                lambda: prom.firing("SpotdInterruptionNotice"), timeout_s=60, what="the alert firing"
            )
            (labels,) = firing
            assert labels["instance"] == "i-0aaaaaaaaaaaaaaaa" and labels["kind"] == "spot"
            assert labels["action"] == "terminate" and labels["severity"] == "warning"
            assert labels["spotd_job"] == "test-job" and labels["instance_type"] == "g5.2xlarge"
            assert labels["availability_zone"] == "us-east-1a" and labels["lifecycle"] == "spot"
            assert ta.proc.wait(60) == 0, "the notified trainer saved and stopped"
            wait_until(
                lambda: prom.api("query", query="spotd_notice_to_durable_seconds_count > 0")["result"],
                timeout_s=30,
                what="notice-to-durable scraped",
            )
            for expr, result in dashboard_results(prom):
                assert result["resultType"] in ("vector", "scalar", "matrix"), expr
            per_instance = [
                'spotd_phase{instance=~"$instance"}',
                'spotd_imds_up{instance=~"$instance"}',
                'spotd_seconds_until_interruption{instance=~"$instance"}',
                'spotd_job_training_seconds{instance=~"$instance"}',
                'spotd_job_sessions{instance=~"$instance"}',
            ]
            for expr in per_instance:
                found = {s["metric"]["instance"] for s in query(prom, expr)}
                assert found == {"i-0aaaaaaaaaaaaaaaa", "i-0bbbbbbbbbbbbbbbb"}, expr
            (left,) = query(
                prom, 'max by (instance) (spotd_seconds_until_interruption{instance=~"$instance"}) > 0'
            )
            assert left["metric"]["instance"] == "i-0aaaaaaaaaaaaaaaa"
            p90 = query(prom, dashboard_expr("Notice to durable (p50, p90)", 1))
            assert p90 and 0 < float(p90[0]["value"][1]) < 10
        finally:
            proc.terminate()
            proc.wait(30)
            log.close()
    finally:
        other.close()


def dashboard_exprs() -> list[tuple[str, str]]:
    d = json.loads((DOCS / "grafana-dashboard.json").read_text())
    out = [(p["title"], t["expr"]) for p in d["panels"] for t in p.get("targets", [])]
    out += [(a["name"], a["expr"]) for a in d["annotations"]["list"] if "expr" in a]
    return out


def dashboard_expr(title: str, index: int = 0) -> str:
    return [e for t, e in dashboard_exprs() if t == title][index]


def grafana(expr: str) -> str:
    """Grafana's variables as it would fill them for a short range: every instance, windows of 10 s."""
    return re.sub(
        r"\$__rate_interval|\$__range", "10s", expr.replace('"$instance"', '".*"').replace("$instance", ".*")
    )


def query(prom: Prometheus, expr: str) -> list[dict[str, Any]]:
    return list(prom.api("query", query=grafana(expr))["result"])


def dashboard_results(prom: Prometheus) -> list[tuple[str, dict[str, Any]]]:
    return [(expr, prom.api("query", query=grafana(expr))) for _, expr in dashboard_exprs()]
