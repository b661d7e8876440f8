"""Whether the emergency upload fits before the deadline, said when the request goes out (issue 13 item 4).

The store measures its own upload rate from every periodic commit
(:meth:`~spotd.store.api.CheckpointStore.estimate_seconds`). When a checkpoint request goes out,
:class:`UploadBudget` prices what the trainers asked will send, taken as the size of each one's newest
durable checkpoint, at that rate and sets it against the seconds left to the episode's deadline. The
answer goes into the ``checkpoint.requested`` line, the ``checkpoint`` frame (so a
:class:`~spotd.integrations.torch.Checkpointer` may make the smaller emergency save its user gave it),
``spotd status`` and the metrics; one that does not fit is also a warning at once
(``checkpoint.deadline_at_risk``) naming what would make it fit.

What it does not count: the trainer's own save time before the upload starts (the deadline is when the
save should be *durable*, so that time comes out of the same budget), and unchanged files that would be
copied inside the store rather than sent. It is an estimate to act on, not a promise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from spotd.daemon.ipc import Session
from spotd.logs import get_logger
from spotd.metrics import Metrics
from spotd.store import CheckpointStore, Manifest

__all__ = ["AT_RISK_FIX", "UploadBudget", "UploadEstimate", "log_fields"]

log = get_logger("spotd.coordinator")

#: What makes an emergency upload fit, in the order a person would try it.
AT_RISK_FIX: Final = (
    "give spotd.torch.Checkpointer an emergency_exclude (e.g. ('optimizer',): weights only when time is "
    "short), save less (shard the optimizer state, fewer copies), move to an instance type with more "
    "network bandwidth, or raise store.concurrency / store.part_size"
)
#: A rate measured under ``store.background_rate`` at this share of the cap or above was held by the cap.
_CAPPED_SHARE: Final = 0.9
#: Periodic uploads whose threads waited for a core this share of their time or more were held back by the
#: trainer (``store.background_nice``); the rate leaves the waiting out only as an average over threads.
_STARVED_SHARE: Final = 0.1


@dataclass(frozen=True, slots=True)
class UploadEstimate:
    """How long the emergency upload of ``nbytes`` should take, against the time left when asked."""

    nbytes: int
    #: Seconds at the measured rate; None before a periodic upload was measured.
    seconds: float | None
    seconds_left: float
    bytes_per_second: float | None
    #: The rate was measured under ``store.background_rate``: an emergency upload (never capped) may be
    #: faster than this says.
    capped: bool = False
    #: The median share of their time the measured uploads' threads waited for a core (None: unknown).
    core_wait: float | None = None
    #: Every measured upload was held back to give the trainer its cores (``store.yield_to_trainer``):
    #: an emergency upload, which never is, may be faster than this says.
    yielded: bool = False

    @property
    def cpu_starved(self) -> bool:
        """The periodic uploads the rate comes from were held back by a busy trainer: an emergency upload
        (the daemon's priority, the trainer stopped to save) may be faster than this says."""
        return self.core_wait is not None and self.core_wait >= _STARVED_SHARE

    @property
    def fits(self) -> bool | None:
        """Whether the upload should be durable by the deadline; None when the rate is unknown."""
        return None if self.seconds is None else self.seconds <= self.seconds_left

    def log_fields(self) -> dict[str, Any]:
        """The figures of ``checkpoint.requested`` and ``checkpoint.deadline_at_risk``."""
        rate = self.bytes_per_second
        return {
            "estimate_seconds": None if self.seconds is None else round(self.seconds, 3),
            "estimate_bytes": self.nbytes,
            "upload_bytes_per_second": None if rate is None else round(rate),
            "fits": self.fits,
            "rate_capped": self.capped,
            "rate_core_wait": None if self.core_wait is None else round(self.core_wait, 3),
            "rate_cpu_starved": self.cpu_starved,
            "rate_yielded": self.yielded,
        }

    def frame_fields(self) -> dict[str, Any]:
        """The optional fields of the ``checkpoint`` frame: only when there is an estimate."""
        if self.seconds is None:
            return {}
        return {"estimate_seconds": round(self.seconds, 3), "fits": self.fits}

    def view(self) -> dict[str, Any]:
        """The request's ``upload`` entry in ``spotd status``."""
        return {
            "bytes": self.nbytes,
            "estimate_seconds": None if self.seconds is None else round(self.seconds, 1),
            "seconds_left": round(self.seconds_left, 1),
            "bytes_per_second": None if self.bytes_per_second is None else round(self.bytes_per_second),
            "fits": self.fits,
            "rate_capped": self.capped,
            "rate_cpu_starved": self.cpu_starved,
            "rate_yielded": self.yielded,
        }


def log_fields(estimate: UploadEstimate | None) -> dict[str, Any]:
    """``checkpoint.requested``'s figures of ``estimate``, null ones when there is none."""
    if estimate is None:
        return {"estimate_seconds": None, "estimate_bytes": None, "fits": None}
    return estimate.log_fields()


class UploadBudget:
    """The newest durable size of every trainer, priced at the store's measured rate."""

    __slots__ = ("_metrics", "_sizes", "_store")

    def __init__(self, *, store: CheckpointStore, metrics: Metrics) -> None:
        self._store = store
        self._metrics = metrics
        self._sizes: dict[tuple[str, int | None], int] = {}

    def saw(self, manifest: Manifest) -> None:
        """A checkpoint is durable (committed here, or restored at boot): its size is what that trainer's
        next emergency save will be like."""
        nbytes = manifest.total_bytes
        if manifest.nodes:
            nbytes //= manifest.nodes  # this node sends its own share of a multi-node checkpoint
        self._sizes[manifest.trainer, manifest.rank] = nbytes
        seconds = self._store.estimate_seconds(sum(self._sizes.values()))
        if seconds is not None:
            self._metrics.emergency_upload_estimate.set(seconds)

    def estimate(
        self, *, trainers: Sequence[Session], seconds_left: float, last: Manifest | None
    ) -> UploadEstimate | None:
        """The estimate of a request to ``trainers``, each sized by its newest durable checkpoint (``last``,
        the newest of all, for trainers none is known of); None: nothing was ever durable to size it by."""
        known = [self._sizes[k] for s in trainers if (k := (s.name, s.rank)) in self._sizes]
        # The newest of all otherwise: of a multi-node checkpoint, the share this node sends (its ranks'
        # saves are committed as one checkpoint, not one per trainer, so they are not known one by one).
        share = last.total_bytes // max(1, last.nodes or 1) if last is not None else 0
        nbytes = sum(known) if known else share
        if nbytes <= 0:
            return None
        seconds = self._store.estimate_seconds(nbytes)
        rate = nbytes / seconds if seconds else None
        cap = self._store.background_rate
        estimate = UploadEstimate(
            nbytes=nbytes,
            seconds=seconds,
            seconds_left=max(0.0, seconds_left),
            bytes_per_second=rate,
            capped=bool(cap and rate and rate >= _CAPPED_SHARE * cap),
            core_wait=self._store.background_core_wait,
            yielded=self._store.background_yielded,
        )
        if seconds is not None:
            self._metrics.request_upload_estimate.set(seconds)
        return estimate

    def warn(self, estimate: UploadEstimate | None, *, request_id: str, reason: str) -> None:
        """``checkpoint.deadline_at_risk`` when the estimate does not fit, counted by reason."""
        if estimate is None or estimate.fits is not False:
            return
        self._metrics.deadline_at_risk.labels(reason=reason).inc()
        fix = AT_RISK_FIX
        if estimate.capped:
            fix += (
                "; the rate was measured under store.background_rate, which emergency uploads are not held "
                "to: raise the cap if this warning is wrong"
            )
        if estimate.cpu_starved:
            fix += (
                f"; the periodic uploads the rate comes from waited for a core {estimate.core_wait:.0%} of "
                "their time (store.background_nice gives the trainer the cores first), and an emergency "
                "upload runs at the daemon's priority: lower store.background_nice (0 is the default) if "
                "this warning is wrong"
            )
        if estimate.yielded:
            fix += (
                "; the periodic uploads the rate comes from gave way to a busy trainer "
                "(store.yield_to_trainer), which an emergency upload does not: this warning may be wrong, "
                "and one periodic upload while the trainer waits on its GPU or its data measures the wire"
            )
        log.warning(
            "checkpoint.deadline_at_risk",
            request_id=request_id,
            seconds_left=round(estimate.seconds_left, 3),
            short_by_seconds=round((estimate.seconds or 0.0) - estimate.seconds_left, 3),
            fix=fix,
            **estimate.log_fields(),
        )
