"""The daemon against S3 (moto's server mode, behind the fault proxy): outages, the CLI, the start check."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.fixtures.s3 import FaultProxy, S3Bucket
from tests.util import wait_until

# One try per S3 request (the AWS SDKs' standard knob), so the store gives up fast and the coordinator's
# whole-commit retries are what carries the checkpoint through the outage.
FAST_FAIL = {"AWS_MAX_ATTEMPTS": "1"}


def manifests(bucket: S3Bucket) -> list[dict[str, Any]]:
    keys = [k for k in bucket.keys("pfx/test-job/checkpoints/") if k.endswith("/MANIFEST.json")]
    return [json.loads(bucket.client.get_object(Bucket=bucket.name, Key=k)["Body"].read()) for k in keys]


def test_s3_outage_during_emergency_checkpoint_is_retried_until_it_commits(
    imds_sim: Any,
    spotd_daemon: Any,
    trainer_procs: Any,
    s3_bucket: S3Bucket,
    s3_proxy: FaultProxy,
) -> None:
    """While S3 answers 500 the daemon keeps running, retries the whole commit and keeps the local file; once S3 recovers the checkpoint commits and the trainer hears durable."""
    d = spotd_daemon(
        imds_sim.url, store_uri=s3_bucket.uri(), endpoint_url=s3_proxy.endpoint_url, env=FAST_FAIL
    )
    t = trainer_procs(d.socket, "solo")
    wait_until(lambda: t.events("connected"), timeout_s=20, what="trainer connected")
    outage = s3_proxy.add("500", method="PUT", times=10**9)
    imds_sim.arm_instance_action("terminate", after_s=0, lead_s=120)
    wait_until(lambda: t.events("requested"), timeout_s=20, what="checkpoint asked for")
    wait_until(
        lambda: len(d.logs.events("checkpoint.upload_retry")) >= 2, timeout_s=30, what="two commit retries"
    )
    (req,) = t.events("requested")
    local = d.checkpoint_dir / f"solo/step-{req['step']:06d}.bin"
    assert d.proc.poll() is None and local.is_file(), "daemon alive, local checkpoint kept during the outage"
    assert manifests(s3_bucket) == [] and outage.fired >= 2
    outage.times = 0  # S3 recovers
    assert t.proc.wait(60) == 0
    (durable,) = t.events("durable")
    assert durable["ok"] is True
    (m,) = manifests(s3_bucket)
    assert m["step"] == req["step"] and m["files"][0]["checksum"].startswith("crc64nvme:")
    assert local.is_file(), "a committed local checkpoint is not deleted either"
    assert d.proc.poll() is None
    assert not d.logs.events("checkpoint.upload_failed")


def test_cli_list_and_restore_against_s3(
    imds_sim: Any, spotd_daemon: Any, trainer_procs: Any, s3_bucket: S3Bucket, tmp_path: Path
) -> None:
    """`spotd list` shows the committed checkpoint and `spotd restore --to DIR` brings it back byte-identical."""
    d = spotd_daemon(imds_sim.url, store_uri=s3_bucket.uri(), endpoint_url=s3_bucket.endpoint_url)
    # One periodic save (step 20 of 30), 3 MiB, then the trainer exits: the store holds exactly one commit.
    t = trainer_procs(
        d.socket, "solo", "--steps", "30", "--periodic-every", "20", "--size", str(3 * 1024 * 1024)
    )
    assert t.proc.wait(30) == 0
    (first,) = t.events("durable")
    assert first["ok"] is True
    listed = d.cli("list")
    assert listed.returncode == 0, listed.stderr
    names = [m["name"] for m in manifests(s3_bucket)]
    assert len(names) == 1 and names[0] in listed.stdout
    as_json = d.cli("list", "--json")
    assert as_json.returncode == 0 and {m["name"] for m in json.loads(as_json.stdout)} == set(names)
    m = next(m for m in manifests(s3_bucket) if m["step"] == first["step"])
    out = tmp_path / "restored"
    restored = d.cli("restore", "--to", str(out), "--name", m["name"])
    assert restored.returncode == 0, restored.stderr
    assert "every file verified" in restored.stdout
    got = out / first["path"]
    assert got.read_bytes() == (d.checkpoint_dir / first["path"]).read_bytes()


def test_missing_bucket_exits_1_naming_bucket_and_fix(
    imds_sim: Any, spotd_daemon: Any, s3_bucket: S3Bucket
) -> None:
    """With a bucket that does not exist the daemon retries for policy.boot_store_wait, saying why each time, then exits 1 with a message naming the bucket and the fix."""
    d = spotd_daemon(
        imds_sim.url,
        store_uri="s3://spotd-no-such-bucket/pfx",
        endpoint_url=s3_bucket.endpoint_url,
        policy={"boot_store_wait": 2.0},
        wait_ready=False,
    )
    assert d.proc.wait(30) == 1
    d.logs.join()
    retries = d.logs.events("startup.store_retry")
    assert retries and all("spotd-no-such-bucket" in r["error"] for r in retries)
    (failed,) = d.logs.events("startup.store_failed")
    assert "spotd-no-such-bucket" in failed["error"] and "fix: create it" in failed["error"]
    assert failed["waited_seconds"] <= 2.0 + 1.0
    assert not d.logs.events("daemon.ready")


def test_store_trouble_at_boot_is_waited_out(
    imds_sim: Any, spotd_daemon: Any, s3_bucket: S3Bucket, s3_proxy: FaultProxy
) -> None:
    """S3 answering 500 to the first requests at boot costs a few retries inside one start, not an exit per try (which would use up StartLimitBurst): the daemon gets ready."""
    outage = s3_proxy.add("500", times=3)
    d = spotd_daemon(
        imds_sim.url, store_uri=s3_bucket.uri(), endpoint_url=s3_proxy.endpoint_url, env=FAST_FAIL
    )
    assert outage.fired == 3
    retries = d.logs.events("startup.store_retry")
    assert retries and all(r["error"] and r["fix"] for r in retries)
    assert d.proc.poll() is None and d.logs.events("daemon.ready")


def test_periodic_uploads_give_way_to_the_trainers_connected(
    imds_sim: Any, spotd_daemon: Any, trainer_procs: Any, s3_bucket: S3Bucket
) -> None:
    """The daemon tells its S3 store who the trainers are as they come and go (their pid from SO_PEERCRED),
    so periodic uploads give way to them (store.yield_to_trainer); gone, nothing is held back. `spotd
    status` says whom they give way to, and what the last periodic upload was."""
    d = spotd_daemon(imds_sim.url, store_uri=s3_bucket.uri(), endpoint_url=s3_bucket.endpoint_url)
    t = trainer_procs(d.socket, "solo", "--steps", "200", "--step-sleep", "0.05", "--periodic-every", "60")
    wait_until(
        lambda: [e for e in d.logs.events("store.yielding_to") if e["pids"] == [t.proc.pid]],
        timeout_s=20,
        what="the store told the trainer's pid",
    )
    connected = json.loads(d.cli("status", "--json").stdout)["uploads"]
    assert connected["yielding"]["trainers"] == [t.proc.pid]
    assert connected["yielding"]["slowdown"] == 0.05
    assert f"giving way to pid {t.proc.pid}" in d.cli("status").stdout
    last = wait_until(
        lambda: json.loads(d.cli("status", "--json").stdout)["uploads"]["last"],
        timeout_s=20,
        interval_s=0.5,
        what="status to show the first periodic upload",
    )
    assert last["bytes"] > 0 and last["seconds"] >= 0 and 0 <= last["yielded"] <= 1
    assert t.proc.wait(30) == 0
    wait_until(
        lambda: d.logs.events("store.yielding_to")[-1]["pids"] == [],
        timeout_s=20,
        what="the store told the trainer is gone",
    )
    gone = json.loads(d.cli("status", "--json").stdout)["uploads"]
    assert gone["yielding"]["trainers"] == []
    text = d.cli("status").stdout
    assert "periodic uploads" in text and "give way to the trainers when they connect" in text
    durable = t.events("durable")
    assert len(durable) == 3 and all(e["ok"] for e in durable)
    assert d.proc.poll() is None
