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
    """The daemon asks for a checkpoint before ``deadline``; ``final`` means the instance is going away."""

    request_id: str
    reason: str
    deadline: datetime
    final: bool

    def seconds_left(self) -> float:
        return max(0.0, (self.deadline - datetime.now(UTC)).total_seconds())


def parse_deadline(value: Any) -> datetime:
    try:
        parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        # An unreadable deadline must not cost the checkpoint: treat it as "now", i.e. hurry.
        log.warning("spotd sent an unreadable deadline %r; treating it as now", value)
        return datetime.now(UTC)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
