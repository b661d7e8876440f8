"""Nothing blocks the daemon's event loop: asyncio's debug mode reports every slow step, and an
interruption with a 50 MB checkpoint going to S3 must not produce one."""

from __future__ import annotations

import re

from tests.util import wait_until

# asyncio debug mode reports steps over 0.1 s; on a loaded 2-core CI machine scheduling noise alone can
# reach that, so the bound is a step that really blocked (boto3 client creation, hashing, file I/O).
BLOCKED_S = 0.2


def test_no_step_of_the_event_loop_blocks_during_an_interruption(
    imds_sim, spotd_daemon, trainer_procs, s3_bucket
):
    """With PYTHONASYNCIODEBUG=1, start-up, a final checkpoint of 50 MB to S3 and shutdown have no loop step over 0.2 s."""
    d = spotd_daemon(
        imds_sim.url,
        store_uri=s3_bucket.uri("p"),
        endpoint_url=s3_bucket.endpoint_url,
        env={"PYTHONASYNCIODEBUG": "1"},
    )
    t = trainer_procs(d.socket, "solo", "--size", str(50 * 1024 * 1024))
    wait_until(lambda: t.events("connected"), timeout_s=20, what="trainer connected")
    imds_sim.arm_instance_action("terminate")
    assert t.proc.wait(60) == 0
    assert t.events("durable")[0]["ok"] is True
    assert d.stop() == 0
    slow = [
        line
        for line in d.logs.lines
        if (m := re.search(r" took (\d+\.\d+) seconds", line)) and float(m.group(1)) > BLOCKED_S
    ]
    assert slow == []
