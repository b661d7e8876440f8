"""The Prometheus metrics of design.md, on an injected registry so tests use a fresh one."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from spotd.events import Phase

__all__ = ["JobFigures", "Metrics"]

# Detection is sub-second; checkpoint and upload run from seconds to the two-minute window and beyond.
_FAST_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0)
_SLOW_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 90.0, 120.0, 300.0, 600.0)


class _SecondsUntilInterruption(Collector):
    """Derived at scrape time, so it counts down without a task updating it."""

    def __init__(self, deadline: Callable[[], float], clock: Callable[[], float]) -> None:
        self._deadline = deadline
        self._clock = clock

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "spotd_seconds_until_interruption",
            "Seconds until the announced interruption (0 when none is announced or it has passed).",
        )
        deadline = self._deadline()
        family.add_metric([], max(0.0, deadline - self._clock()) if deadline else 0.0)
        yield family


@dataclass(frozen=True, slots=True)
class JobFigures:
    """The job across instances, as the daemon last worked it out; None where not known (no prices)."""

    sessions: int
    interruptions: int
    training_seconds: float
    cost_dollars: float | None = None
    on_demand_cost_dollars: float | None = None
    savings_ratio: float | None = None
    lost_work_dollars: float | None = None
    #: Seconds left under policy.max_run / policy.max_wait, for the budgets configured.
    budgets_remaining: tuple[tuple[str, float], ...] = ()


class _JobCollector(Collector):
    """The job's figures at scrape time; a figure not known yet has no sample rather than a false 0."""

    _GAUGES = (
        ("sessions", "spotd_job_sessions", "Instance sessions of this job so far, this one included."),
        ("interruptions", "spotd_job_interruptions", "Sessions of this job that ended interrupted."),
        ("training_seconds", "spotd_job_training_seconds", "Training seconds summed over the sessions."),
        ("cost_dollars", "spotd_job_cost_dollars", "USD the job's instances cost so far (spot prices)."),
        (
            "on_demand_cost_dollars",
            "spotd_job_on_demand_cost_dollars",
            "USD the job's training time would have cost on demand.",
        ),
        (
            "savings_ratio",
            "spotd_job_savings_ratio",
            "1 - billable/training seconds (SageMaker's savings, as a ratio).",
        ),
        ("lost_work_dollars", "spotd_job_lost_work_dollars", "USD of training lost to interruptions."),
    )

    def __init__(self, figures: Callable[[], JobFigures | None]) -> None:
        self._figures = figures

    def collect(self) -> Iterator[GaugeMetricFamily]:
        figures = self._figures()
        for attr, name, doc in self._GAUGES:
            family = GaugeMetricFamily(name, doc)
            value = None if figures is None else getattr(figures, attr)
            if value is not None:
                family.add_metric([], float(value))
            yield family
        budgets = GaugeMetricFamily(
            "spotd_job_budget_remaining_seconds",
            "Seconds left under policy.max_run / policy.max_wait (only those configured).",
            labels=["budget"],
        )
        for budget, left in figures.budgets_remaining if figures else ():
            budgets.add_metric([budget], max(0.0, left))
        yield budgets


class Metrics:
    """Every spotd metric. Labels stay low-cardinality: no request ids, paths or instance ids."""

    __slots__ = (
        "background_core_wait",
        "background_yielded",
        "checkpoint_failures",
        "checkpoint_requests",
        "checkpoint_seconds",
        "deadline_at_risk",
        "detect_seconds",
        "emergency_upload_estimate",
        "imds_malformed",
        "imds_requests",
        "imds_up",
        "info",
        "interruption_deadline",
        "job_figures",
        "last_durable_step",
        "last_durable_timestamp",
        "ledger_write_failures",
        "maintenance_events",
        "notice_to_durable_seconds",
        "notices",
        "phase",
        "registry",
        "request_upload_estimate",
        "restore_seconds",
        "socket_errors",
        "trainers",
        "upload_bytes",
        "upload_bytes_before_saved",
        "upload_bytes_copied",
        "upload_bytes_sent",
        "upload_failures",
        "upload_seconds",
        "upload_throughput",
        "webhook_attempts",
        "webhook_sends",
    )

    def __init__(
        self, *, registry: CollectorRegistry | None = None, clock: Callable[[], float] = time.time
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.imds_requests = Counter(
            "spotd_imds_requests",
            "IMDS requests by logical path and HTTP code (or timeout/error).",
            ["path", "code"],
            registry=r,
        )
        self.imds_malformed = Counter(
            "spotd_imds_malformed",
            "IMDS answers that could not be parsed and were not acted on.",
            ["path"],
            registry=r,
        )
        self.notices = Counter(
            "spotd_notices",
            "Interruption signals seen, once per distinct notice.",
            ["kind", "action"],
            registry=r,
        )
        self.checkpoint_requests = Counter(
            "spotd_checkpoint_requests",
            "Checkpoint requests sent to trainers, by reason.",
            ["reason"],
            registry=r,
        )
        self.checkpoint_failures = Counter(
            "spotd_checkpoint_failures", "Trainers that reported a failed checkpoint.", registry=r
        )
        self.upload_bytes = Counter(
            "spotd_upload_bytes",
            "Bytes committed to the checkpoint store (sent, or copied server-side when unchanged).",
            registry=r,
        )
        self.upload_bytes_sent = Counter(
            "spotd_upload_bytes_sent",
            "Bytes of committed checkpoints sent over the network to the checkpoint store.",
            registry=r,
        )
        self.upload_bytes_before_saved = Counter(
            "spotd_upload_bytes_before_saved",
            "Bytes of emergency saves sent while the trainer was still writing them (store.overlap): the "
            "head start an announced save got before its saved frame.",
            registry=r,
        )
        self.upload_bytes_copied = Counter(
            "spotd_upload_bytes_copied",
            "Bytes of committed checkpoints not sent: files unchanged since the previous commit, copied "
            "server-side.",
            registry=r,
        )
        self.upload_failures = Counter(
            "spotd_upload_failures",
            "Checkpoint commits that failed after all retries (the local checkpoint is kept).",
            registry=r,
        )
        self.socket_errors = Counter(
            "spotd_socket_errors",
            "Bad frames and broken connections on the trainer socket.",
            ["code"],
            registry=r,
        )
        self.detect_seconds = Histogram(
            "spotd_detect_seconds",
            "Notice issued (or first seen) to trainers asked.",
            buckets=_FAST_BUCKETS,
            registry=r,
        )
        self.checkpoint_seconds = Histogram(
            "spotd_checkpoint_seconds",
            "Request sent to trainer's 'saved'.",
            buckets=_SLOW_BUCKETS,
            registry=r,
        )
        self.upload_seconds = Histogram(
            "spotd_upload_seconds",
            "'saved' received to checkpoint committed.",
            buckets=_SLOW_BUCKETS,
            registry=r,
        )
        self.notice_to_durable_seconds = Histogram(
            "spotd_notice_to_durable_seconds",
            "Notice seen to every trainer's checkpoint committed.",
            buckets=_SLOW_BUCKETS,
            registry=r,
        )
        self.restore_seconds = Histogram(
            "spotd_restore_seconds",
            "Restore on boot: download and verify.",
            buckets=_SLOW_BUCKETS,
            registry=r,
        )
        self.phase = Gauge("spotd_phase", "1 for the current phase, 0 for the others.", ["phase"], registry=r)
        self.upload_throughput = Gauge(
            "spotd_upload_throughput_bytes_per_second",
            "Moving median of the bytes/s background uploads sent (0 until one was measured).",
            registry=r,
        )
        self.background_core_wait = Gauge(
            "spotd_background_core_wait_ratio",
            "Share of the last background upload's transfer-thread time spent runnable without a core (a "
            "trainer keeping the cores busy; more at a high store.background_nice). "
            "spotd_upload_throughput_bytes_per_second leaves it out.",
            registry=r,
        )
        self.background_yielded = Gauge(
            "spotd_background_yielded_ratio",
            "Share of the last background upload's transfer-thread time held back to give the trainers "
            "their cores (store.yield_to_trainer). An upload held back 10% or more does not set "
            "spotd_upload_throughput_bytes_per_second while others were not.",
            registry=r,
        )
        self.emergency_upload_estimate = Gauge(
            "spotd_emergency_upload_estimate_seconds",
            "Seconds an emergency upload of every trainer's newest durable checkpoint would take at the "
            "measured rate (0 until a periodic upload was measured).",
            registry=r,
        )
        self.request_upload_estimate = Gauge(
            "spotd_request_upload_estimate_seconds",
            "The upload estimate of the newest checkpoint request (0 before one had an estimate).",
            registry=r,
        )
        self.deadline_at_risk = Counter(
            "spotd_deadline_at_risk",
            "Checkpoint requests whose upload estimate did not fit the seconds left to their deadline.",
            ["reason"],
            registry=r,
        )
        self.trainers = Gauge("spotd_trainers", "Training processes connected.", registry=r)
        self.interruption_deadline = Gauge(
            "spotd_interruption_deadline_timestamp_seconds",
            "Unix time at which the instance goes away (0 when no notice).",
            registry=r,
        )
        self.last_durable_timestamp = Gauge(
            "spotd_last_durable_checkpoint_timestamp_seconds",
            "Unix time of the newest committed checkpoint.",
            registry=r,
        )
        self.last_durable_step = Gauge(
            "spotd_last_durable_step", "Training step of the newest committed checkpoint.", registry=r
        )
        self.imds_up = Gauge("spotd_imds_up", "1 while IMDS answers, 0 when it does not.", registry=r)
        # Alerts need the mode: in watch mode no trainer ever registers, by design (SpotdNoTrainer).
        self.info = Gauge(
            "spotd_info",
            "Always 1; the labels say which spotd runs and how (sync_mode: client | watch).",
            ["version", "sync_mode"],
            registry=r,
        )
        self.maintenance_events = Gauge(
            "spotd_maintenance_events",
            "Active scheduled maintenance events that stop or reboot the instance.",
            ["code"],
            registry=r,
        )
        self.ledger_write_failures = Counter(
            "spotd_ledger_write_failures",
            "Job ledger records (or heartbeats) not written after their retries.",
            registry=r,
        )
        self.webhook_sends = Counter(
            "spotd_webhook_sends",
            "Webhook messages by event and outcome (ok, failed after retries, dropped unsent).",
            ["event", "result"],
            registry=r,
        )
        self.webhook_attempts = Counter(
            "spotd_webhook_attempts",
            "Webhook POSTs by HTTP code (or timeout/error), retries included.",
            ["code"],
            registry=r,
        )
        #: Set by the daemon once it knows the job's history: read at every scrape.
        self.job_figures: JobFigures | None = None
        r.register(_SecondsUntilInterruption(lambda: self.interruption_deadline._value.get(), clock))
        r.register(_JobCollector(lambda: self.job_figures))
        self.set_phase(Phase.STARTING)
        # Counters with labels appear only once used; touch the label sets a dashboard queries.
        self.upload_bytes.inc(0)
        self.upload_bytes_sent.inc(0)
        self.upload_bytes_copied.inc(0)
        self.upload_bytes_before_saved.inc(0)
        self.upload_failures.inc(0)
        self.checkpoint_failures.inc(0)
        self.ledger_write_failures.inc(0)
        # A series that first appears at 1 has no increase() to alert on: the first notice of a daemon
        # would never fire SpotdInterruptionNotice. Every spot action starts at 0.
        for action in ("terminate", "stop", "hibernate"):
            self.notices.labels(kind="spot", action=action).inc(0)
            self.deadline_at_risk.labels(reason=f"spot-{action}").inc(0)

    def set_phase(self, phase: Phase) -> None:
        for p in Phase:
            self.phase.labels(phase=p.value).set(1 if p is phase else 0)
