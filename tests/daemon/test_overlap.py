"""Upload overlapped with the save, end to end: a real `spotd run`, a trainer's Guard on the real Unix
socket, moto behind the counting proxy."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from spotd.client import connect
from tests.fixtures.s3 import FaultProxy, S3Bucket
from tests.util import wait_until

MIB = 1024 * 1024


def parts_sent(proxy: FaultProxy) -> int:
    return sum(
        1
        for action, method, path in proxy.log
        if action == "delay" and method == "PUT" and "partNumber" in path
    )


def uploads_open(bucket: S3Bucket) -> list[str]:
    return [u["Key"] for u in bucket.client.list_multipart_uploads(Bucket=bucket.name).get("Uploads", [])]


def start(imds_sim: Any, spotd_daemon: Any, s3_bucket: S3Bucket, s3_proxy: FaultProxy) -> tuple[Any, Any]:
    """A daemon on S3 with 5 MiB parts, a connected trainer guard asked for a final checkpoint."""
    s3_proxy.add("delay", method="PUT", times=10**9)  # logs every PUT (UploadPart, PutObject)
    d = spotd_daemon(
        imds_sim.url,
        store_uri=s3_bucket.uri(),
        endpoint_url=s3_proxy.endpoint_url,
        extra={"store": {"part_size": 5 * MIB}},
    )
    guard = connect("solo", socket_path=d.socket, handle_sigterm=False, reconnect_interval_s=0.1)
    wait_until(lambda: guard.connected, timeout_s=20, what="trainer connected")
    imds_sim.arm_instance_action("terminate", after_s=0, lead_s=120)
    wait_until(lambda: guard.checkpoint_requested, timeout_s=20, what="checkpoint asked for")
    (d.checkpoint_dir / "solo").mkdir()
    return d, guard


def test_parts_go_out_before_saved_and_the_commit_is_the_final_file(
    imds_sim: Any, spotd_daemon: Any, s3_bucket: S3Bucket, s3_proxy: FaultProxy
) -> None:
    """The trainer announces its temp file: whole parts are uploaded while it is written, before `saved`; after
    `saved` the daemon sends the tail, commits, and the stored object is the final file, rewritten part included."""
    d, guard = start(imds_sim, spotd_daemon, s3_bucket, s3_proxy)
    try:
        temp, final = d.checkpoint_dir / "solo" / ".s.pt.tmp-1", d.checkpoint_dir / "solo" / "s.pt"
        body = bytearray(os.urandom(13 * MIB))
        assert guard.writing("solo/s.pt", 10, temp="solo/.s.pt.tmp-1")
        with open(temp, "wb") as f:
            f.write(body[: 11 * MIB])
            f.flush()
            wait_until(lambda: parts_sent(s3_proxy) >= 2, timeout_s=20, what="two parts sent before saved")
            f.write(body[11 * MIB :])
            body[100:200] = b"x" * 100  # patched after part 1 went out
            f.seek(100)
            f.write(body[100:200])
        os.replace(temp, final)
        guard.saved("solo/s.pt", step=10)
        assert guard.wait_durable(timeout=30)
    finally:
        guard.close()
    keys = s3_bucket.keys("pfx/test-job/checkpoints/")
    data_key = next(k for k in keys if k.endswith("/solo/s.pt"))
    stored = s3_bucket.client.get_object(Bucket=s3_bucket.name, Key=data_key)["Body"].read()
    assert hashlib.sha256(stored).digest() == hashlib.sha256(bytes(body)).digest()
    manifest = json.loads(
        s3_bucket.client.get_object(
            Bucket=s3_bucket.name, Key=data_key.rsplit("/solo/", 1)[0] + "/MANIFEST.json"
        )["Body"].read()
    )
    assert manifest["files"][0]["size"] == len(body)
    (completed,) = d.logs.events("store.stream_completed")
    assert completed["parts_resent"] == 1 and completed["sent_before_saved"] >= 10 * MIB
    assert uploads_open(s3_bucket) == []
    _, text = d.get("/metrics")
    (early,) = [
        line for line in text.splitlines() if line.startswith("spotd_upload_bytes_before_saved_total")
    ]
    assert float(early.split()[-1]) == completed["sent_before_saved"]


def test_a_trainer_that_announces_and_disconnects_leaves_nothing_committed(
    imds_sim: Any, spotd_daemon: Any, s3_bucket: S3Bucket, s3_proxy: FaultProxy
) -> None:
    """Announced, parts sent, then the trainer is gone without `saved`: the multipart upload is aborted and no
    object, manifest or LATEST appears."""
    d, guard = start(imds_sim, spotd_daemon, s3_bucket, s3_proxy)
    try:
        temp = d.checkpoint_dir / "solo" / ".s.pt.tmp-1"
        assert guard.writing("solo/s.pt", 10, temp="solo/.s.pt.tmp-1")
        Path(temp).write_bytes(os.urandom(6 * MIB))
        wait_until(lambda: parts_sent(s3_proxy) >= 1, timeout_s=20, what="a part sent")
        assert uploads_open(s3_bucket) != []
    finally:
        guard.close()
    wait_until(lambda: d.logs.events("store.stream_aborted"), timeout_s=20, what="the stream aborted")
    wait_until(lambda: uploads_open(s3_bucket) == [], timeout_s=20, what="the multipart upload aborted")
    assert [k for k in s3_bucket.keys("pfx/test-job/") if "/checkpoints/" in k or k.endswith("LATEST")] == []


def test_each_file_of_an_announced_directory_goes_up_as_it_is_closed(
    imds_sim: Any, spotd_daemon: Any, s3_bucket: S3Bucket, s3_proxy: FaultProxy
) -> None:
    """A trainer announces a directory (`writing` with `dir`): each file is uploaded as soon as it is closed,
    before `saved`; the commit adopts them (nothing but the manifest and LATEST sent after `saved`), one
    MANIFEST.json lists every file and the stored bytes are the final files'."""
    d, guard = start(imds_sim, spotd_daemon, s3_bucket, s3_proxy)
    root = d.checkpoint_dir / "solo" / "step-10.dcp"
    bodies = {"__0_0.distcp": os.urandom(7 * MIB), "__1_0.distcp": os.urandom(2 * MIB), ".metadata": b"m"}
    try:
        assert guard.welcome is not None and guard.welcome["writing_dirs"] is True
        root.mkdir()
        assert guard.writing("solo/step-10.dcp", 10, directory=True, shared=True)
        wait_until(lambda: d.logs.events("overlap.started"), timeout_s=20, what="the directory watched")
        for name, body in bodies.items():
            (root / name).write_bytes(body)
        # Every file went up before saved: the 7 MiB file's two parts and the two small files.
        wait_until(lambda: parts_sent(s3_proxy) >= 2, timeout_s=20, what="the big file's parts sent")
        wait_until(lambda: puts_of(s3_proxy, "/.metadata") == 1, timeout_s=20, what="the last file sent")
        before = s3_proxy.bytes_in
        guard.saved("solo/step-10.dcp", step=10, shared=True)
        assert guard.wait_durable(timeout=30)
    finally:
        guard.close()
    assert s3_proxy.bytes_in - before < 64 * 1024
    (taken,) = d.logs.events("store.dir_stream_taken")
    (committed,) = d.logs.events("store.committed")
    assert taken["files_seen"] == 3 and committed["name"] == taken["name"]
    base = f"pfx/test-job/checkpoints/{committed['name']}/"
    manifest = json.loads(
        s3_bucket.client.get_object(Bucket=s3_bucket.name, Key=base + "MANIFEST.json")["Body"].read()
    )
    assert sorted(f["path"] for f in manifest["files"]) == sorted(f"solo/step-10.dcp/{n}" for n in bodies)
    for name, body in bodies.items():
        stored = s3_bucket.client.get_object(Bucket=s3_bucket.name, Key=f"{base}solo/step-10.dcp/{name}")
        assert stored["Body"].read() == body


def test_an_announced_directory_whose_trainer_leaves_is_removed_from_the_store(
    imds_sim: Any, spotd_daemon: Any, s3_bucket: S3Bucket, s3_proxy: FaultProxy
) -> None:
    """Files of an announced directory went up, then the trainer disconnected without `saved`: every object
    it uploaded is deleted, and no manifest or LATEST appears."""
    d, guard = start(imds_sim, spotd_daemon, s3_bucket, s3_proxy)
    root = d.checkpoint_dir / "solo" / "checkpoint-10"
    try:
        root.mkdir()
        assert guard.writing("solo/checkpoint-10", 10, directory=True)
        wait_until(lambda: d.logs.events("overlap.started"), timeout_s=20, what="the directory watched")
        (root / "model.safetensors").write_bytes(os.urandom(100_000))
        wait_until(
            lambda: puts_of(s3_proxy, "/model.safetensors") == 1, timeout_s=20, what="the file uploaded"
        )
    finally:
        guard.close()
    wait_until(lambda: d.logs.events("store.dir_stream_aborted"), timeout_s=20, what="the stream aborted")
    wait_until(
        lambda: (
            [k for k in s3_bucket.keys("pfx/test-job/") if "/checkpoints/" in k or k.endswith("LATEST")] == []
        ),
        timeout_s=20,
        what="the uploaded file deleted",
    )


def puts_of(proxy: FaultProxy, suffix: str) -> int:
    """PutObject requests (not parts) through the proxy for the object ending in ``suffix``."""
    return sum(
        1
        for action, method, path in proxy.log
        if action == "delay"
        and method == "PUT"
        and "partNumber" not in path
        and path.split("?")[0].endswith(suffix)
    )
