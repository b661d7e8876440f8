"""The job across instances, as this daemon sees it: the ledger read at boot plus this session's records.

It answers what the rest of the daemon asks about the job (its history so far, the training seconds the
budgets count, when it first started) and keeps the job figures on /metrics current: counts at once, costs
every :data:`COST_REFRESH_S` (they take EC2 and Price List calls).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Final

from spotd.aws.pricing import PriceBook
from spotd.config import Config
from spotd.daemon.costs import price_history
from spotd.daemon.sinks.ledger import LedgerSink
from spotd.errors import StoreError
from spotd.logs import get_logger
from spotd.metrics import JobFigures, Metrics
from spotd.store.history import JobHistory, summarize
from spotd.store.ledger import Ledger, LedgerView

__all__ = ["COST_REFRESH_S", "Job"]

log = get_logger("spotd.job")

#: How often the job's cost figures are looked up again while the daemon runs.
COST_REFRESH_S: Final = 300.0


class Job:
    """The job's history: ``load()`` once at boot, then ``history()`` whenever asked."""

    __slots__ = ("_config", "_costed", "_ledger", "_metrics", "_prices", "_prior", "_sink", "_wall")

    def __init__(
        self,
        *,
        config: Config,
        ledger: Ledger,
        sink: LedgerSink,
        metrics: Metrics,
        prices: PriceBook | None,
        wall: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._config = config
        self._ledger = ledger
        self._sink = sink
        self._metrics = metrics
        self._prices = prices
        self._wall = wall
        self._prior = LedgerView(job_id=config.job_id, records=(), heartbeats={}, end=None)
        self._costed: JobHistory | None = None

    @property
    def ledger(self) -> Ledger:
        return self._ledger

    @property
    def session(self) -> str:
        return self._sink.session

    @property
    def prior(self) -> LedgerView:
        return self._prior

    async def load(self) -> LedgerView:
        """Read what earlier sessions recorded; a store that cannot be read leaves the job's past unknown
        (logged: budgets then count this session only) rather than stopping the daemon."""
        try:
            view = await self._ledger.read()
        except (StoreError, OSError) as exc:
            log.warning(
                "ledger.read_failed",
                error=str(exc),
                note="earlier sessions unknown: policy.max_run and the job metrics count this session only",
            )
            return self._prior
        self._prior = view
        log.info(
            "ledger.loaded",
            sessions=len(view.sessions()),
            records=len(view.records),
            unreadable=len(view.unreadable),
            ended=None if view.end is None else view.end.status.value,
        )
        self.update_figures()
        return view

    def history(self) -> JobHistory:
        """The job so far, this session included, without costs."""
        return summarize(self._sink.view(self._prior), now=self._wall())

    def training_seconds(self) -> float:
        return self.history().training_seconds

    def first_started_at(self) -> datetime:
        started = self.history().first_started_at
        return started or self._wall()

    def update_figures(self) -> None:
        """The job figures on /metrics: counts from the history now, costs as last looked up."""
        history = self.history()
        costed = self._costed
        savings = None if costed is None or costed.savings_percent is None else costed.savings_percent / 100
        self._metrics.job_figures = JobFigures(
            sessions=len(history.sessions),
            interruptions=history.interruptions,
            training_seconds=history.training_seconds,
            cost_dollars=None if costed is None else costed.cost_usd,
            on_demand_cost_dollars=None if costed is None else costed.on_demand_cost_usd,
            savings_ratio=savings,
            lost_work_dollars=None if costed is None else costed.lost_work_usd,
            budgets_remaining=self.budgets_remaining(history),
        )

    def budgets_remaining(self, history: JobHistory) -> tuple[tuple[str, float], ...]:
        policy = self._config.policy
        out: list[tuple[str, float]] = []
        if policy.max_run:
            out.append(("max_run", policy.max_run - history.training_seconds))
        if policy.max_wait:
            started = history.first_started_at or self._wall()
            out.append(("max_wait", policy.max_wait - (self._wall() - started).total_seconds()))
        return tuple(out)

    async def refresh_costs(self) -> JobHistory | None:
        """Look the prices up again; None when prices are not looked up here."""
        if self._prices is None:
            return None
        costed = await price_history(self.history(), self._prices)
        if costed.cost_usd is not None:
            self._costed = costed
        self.update_figures()
        return costed

    async def figures_loop(self, *, interval_s: float = 1.0, cost_every_s: float = COST_REFRESH_S) -> None:
        """Keep the job figures current until cancelled: counts every ``interval_s``, costs less often."""
        next_cost = 0.0
        loop = asyncio.get_running_loop()
        while True:
            if self._prices is not None and loop.time() >= next_cost:
                next_cost = loop.time() + cost_every_s
                try:
                    await self.refresh_costs()
                except Exception as exc:  # a price lookup never stops the daemon
                    log.warning("costs.refresh_failed", error=repr(exc))
            self.update_figures()
            await asyncio.sleep(interval_s)
