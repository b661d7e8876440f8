"""The webhook sink: Slack-compatible messages for what a person should hear, bounded retries with backoff
and a timeout, every send counted; a slow or dead webhook never delays the emergency path."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from spotd.daemon.sinks import Sinks
from spotd.daemon.sinks.webhook import WebhookSink
from spotd.events import (
    DurableCheckpoint,
    InstanceIdentity,
    InterruptionRecord,
    NoticeKind,
    SessionEventKind,
)
from spotd.metrics import Metrics
from tests.fixtures.aws import Webhook
from tests.util import async_wait_until, wait_until

IDENTITY = InstanceIdentity("i-0aaa", "g5.2xlarge", "us-east-1a", "spot")
NOW = datetime(2026, 11, 25, 4, 0, tzinfo=UTC)


def counter(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def record(*, lost: tuple[str, ...] = ()) -> InterruptionRecord:
    return InterruptionRecord(
        request_id="r1",
        kind=NoticeKind.SPOT,
        action="terminate",
        reason="spot-terminate",
        final=True,
        instance_id="i-0aaa",
        instance_type="g5.2xlarge",
        notice_time=NOW,
        detected_at=NOW,
        deadline=NOW,
        detect_seconds=0.01,
        checkpoint_seconds=1.0,
        upload_seconds=2.0,
        notice_to_durable_seconds=3.25,
        total_bytes=4_000_000,
        trainers=1,
        durable=() if lost else (DurableCheckpoint(trainer="t", name="c7", step=700),),
        lost=lost,
    )


async def test_a_500_then_200_is_retried_and_counted(webhook_factory: Any) -> None:
    """One message: the first POST gets 500, the retry 200; two attempts counted by code, one send ok;
    the body is Slack's {"text": ...} saying what happened."""
    hook: Webhook = webhook_factory(script=[500])
    metrics = Metrics()
    sink = WebhookSink(url=hook.url, metrics=metrics, job_id="job", identity=IDENTITY, backoff_s=0.05)
    sinks = Sinks(sinks=[sink])
    sinks.emit(SessionEventKind.INTERRUPTION, record=record())
    assert await sinks.flush(timeout_s=10)
    await sinks.close(grace_s=1)
    assert hook.statuses == [500, 200]
    (text,) = hook.texts()
    assert "emergency checkpoint durable in 3.2 s after the notice" in text and "c7 (step 700)" in text
    assert counter(metrics, "spotd_webhook_attempts_total", code="500") == 1
    assert counter(metrics, "spotd_webhook_attempts_total", code="200") == 1
    assert counter(metrics, "spotd_webhook_sends_total", event="durable", result="ok") == 1
    assert counter(metrics, "spotd_webhook_sends_total", event="durable", result="failed") == 0


async def test_a_webhook_that_never_answers_gives_up_in_bounded_time(webhook_factory: Any) -> None:
    """Every POST times out: three attempts, then the message is counted failed; whatever was still queued
    at shutdown is counted dropped, and close() keeps to its grace."""
    hook: Webhook = webhook_factory(never_answer=True)
    metrics = Metrics()
    sink = WebhookSink(
        url=hook.url, metrics=metrics, job_id="job", identity=IDENTITY, timeout_s=0.3, backoff_s=0.05
    )
    sinks = Sinks(sinks=[sink])
    started = time.monotonic()
    sinks.emit(SessionEventKind.UPLOAD_FAILED, trainer="t", step=5, error="S3 503")
    sinks.emit(SessionEventKind.INTERRUPTION, record=record(lost=("t: no checkpoint before the deadline",)))
    await async_wait_until(
        lambda: counter(metrics, "spotd_webhook_sends_total", event="upload_failed", result="failed") == 1,
        timeout_s=10,
    )
    assert time.monotonic() - started < 3 * 0.3 + 0.05 + 0.1 + 1.0, "3 timeouts and 2 backoffs, not more"
    assert counter(metrics, "spotd_webhook_attempts_total", code="timeout") == 3
    closing = time.monotonic()
    await sinks.close(grace_s=0.2)
    assert time.monotonic() - closing < 1.0
    assert counter(metrics, "spotd_webhook_sends_total", event="lost", result="dropped") == 1


async def test_the_template_shapes_the_text(webhook_factory: Any) -> None:
    """[notify] template names the fields; events nobody needs to hear about send nothing."""
    hook: Webhook = webhook_factory()
    sink = WebhookSink(
        url=hook.url,
        metrics=Metrics(),
        job_id="job",
        identity=IDENTITY,
        template=":rotating_light: [{event}] {job_id} on {instance_id} ({phase}): {text}",
        phase=lambda: "Interrupted",
    )
    sinks = Sinks(sinks=[sink])
    sinks.emit(SessionEventKind.BOOT)
    sinks.emit(SessionEventKind.DURABLE, name="c1", step=1)
    sinks.emit(
        SessionEventKind.NOTICE,
        kind="spot",
        action="terminate",
        final=True,
        not_after="2026-11-25T04:02:00.000Z",
        trainers=2,
    )
    assert await sinks.flush(timeout_s=10)
    await sinks.close(grace_s=1)
    (text,) = hook.texts()
    assert text.startswith(":rotating_light: [notice] job on i-0aaa (Interrupted): spotd job: spot notice")
    assert (
        "goes at 2026-11-25T04:02:00.000Z" in text
        and "asked 2 trainer(s) for an emergency checkpoint" in text
    )


def test_a_dead_webhook_never_delays_the_emergency_checkpoint(
    imds_sim: Any, spotd_daemon: Any, trainer_procs: Any, webhook_factory: Any
) -> None:
    """A daemon whose webhook never answers (5 s timeout, 3 tries): the spot notice's checkpoint is durable
    well within one webhook timeout, the daemon stays up, and the stuck sends show on /metrics; a second
    daemon, whose webhook answers 500 then 200, delivers the notice and the durable message."""
    dead: Webhook = webhook_factory(never_answer=True)
    d = spotd_daemon(imds_sim.url, extra={"notify": {"webhook": dead.url, "timeout": 5.0}})
    t = trainer_procs(d.socket, "train")
    wait_until(lambda: t.events("connected"), timeout_s=20, what="trainer connected")
    imds_sim.arm_instance_action("terminate", after_s=0, lead_s=120)
    assert t.proc.wait(60) == 0
    (handled,) = d.logs.wait(
        lambda e: [x for x in e if x.get("event") == "interruption.handled"],
        timeout_s=20,
        what="interruption handled",
    )
    assert handled["lost"] == [] and handled["notice_to_durable_seconds"] < 2.0
    wait_until(
        lambda: metric(d, "spotd_webhook_attempts_total", code="timeout") >= 1,
        timeout_s=20,
        what="a webhook POST timed out",
    )
    assert d.proc.poll() is None and len(dead.bodies) >= 1
    assert d.stop() == 0

    flaky: Webhook = webhook_factory(script=[500])
    imds_sim.clear()
    d2 = spotd_daemon(imds_sim.url, extra={"notify": {"webhook": flaky.url, "timeout": 5.0}})
    t2 = trainer_procs(d2.socket, "train2")
    wait_until(lambda: t2.events("connected"), timeout_s=20, what="trainer connected")
    imds_sim.arm_instance_action("terminate", after_s=0, lead_s=120)
    assert t2.proc.wait(60) == 0
    wait_until(lambda: len(flaky.texts()) >= 2, timeout_s=30, what="two messages delivered")
    notice, durable = flaky.texts()[:2]
    assert "spot notice (terminate)" in notice and "emergency checkpoint durable" in durable
    assert flaky.statuses[:2] == [500, 200]
    assert metric(d2, "spotd_webhook_sends_total", event="notice", result="ok") == 1
    assert metric(d2, "spotd_webhook_attempts_total", code="500") == 1
    assert d2.stop() == 0


def metric(d: Any, name: str, **labels: str) -> float:
    status, text = d.get("/metrics")
    assert status == 200
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0
