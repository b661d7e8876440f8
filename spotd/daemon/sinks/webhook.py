"""The webhook sink: a message to a person for what they would want to hear about, as a Slack-compatible
incoming-webhook POST (``{"text": ...}``; ``[notify] template`` shapes the text).

Messages: a notice received, the emergency checkpoint durable (with notice → durable seconds), work lost, the
job Completed or Stopped, uploads failing. Each POST has ``[notify] timeout``; a 5xx, 429, timeout or broken
connection is retried :data:`ATTEMPTS` times in all with a doubling backoff, anything else is not. This runs
in the sink's own task (:mod:`spotd.daemon.sinks`): a slow or failing webhook never delays the emergency path
and never stops the daemon. Every POST is counted (``spotd_webhook_attempts_total{code}``) and every message
(``spotd_webhook_sends_total{event,result}``: ok, failed, dropped).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any, Final

import aiohttp

from spotd.events import InstanceIdentity, NoticeKind, SessionEvent, SessionEventKind
from spotd.logs import get_logger
from spotd.metrics import Metrics

__all__ = ["ATTEMPTS", "EVENTS", "WebhookSink", "message_for"]

log = get_logger("spotd.webhook")

#: POSTs of one message, the first included.
ATTEMPTS: Final = 3
#: The ``event`` label of each message kind.
EVENTS: Final = ("notice", "durable", "lost", "completed", "stopped", "upload_failed")
_RESULTS: Final = ("ok", "failed", "dropped")
_RETRIED: Final = frozenset({429, 500, 502, 503, 504})


def _human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{n} B"


def message_for(event: SessionEvent, *, job_id: str, identity: InstanceIdentity) -> tuple[str, str] | None:
    """(event label, text) for an event a person should hear about; None for the others."""
    d = event.data
    where = f"{identity.instance_id} ({identity.instance_type}, {identity.availability_zone})"
    if event.kind is SessionEventKind.NOTICE and d.get("kind") not in (NoticeKind.JOB.value, None):
        goes = f", the instance goes at {d['not_after']}" if d.get("not_after") else ""
        what = "an emergency checkpoint" if d.get("final") else "a checkpoint"
        return "notice", (
            f"spotd {job_id}: {d.get('kind')} notice ({d.get('action')}) on {where}{goes}; asked "
            f"{d.get('trainers', 0)} trainer(s) for {what}"
        )
    record = event.record
    if event.kind is SessionEventKind.INTERRUPTION and record is not None and record.final:
        if record.kind is NoticeKind.JOB:
            return None  # the job's end says it all
        if record.lost:
            return "lost", (
                f"spotd {job_id}: work lost on {where} ({record.kind.value} {record.action}): "
                + "; ".join(record.lost)
            )
        took = record.notice_to_durable_seconds
        names = ", ".join(f"{c.name} (step {c.step})" for c in record.durable) or "-"
        return "durable", (
            f"spotd {job_id}: emergency checkpoint durable "
            f"{'in ' + format(took, '.1f') + ' s after the notice' if took is not None else ''} on {where}: "
            f"{names}, {_human_bytes(record.total_bytes)}; the next instance resumes from it"
        )
    if event.kind is SessionEventKind.ENDED and not d.get("already"):
        status = str(d.get("status", ""))
        label = "completed" if status == "Completed" else "stopped"
        return label, (
            f"spotd {job_id}: job {status} ({d.get('reason')}) on {where}; final checkpoint "
            f"{d.get('checkpoint') or 'none'} (step {d.get('step')})"
            f"{'; output ' + str(d['output']) if d.get('output') else ''}"
        )
    if event.kind is SessionEventKind.UPLOAD_FAILED:
        step = f" step {d['step']}" if d.get("step") is not None else ""
        return "upload_failed", (
            f"spotd {job_id}: uploads failing on {where}: {d.get('trainer')}{step}: {d.get('error')}"
        )
    return None


class WebhookSink:
    """:class:`~spotd.daemon.sinks.Sink` POSTing messages to one webhook."""

    __slots__ = (
        "_attempts",
        "_backoff_s",
        "_identity",
        "_job_id",
        "_metrics",
        "_phase",
        "_session",
        "_sleep",
        "_template",
        "_timeout_s",
        "_url",
        "name",
    )

    def __init__(
        self,
        *,
        url: str,
        metrics: Metrics,
        job_id: str,
        identity: InstanceIdentity,
        template: str = "",
        timeout_s: float = 5.0,
        phase: Callable[[], str] = lambda: "",
        attempts: int = ATTEMPTS,
        backoff_s: float = 1.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.name = "webhook"
        self._url = url
        self._metrics = metrics
        self._job_id = job_id
        self._identity = identity
        self._template = template
        self._timeout_s = timeout_s
        self._phase = phase
        self._attempts = attempts
        self._backoff_s = backoff_s
        self._sleep = sleep
        self._session: aiohttp.ClientSession | None = None
        # Every series an alert may ask for exists from the start: increase() needs a first sample.
        for event in EVENTS:
            for result in _RESULTS:
                metrics.webhook_sends.labels(event=event, result=result).inc(0)

    def render(self, event: SessionEvent, label: str, text: str) -> dict[str, Any]:
        """The JSON body: Slack's ``{"text": ...}``, the text shaped by ``[notify] template`` when set."""
        if self._template:
            text = self._template.format(
                text=text,
                event=label,
                job_id=self._job_id,
                instance_id=self._identity.instance_id,
                instance_type=self._identity.instance_type,
                phase=self._phase(),
                detail=json.dumps(event.data, sort_keys=True, default=str),
            )
        return {"text": text}

    async def handle(self, event: SessionEvent) -> None:
        message = message_for(event, job_id=self._job_id, identity=self._identity)
        if message is None:
            return
        label, text = message
        try:
            ok = await self._post(label, self.render(event, label, text))
        except asyncio.CancelledError:  # shutdown came first
            self._metrics.webhook_sends.labels(event=label, result="dropped").inc()
            raise
        self._metrics.webhook_sends.labels(event=label, result="ok" if ok else "failed").inc()

    def dropped(self, event: SessionEvent) -> None:
        message = message_for(event, job_id=self._job_id, identity=self._identity)
        if message is not None:
            self._metrics.webhook_sends.labels(event=message[0], result="dropped").inc()

    async def _post(self, label: str, body: dict[str, Any]) -> bool:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self._timeout_s))
        last = ""
        for attempt in range(1, self._attempts + 1):
            retry = True
            try:
                async with self._session.post(self._url, json=body) as resp:
                    code = str(resp.status)
                    await resp.read()
                if 200 <= resp.status < 300:
                    self._metrics.webhook_attempts.labels(code=code).inc()
                    return True
                retry = resp.status in _RETRIED
                last = f"HTTP {code}"
            except TimeoutError:
                code, last = "timeout", f"no answer within {self._timeout_s:g} s"
            except (aiohttp.ClientError, OSError) as exc:
                code, last = "error", f"{type(exc).__name__}: {exc}"
            self._metrics.webhook_attempts.labels(code=code).inc()
            if not retry or attempt == self._attempts:
                break
            await self._sleep(self._backoff_s * 2 ** (attempt - 1))
        log.warning(
            "webhook.failed",
            message=label,
            attempts=attempt,
            error=last,
            fix="check [notify] webhook (the URL, the network from the instance); spotd goes on without it",
        )
        return False

    async def close(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()
