"""Shipped operations files: shell scripts, Prometheus rules and scrape config, the Grafana dashboard."""

from __future__ import annotations

import json
import os
import re
import subprocess
import textwrap
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from spotd.metrics import Metrics
from tests.util import require_tool

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
SCRIPTS = [REPO / "scripts/user-data.sh", REPO / "scripts/launch-spot.sh"]
METRIC_RE = re.compile(r"\bspotd_[a-z0-9_]+\b")


def exposed_names() -> set[str]:
    """Every series name a fresh spotd exposes, including labelled families not yet used."""
    names: set[str] = set()
    text = generate_latest(Metrics().registry).decode()
    for family in text_string_to_metric_families(text):
        names.update(sample.name for sample in family.samples)
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(family.type, [""])
        names.update(family.name + suffix for suffix in suffixes)
    return names


def run_tool(argv: list[str], *, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_are_shellcheck_clean(script: Path) -> None:
    """shellcheck reports nothing for the user-data and launch scripts."""
    shellcheck = require_tool("shellcheck", "shellcheck")
    done = run_tool([shellcheck, "--severity=style", str(script)])
    assert done.returncode == 0, done.stdout + done.stderr
    assert os.access(script, os.X_OK), f"chmod +x {script.relative_to(REPO)}"


def test_alert_rules_pass_promtool() -> None:
    """promtool check rules accepts docs/prometheus-alerts.yml."""
    promtool = require_tool("promtool", "prometheus")
    done = run_tool([promtool, "check", "rules", "docs/prometheus-alerts.yml"])
    assert done.returncode == 0, done.stdout + done.stderr


def test_scrape_config_passes_promtool() -> None:
    """promtool check config accepts docs/prometheus-scrape.yml and the rule file it loads."""
    promtool = require_tool("promtool", "prometheus")
    done = run_tool([promtool, "check", "config", "docs/prometheus-scrape.yml"])
    assert done.returncode == 0, done.stdout + done.stderr


def test_alerts_fire_on_the_metrics_spotd_exports(tmp_path: Path) -> None:
    """promtool test rules: upload failures, a stale checkpoint while training, a missing trainer and an emergency upload longer than a spot notice fire; a missing trainer in watch mode (spotd_info{sync_mode="watch"}) or after the job ended (Completed) does not."""
    promtool = require_tool("promtool", "prometheus")
    # promtool compares annotations too; the expressions, labels and `for:` are what this test is about.
    rules = re.sub(
        r"\n {8}annotations:\n(?: {10}.*\n|\n)*", "\n", (DOCS / "prometheus-alerts.yml").read_text()
    )
    assert "annotations" not in rules
    (tmp_path / "rules.yml").write_text(rules)
    labels = 'instance="i-1", job="spotd"'
    watch = 'instance="i-2", job="spotd"'
    ended = 'instance="i-3", job="spotd"'
    tests = textwrap.dedent(f"""\
        rule_files: [{tmp_path / "rules.yml"}]
        evaluation_interval: 1m
        tests:
          - interval: 1m
            input_series:
              - series: 'spotd_upload_failures_total{{{labels}}}'
                values: '0 0 1 1 1'
              - series: 'spotd_phase{{{labels}, phase="Training"}}'
                values: '1x80'
              - series: 'spotd_last_durable_checkpoint_timestamp_seconds{{{labels}}}'
                values: '60x80'
              - series: 'spotd_trainers{{{labels}}}'
                values: '1 1 0x20'
              - series: 'spotd_imds_up{{{labels}}}'
                values: '1x80'
              # The newest checkpoint would take 200 s to upload; on i-2 it takes 30 s.
              - series: 'spotd_emergency_upload_estimate_seconds{{{labels}}}'
                values: '200x80'
              - series: 'spotd_emergency_upload_estimate_seconds{{{watch}}}'
                values: '30x80'
              - series: 'spotd_info{{{labels}, version="1.0.0", sync_mode="client"}}'
                values: '1x80'
              # Watch mode: no trainer ever registers, and that is how it is meant to run.
              - series: 'spotd_trainers{{{watch}}}'
                values: '0x80'
              - series: 'spotd_phase{{{watch}, phase="Training"}}'
                values: '1x80'
              - series: 'spotd_info{{{watch}, version="1.0.0", sync_mode="watch"}}'
                values: '1x80'
              # The job has ended (Completed): the trainer is gone on purpose.
              - series: 'spotd_trainers{{{ended}}}'
                values: '1 0x80'
              - series: 'spotd_phase{{{ended}, phase="Completed"}}'
                values: '0 1x80'
              - series: 'spotd_info{{{ended}, version="1.0.0", sync_mode="client"}}'
                values: '1x80'
            alert_rule_test:
              - eval_time: 4m
                alertname: SpotdUploadFailures
                exp_alerts:
                  - exp_labels: {{instance: i-1, job: spotd, severity: critical}}
              - eval_time: 15m
                alertname: SpotdNoTrainer
                exp_alerts:
                  - exp_labels: {{instance: i-1, job: spotd, severity: warning}}
              - eval_time: 30m
                alertname: SpotdCheckpointStale
                exp_alerts: []
              - eval_time: 70m
                alertname: SpotdCheckpointStale
                exp_alerts:
                  - exp_labels: {{instance: i-1, job: spotd, phase: Training, severity: warning}}
              - eval_time: 70m
                alertname: SpotdImdsDown
                exp_alerts: []
              - eval_time: 20m
                alertname: SpotdEmergencyUploadTooSlow
                exp_alerts:
                  - exp_labels: {{instance: i-1, job: spotd, severity: warning}}
        """)
    test_file = tmp_path / "alerts_test.yml"
    test_file.write_text(tests)
    done = run_tool([promtool, "test", "rules", str(test_file)])
    assert done.returncode == 0, done.stdout + done.stderr


def test_alert_rules_use_only_exported_metrics() -> None:
    """Every spotd_* series an alert queries exists in the exposition of a fresh Metrics()."""
    used = set(METRIC_RE.findall((DOCS / "prometheus-alerts.yml").read_text()))
    assert used, "no spotd metrics found in the alert rules"
    assert used - exposed_names() == set()


def test_dashboard_queries_only_exported_metrics() -> None:
    """The Grafana dashboard is valid JSON and every spotd_* series it queries exists in /metrics."""
    dashboard = json.loads((DOCS / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [a["expr"] for a in dashboard["annotations"]["list"] if "expr" in a]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    used = {name for expr in exprs for name in METRIC_RE.findall(expr)}
    assert len(used) >= 15, sorted(used)
    assert used - exposed_names() == set()
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"


def test_dashboard_charts_every_metric() -> None:
    """Every metric spotd exports is on the dashboard (a new one without a panel is a platform person's
    blind spot), but spotd_info: its labels only say which spotd runs, for the alerts."""
    dashboard = json.loads((DOCS / "grafana-dashboard.json").read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p.get("targets", []))
    families = {f.name for f in Metrics().registry.collect()}
    missing = {
        name for name in families - {"spotd_info"} if not re.search(rf"\b{name}(_total|_bucket)?\b", exprs)
    }
    assert not missing, f"no dashboard panel queries {sorted(missing)}"
    boxes = [(p["title"], p["gridPos"]) for p in dashboard["panels"]]
    for i, (a, g) in enumerate(boxes):
        for b, h in boxes[i + 1 :]:
            apart = (
                g["x"] + g["w"] <= h["x"]
                or h["x"] + h["w"] <= g["x"]
                or g["y"] + g["h"] <= h["y"]
                or h["y"] + h["h"] <= g["y"]
            )
            assert apart, f"panels {a!r} and {b!r} overlap"


def test_launch_script_fills_user_data_and_asks_for_spot(tmp_path: Path) -> None:
    """launch-spot.sh passes persistent spot options and user-data with its variables filled in, and refuses an unpinned spotd."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    record = tmp_path / "aws-call"
    fake = bindir / "aws"
    # A stand-in `aws` executable that records its arguments and the user-data file it was given.
    fake.write_text(
        textwrap.dedent(f"""\
        #!/bin/sh
        printf '%s\\n' "$@" > {record}
        for a in "$@"; do case "$a" in file://*) cp "${{a#file://}}" {record}.user-data;; esac; done
        echo i-0123 sir-0456
        """)
    )
    fake.chmod(0o755)
    env = {
        "PATH": f"{bindir}:{os.environ['PATH']}",
        "BUCKET": "ckpt",
        "JOB_ID": "job-7",
        "AMI_ID": "ami-1",
        "SUBNET_ID": "subnet-1",
        "SECURITY_GROUP_ID": "sg-1",
        "TRAIN_CMD": "python train.py --a 'b c' && true",
        "PIP_SPEC": "https://example.com/spotd-0.1.0-py3-none-any.whl#sha256=00ff",
    }
    done = subprocess.run(
        ["bash", str(REPO / "scripts/launch-spot.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    argv = record.read_text().splitlines()
    market = json.loads(argv[argv.index("--instance-market-options") + 1])
    assert market["SpotOptions"] == {"SpotInstanceType": "persistent", "InstanceInterruptionBehavior": "stop"}
    assert "HttpTokens=required" in argv[argv.index("--metadata-options") + 1]
    user_data = Path(f"{record}.user-data").read_text()
    assert 'SPOTD_BUCKET="ckpt"' in user_data
    assert 'SPOTD_JOB_ID="job-7"' in user_data
    assert "SPOTD_TRAIN_CMD=\"python train.py --a 'b c' && true\"" in user_data
    assert 'SPOTD_PIP_SPEC="https://example.com/spotd-0.1.0-py3-none-any.whl#sha256=00ff"' in user_data
    bad = subprocess.run(
        ["bash", str(REPO / "scripts/launch-spot.sh")],
        env={**env, "TRAIN_CMD": "echo $HOME"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert bad.returncode == 2
    assert "TRAIN_CMD may not contain" in bad.stderr
    unpinned = subprocess.run(
        ["bash", str(REPO / "scripts/launch-spot.sh")],
        env={**env, "PIP_SPEC": "spotd==0.1.0"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert unpinned.returncode == 2
    assert "public index" in unpinned.stderr


def test_the_iam_policy_grants_exactly_the_ec2_and_pricing_calls_spotd_makes() -> None:
    """Every EC2 or Price List call in spotd/aws (boto3 method names) has its IAM action in
    docs/iam-policy.json, and the policy grants no EC2 or pricing action spotd does not call; the ones that
    change something are scoped to resources tagged spotd=enabled."""
    calls = set()
    for module in ("ec2.py", "pricing.py"):
        text = (REPO / "spotd" / "aws" / module).read_text()
        calls |= set(re.findall(r"client\.(\w+)\(", text))
        calls |= set(re.findall(r'get_paginator\("(\w+)"\)', text))
    calls -= {"close", "get_paginator"}
    service = {"get_products": "pricing"}
    wanted = {f"{service.get(c, 'ec2')}:{''.join(w.title() for w in c.split('_'))}" for c in calls}
    policy = json.loads((DOCS / "iam-policy.json").read_text())
    granted: dict[str, dict[str, object]] = {}
    for statement in policy["Statement"]:
        for action in statement["Action"]:
            if action.startswith(("ec2:", "pricing:")):
                granted[action] = statement
    assert set(granted) == wanted
    for action in ("ec2:CancelSpotInstanceRequests", "ec2:StopInstances", "ec2:TerminateInstances"):
        statement = granted[action]
        assert statement["Resource"] != "*", action
        assert statement["Condition"] == {"StringEquals": {"aws:ResourceTag/spotd": "enabled"}}, action
