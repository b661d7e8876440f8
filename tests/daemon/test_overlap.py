"""Upload overlapped with the save, end to end: a real `spotd run`, trainers' Guards on the real Unix
socket (a single trainer, and two local ranks of one torchrun-style run), moto behind the counting proxy."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest

from spotd.client import Guard, connect
from spotd.store.selection import run_checkpoint_name
from tests.fixtures.s3 import FaultProxy, S3Bucket
from tests.util import wait_until

MIB = 1024 * 1024
RUN = "20261201T190000Z-abc123"


def parts_sent(proxy: FaultProxy, key: str = "") -> int:
    """UploadParts the proxy saw (of the object whose key ends with ``key``)."""
    return sum(
        1
        for action, method, path in proxy.log
        if action == "delay"
        and method == "PUT"
        and "partNumber" in path
        and path.split("?", 1)[0].endswith(key)
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
        # Every file went up before saved: the 7 MiB file's two parts and the two small files (the proxy
        # logs a request when its head arrives and counts its bytes once the body is in: wait for both).
        total = sum(len(b) for b in bodies.values())
        wait_until(
            lambda: parts_sent(s3_proxy) >= 2 and puts_of(s3_proxy, "/.metadata") == 1,
            timeout_s=20,
            what="every file sent",
        )
        wait_until(lambda: s3_proxy.bytes_in >= total, timeout_s=20, what="every body received")
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


# ------------------------------------------------------------------------------------ ranks of one run


def start_ranks(
    imds_sim: Any,
    spotd_daemon: Any,
    s3_bucket: S3Bucket,
    s3_proxy: FaultProxy,
    env: dict[str, str] | None = None,
) -> tuple[Any, list[Guard]]:
    """A daemon on S3 with 5 MiB parts and two local ranks of one run connected (nothing asked yet)."""
    s3_proxy.add("delay", method="PUT", query="partNumber", times=10**9)  # logs every UploadPart
    d = spotd_daemon(
        imds_sim.url,
        store_uri=s3_bucket.uri(),
        endpoint_url=s3_proxy.endpoint_url,
        extra={"store": {"part_size": 5 * MIB}},
        env=env,
    )
    guards = [
        connect(
            f"train-r{r}",
            socket_path=d.socket,
            handle_sigterm=False,
            reconnect_interval_s=0.1,
            rank=r,
            world_size=2,
            local_rank=r,
            local_world_size=2,
            node_rank=0,
            run_id=RUN,
        )
        for r in (0, 1)
    ]
    wait_until(lambda: all(g.connected for g in guards), timeout_s=20, what="both ranks connected")
    (d.checkpoint_dir / "run").mkdir()
    return d, guards


def rank_file(step: int, rank: int) -> str:
    return f"run/step-{step:06d}-rank{rank}.pt"


def announce_and_write(d: Any, guard: Guard, proxy: FaultProxy, rel: str, step: int, **flags: Any) -> bytes:
    """As the Checkpointer does: announce ``rel``, write 13 MiB to its temp name (two parts wait to be sent
    before the tail is written, and part 1 is then patched), rename it into place. The final bytes."""
    temp_rel = rel.replace("/step-", "/.step-") + ".tmp-1"
    assert guard.writing(rel, step, temp=temp_rel, **flags), "the daemon did not take the announcement"
    body = bytearray(os.urandom(13 * MIB))
    with open(d.checkpoint_dir / temp_rel, "wb") as f:
        f.write(body[: 11 * MIB])
        f.flush()
        wait_until(lambda: parts_sent(proxy, rel) >= 2, timeout_s=20, what=f"two parts of {rel} sent")
        f.write(body[11 * MIB :])
        body[100:200] = b"x" * 100  # patched after part 1 went out
        f.seek(100)
        f.write(body[100:200])
    os.replace(d.checkpoint_dir / temp_rel, d.checkpoint_dir / rel)
    return bytes(body)


def get(bucket: S3Bucket, key: str) -> bytes:
    return bytes(bucket.client.get_object(Bucket=bucket.name, Key=key)["Body"].read())


@pytest.mark.timeout(120)
def test_two_local_ranks_stream_their_files_into_one_node_part(
    imds_sim: Any, spotd_daemon: Any, s3_bucket: S3Bucket, s3_proxy: FaultProxy
) -> None:
    """Two ranks of one run, asked for a final checkpoint, announce their files: parts of each go to the key of the run's checkpoint of that step before `saved`, a part patched afterwards is re-sent, neither hears `durable` before both saved, and one global manifest lists both files, stored byte for byte, with no multipart upload left open."""
    d, guards = start_ranks(imds_sim, spotd_daemon, s3_bucket, s3_proxy)
    try:
        assert all(g.welcome and g.welcome["writing"] is True for g in guards)
        imds_sim.arm_instance_action("terminate", after_s=0, lead_s=120)
        wait_until(lambda: all(g.checkpoint_requested for g in guards), timeout_s=20, what="both asked")
        name = run_checkpoint_name(RUN, 40)
        bodies = [announce_and_write(d, g, s3_proxy, rank_file(40, r), 40) for r, g in enumerate(guards)]
        prefix = f"/pfx/test-job/checkpoints/{name}/"
        assert parts_sent(s3_proxy, prefix + rank_file(40, 0)) >= 2
        assert parts_sent(s3_proxy, prefix + rank_file(40, 1)) >= 2

        guards[0].saved(rank_file(40, 0), step=40)
        wait_until(
            lambda: d.logs.events("checkpoint.part_waiting_for_ranks"), timeout_s=20, what="rank 1 awaited"
        )
        assert guards[0].wait_durable(timeout=0) is False
        assert not [k for k in s3_bucket.keys("pfx/") if k.endswith("MANIFEST.json")]
        guards[1].saved(rank_file(40, 1), step=40)
        assert all(g.wait_durable(timeout=30) for g in guards)
    finally:
        for g in guards:
            g.close()
    base = f"pfx/test-job/checkpoints/{name}/"
    manifest = json.loads(get(s3_bucket, base + "MANIFEST.json"))
    assert manifest["world_size"] == 2 and manifest["nodes"] == 1
    assert [f["path"] for f in manifest["files"]] == [rank_file(40, 0), rank_file(40, 1)]
    for r, body in enumerate(bodies):
        assert (
            hashlib.sha256(get(s3_bucket, base + rank_file(40, r))).digest() == hashlib.sha256(body).digest()
        )
    completed = d.logs.events("store.stream_completed")
    assert sorted(c["key"] for c in completed) == [base + rank_file(40, r) for r in (0, 1)]
    assert all(c["parts_resent"] == 1 and c["sent_before_saved"] >= 10 * MIB for c in completed)
    assert uploads_open(s3_bucket) == []
    _, text = d.get("/metrics")
    (early,) = [
        line for line in text.splitlines() if line.startswith("spotd_upload_bytes_before_saved_total")
    ]
    assert float(early.split()[-1]) == sum(c["sent_before_saved"] for c in completed)


@pytest.mark.timeout(120)
def test_a_node_part_whose_first_attempt_fails_aborts_the_streams_and_the_retry_uploads_plainly(
    imds_sim: Any, spotd_daemon: Any, s3_bucket: S3Bucket, s3_proxy: FaultProxy
) -> None:
    """The completion of a rank's stream fails (one try per request): the first attempt aborts both ranks' streams, the retry uploads both files without them, and the step is durable with the final bytes and no upload left open."""
    d, guards = start_ranks(imds_sim, spotd_daemon, s3_bucket, s3_proxy, env={"AWS_MAX_ATTEMPTS": "1"})
    try:
        imds_sim.arm_instance_action("terminate", after_s=0, lead_s=120)
        wait_until(lambda: all(g.checkpoint_requested for g in guards), timeout_s=20, what="both asked")
        bodies = [announce_and_write(d, g, s3_proxy, rank_file(40, r), 40) for r, g in enumerate(guards)]
        s3_proxy.add("500", method="POST", query="uploadId", body_has=b"CompleteMultipartUpload")
        for r, g in enumerate(guards):
            g.saved(rank_file(40, r), step=40)
        assert all(g.wait_durable(timeout=30) for g in guards)
    finally:
        for g in guards:
            g.close()
    assert len(d.logs.events("checkpoint.upload_retry")) == 1
    assert d.logs.events("store.stream_completed") == []
    assert len(d.logs.events("store.stream_aborted")) == 2
    base = f"pfx/test-job/checkpoints/{run_checkpoint_name(RUN, 40)}/"
    for r, body in enumerate(bodies):
        assert (
            hashlib.sha256(get(s3_bucket, base + rank_file(40, r))).digest() == hashlib.sha256(body).digest()
        )
    wait_until(lambda: uploads_open(s3_bucket) == [], timeout_s=20, what="every multipart upload ended")


@pytest.mark.timeout(120)
def test_a_step_given_up_aborts_the_stream_of_the_rank_that_saved(
    imds_sim: Any, spotd_daemon: Any, s3_bucket: S3Bucket, s3_proxy: FaultProxy
) -> None:
    """Rank 0 announces, streams and saves its file, rank 1 never saves: once the notice's time runs out the step is given up, rank 0's multipart upload is aborted, and nothing of the step is stored."""
    d, guards = start_ranks(imds_sim, spotd_daemon, s3_bucket, s3_proxy)
    try:
        imds_sim.arm_instance_action("terminate", after_s=0, lead_s=10)
        wait_until(lambda: all(g.checkpoint_requested for g in guards), timeout_s=20, what="both asked")
        rel = rank_file(40, 0)
        temp_rel = "run/.step-000040-rank0.pt.tmp-1"
        assert guards[0].writing(rel, 40, temp=temp_rel)
        (d.checkpoint_dir / temp_rel).write_bytes(os.urandom(6 * MIB))
        wait_until(lambda: parts_sent(s3_proxy, rel) >= 1, timeout_s=20, what="a part sent")
        os.replace(d.checkpoint_dir / temp_rel, d.checkpoint_dir / rel)
        guards[0].saved(rel, step=40)
        wait_until(
            lambda: d.logs.events("checkpoint.part_waiting_for_ranks"), timeout_s=20, what="rank 1 awaited"
        )
        assert uploads_open(s3_bucket) != []  # held by the step while it waits for rank 1
        wait_until(
            lambda: d.logs.events("checkpoint.part_incomplete"), timeout_s=40, what="the step given up"
        )
        assert guards[0].wait_durable(timeout=10) is False
    finally:
        for g in guards:
            g.close()
    (aborted,) = d.logs.events("store.stream_aborted")
    assert (
        aborted["key"].endswith(f"/{run_checkpoint_name(RUN, 40)}/{rel}") and aborted["sent_before_abort"] > 0
    )
    wait_until(lambda: uploads_open(s3_bucket) == [], timeout_s=20, what="the multipart upload aborted")
    assert [k for k in s3_bucket.keys("pfx/test-job/") if "/checkpoints/" in k or k.endswith("LATEST")] == []
    assert d.logs.events("store.stream_completed") == []


@pytest.mark.timeout(120)
def test_a_periodic_save_of_a_rank_is_announced_but_not_streamed(
    imds_sim: Any, spotd_daemon: Any, s3_bucket: S3Bucket, s3_proxy: FaultProxy
) -> None:
    """With no notice and no final flag the ranks' announced saves open no stream: nothing is sent before `saved`, and the step commits as a node part as always."""
    d, guards = start_ranks(imds_sim, spotd_daemon, s3_bucket, s3_proxy)
    try:
        for r, g in enumerate(guards):
            rel = rank_file(30, r)
            assert g.writing(rel, 30, temp=rel + ".tmp")
            (d.checkpoint_dir / rel).write_bytes(os.urandom(6 * MIB))
        assert parts_sent(s3_proxy) == 0
        for r, g in enumerate(guards):
            g.saved(rank_file(30, r), step=30)
        assert all(g.wait_durable(timeout=30) for g in guards)
    finally:
        for g in guards:
            g.close()
    assert d.logs.events("overlap.started") == [] and d.logs.events("store.stream_completed") == []
    manifest = json.loads(
        get(s3_bucket, f"pfx/test-job/checkpoints/{run_checkpoint_name(RUN, 30)}/MANIFEST.json")
    )
    assert len(manifest["files"]) == 2 and manifest["reason"] == "periodic"
    assert uploads_open(s3_bucket) == []


@pytest.mark.timeout(120)
def test_ranks_stopped_for_a_peer_on_another_node_stream_their_final_saves(
    imds_sim: Any, spotd_daemon: Any, s3_bucket: S3Bucket, s3_proxy: FaultProxy
) -> None:
    """No notice on this node: ranks stopped because a peer elsewhere was asked announce with final and save as peers, and their files are streamed and completed into the run's checkpoint of that step."""
    d, guards = start_ranks(imds_sim, spotd_daemon, s3_bucket, s3_proxy)
    try:
        for r, g in enumerate(guards):
            announce_and_write(d, g, s3_proxy, rank_file(50, r), 50, final=True)
        for r, g in enumerate(guards):
            g.saved(rank_file(50, r), step=50, final=True)
        assert all(g.wait_durable(timeout=30) for g in guards)
    finally:
        for g in guards:
            g.close()
    name = run_checkpoint_name(RUN, 50)
    started = d.logs.events("overlap.started")
    assert sorted(e["path"] for e in started) == [rank_file(50, 0), rank_file(50, 1)]
    assert {e["name"] for e in started} == {name}
    assert len(d.logs.events("store.stream_completed")) == 2
    manifest = json.loads(get(s3_bucket, f"pfx/test-job/checkpoints/{name}/MANIFEST.json"))
    assert manifest["reason"] == "peer" and len(manifest["files"]) == 2
    assert uploads_open(s3_bucket) == []


@pytest.mark.timeout(120)
def test_a_sharded_directory_of_two_ranks_streams_every_rank_s_files_into_the_node_part(
    imds_sim: Any, spotd_daemon: Any, s3_bucket: S3Bucket, s3_proxy: FaultProxy
) -> None:
    """Local rank 0 announces the step's DCP directory (dir, shared): the shards both ranks close in it go up
    before `saved`, under the run's name for that step; rank 0's shared `saved` commits the node part with
    them adopted (only the part, the manifest and LATEST sent after it), both ranks hear `durable`."""
    d, guards = start_ranks(imds_sim, spotd_daemon, s3_bucket, s3_proxy)
    s3_proxy.add("delay", method="PUT", times=10**9)  # and every PutObject
    root = d.checkpoint_dir / "run" / "step-000000040.dcp"
    bodies = {"__0_0.distcp": os.urandom(6 * MIB), "__1_0.distcp": os.urandom(6 * MIB), ".metadata": b"m"}
    try:
        assert all(g.welcome and g.welcome["writing_dirs"] is True for g in guards)
        imds_sim.arm_instance_action("terminate", after_s=0, lead_s=120)
        wait_until(lambda: all(g.checkpoint_requested for g in guards), timeout_s=20, what="both asked")
        root.mkdir()
        assert guards[0].writing("run/step-000000040.dcp", 40, directory=True, shared=True)
        wait_until(lambda: d.logs.events("overlap.started"), timeout_s=20, what="the directory watched")
        for name, body in bodies.items():
            (root / name).write_bytes(body)
        total = sum(len(b) for b in bodies.values())
        wait_until(lambda: s3_proxy.bytes_in >= total, timeout_s=30, what="every file sent before saved")
        before = s3_proxy.bytes_in
        guards[0].saved("run/step-000000040.dcp", step=40, shared=True)
        assert guards[0].wait_durable(timeout=30)
    finally:
        for g in guards:
            g.close()
    assert s3_proxy.bytes_in - before < 64 * 1024
    name = run_checkpoint_name(RUN, 40)
    (started,) = d.logs.events("overlap.started")
    (taken,) = d.logs.events("store.dir_stream_taken")
    assert started["name"] == taken["name"] == name and taken["files_seen"] == 3
    base = f"pfx/test-job/checkpoints/{name}/"
    manifest = json.loads(get(s3_bucket, base + "MANIFEST.json"))
    assert manifest["world_size"] == 2
    assert sorted(f["path"] for f in manifest["files"]) == sorted(
        f"run/step-000000040.dcp/{n}" for n in bodies
    )
    for n, body in bodies.items():
        assert get(s3_bucket, f"{base}run/step-000000040.dcp/{n}") == body


@pytest.mark.timeout(120)
def test_a_step_already_committed_is_not_streamed_again(
    imds_sim: Any, spotd_daemon: Any, s3_bucket: S3Bucket, s3_proxy: FaultProxy
) -> None:
    """Both ranks' periodic saves of step 40 are committed; an emergency announcement of step 40 again (a rank
    re-saving that step) opens no stream: nothing would write over the committed objects, nor delete them."""
    d, guards = start_ranks(imds_sim, spotd_daemon, s3_bucket, s3_proxy)
    name = run_checkpoint_name(RUN, 40)
    base = f"pfx/test-job/checkpoints/{name}/"
    try:
        bodies = []
        for r, g in enumerate(guards):
            body = os.urandom(1000)
            (d.checkpoint_dir / rank_file(40, r)).write_bytes(body)
            bodies.append(body)
            g.saved(rank_file(40, r), step=40)
        assert all(g.wait_durable(timeout=30) for g in guards)
        imds_sim.arm_instance_action("terminate", after_s=0, lead_s=120)
        wait_until(lambda: all(g.checkpoint_requested for g in guards), timeout_s=20, what="both asked")
        for r, g in enumerate(guards):
            assert g.writing(rank_file(40, r), 40, temp=f"run/.step-000040-rank{r}.pt.tmp-2", final=True)
        wait_until(lambda: len(d.logs.events("overlap.skipped")) == 2, timeout_s=20, what="both skipped")
    finally:
        for g in guards:
            g.close()
    assert d.logs.events("overlap.started") == []
    assert {e["name"] for e in d.logs.events("overlap.skipped")} == {name}
    for r, body in enumerate(bodies):
        assert get(s3_bucket, base + rank_file(40, r)) == body
