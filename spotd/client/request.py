"""What the daemon asks of a trainer, as the training loop sees it. Stdlib only."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

__all__ = ["CheckpointRequest", "SpotdUnavailableWarning", "parse_deadline"]

log = logging.getLogger("spotd.client")


class SpotdUnavailableWarning(RuntimeWarning):
    """spotd does not answer: training goes on without emergency checkpoints."""


@dataclass(frozen=True)
class CheckpointRequest:
    """The daemon asks for a checkpoint before ``deadline``; ``final`` means the instance is going away.

    ``estimate_seconds`` and ``fits``, when the daemon knows its upload rate: how long uploading a save the
    size of the last one should take, and whether it should be durable by ``deadline`` (None: not known,
    or a daemon from before these fields)."""

    request_id: str
    reason: str
    deadline: datetime
    final: bool
    estimate_seconds: float | None = None
    fits: bool | None = None

    def seconds_left(self) -> float:
        return max(0.0, (self.deadline - datetime.now(UTC)).total_seconds())

    @classmethod
    def from_frame(cls, frame: dict[str, Any]) -> CheckpointRequest:
        """The request a ``checkpoint`` frame makes (its ``request_id`` a string, checked by the caller); an
        optional field of the wrong type is taken as absent."""
        estimate = frame.get("estimate_seconds")
        fits = frame.get("fits")
        return cls(
            request_id=str(frame["request_id"]),
            reason=str(frame.get("reason", "")),
            deadline=parse_deadline(frame.get("deadline")),
            final=bool(frame.get("final", False)),
            estimate_seconds=float(estimate)
            if isinstance(estimate, int | float) and not isinstance(estimate, bool)
            else None,
            fits=fits if isinstance(fits, bool) else None,
        )


def parse_deadline(value: Any) -> datetime:
    try:
        parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        # An unreadable deadline must not cost the checkpoint: treat it as "now", i.e. hurry.
        log.warning("spotd sent an unreadable deadline %r; treating it as now", value)
        return datetime.now(UTC)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
