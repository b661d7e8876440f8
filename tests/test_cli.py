"""The `spotd` command's human output: what a person reads in `spotd status`."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from spotd.cli import _until, render_status
from spotd.events import format_time


def status(**request) -> dict:
    return {
        "phase": "Interrupted",
        "job_id": "j",
        "instance": {"id": "i-1", "type": "g5.2xlarge", "az": "us-east-1a", "life_cycle": "spot"},
        "imds_up": True,
        "store": "s3://b/p",
        "checkpoint_dir": "/opt/ml/checkpoints",
        "trainers": [],
        "request": request or None,
        "notices": [],
        "last_durable": None,
    }


def test_a_deadline_reads_as_a_countdown():
    """The request's deadline shows as 'in 1m50s', not as an ISO timestamp."""
    deadline = format_time(datetime.now(UTC) + timedelta(seconds=110.4))
    text = render_status(
        status(reason="spot-terminate", final=True, deadline=deadline, finished=False, outstanding=["train"])
    )
    assert "deadline in 1m50s" in text or "deadline in 1m49s" in text
    assert deadline not in text
    assert "waiting on train" in text


def test_a_request_shows_whether_its_upload_fits():
    """The request's upload estimate reads as seconds for MB against seconds left, and says AT RISK when it
    will not fit; a request without an estimate (rate not measured yet) shows no upload line."""
    deadline = format_time(datetime.now(UTC) + timedelta(seconds=110))
    common = {"reason": "spot-terminate", "final": True, "deadline": deadline, "finished": False}
    upload = {"bytes": 2_000_000_000, "estimate_seconds": 160.0, "seconds_left": 110.0, "fits": False}
    text = render_status(status(**common, outstanding=["train"], upload=upload))
    assert "~160.0 s for 2000 MB at the measured rate, 110.0 s left: AT RISK: will not fit" in text
    fits = render_status(
        status(**common, outstanding=["train"], upload={**upload, "estimate_seconds": 20.0, "fits": True})
    )
    assert "110.0 s left: fits" in fits and "rate measured" not in fits
    held = render_status(status(**common, outstanding=["train"], upload={**upload, "rate_cpu_starved": True}))
    assert "AT RISK: will not fit (rate measured while the trainer held the cores)" in held
    gave_way = render_status(status(**common, outstanding=["train"], upload={**upload, "rate_yielded": True}))
    assert "AT RISK: will not fit (rate measured while periodic uploads gave way to the trainer)" in gave_way
    unknown = render_status(
        status(**common, outstanding=["train"], upload={**upload, "estimate_seconds": None})
    )
    assert "upload" not in unknown.replace("uploading", "")


def test_status_shows_the_periodic_uploads_and_how_they_give_way():
    """The periodic uploads' rate (what an emergency upload is estimated at), the last one and how much of
    it was held back for the trainer, and the window they are held to now."""
    uploads = {
        "rate_bytes_per_second": 57e6,
        "samples": 5,
        "rate_yielded": False,
        "core_wait": 0.02,
        "cap_bytes_per_second": None,
        "last": {
            "bytes": 256e6,
            "seconds": 26.5,
            "core_wait": 0.04,
            "yielded": 0.84,
            "time": format_time(datetime.now(UTC) - timedelta(minutes=4)),
        },
        "yielding": {"trainers": [4242], "slowdown": 0.05, "window": 0.25, "slots": 16, "pressure": 0.8},
    }
    text = render_status({**status(), "uploads": uploads})
    assert "periodic uploads  57 MB/s measured, median of 5 uploads" in text
    assert (
        "last: 256 MB in 26.5 s, 4 min ago, held back 84% of its time to give the trainer its cores" in text
    )
    assert "waited for a core 4% of it" in text
    assert "giving way to pid 4242: one part in flight 25% of the time" in text
    assert "slowed 0.8 x what store.yield_to_trainer 0.05 allows" in text
    wide = {**uploads["yielding"], "window": 16.0, "pressure": None}
    assert "16 of 16 parts in flight" in render_status({**status(), "uploads": {**uploads, "yielding": wide}})
    held = {**uploads, "rate_yielded": True, "cap_bytes_per_second": 20e6}
    text = render_status({**status(), "uploads": held})
    assert "capped at 20 MB/s (store.background_rate)" in text
    assert "all held back for the trainer (an emergency upload may be faster)" in text
    fresh = {**uploads, "rate_bytes_per_second": None, "samples": 0, "last": None, "yielding": None}
    text = render_status({**status(), "uploads": fresh})
    assert "none measured yet" in text and "last:" not in text and "giving way" not in text
    blind = {**uploads, "yielding": {**uploads["yielding"], "unreadable": True}}
    text = render_status({**status(), "uploads": blind})
    assert "not giving way" in text and "store.background_rate" in text
    assert "periodic uploads" not in render_status(status())  # a daemon from before says nothing of them


def test_until_says_ago_for_a_passed_deadline():
    """A deadline already passed reads '20s ago'; hours read as 2h05m."""
    now = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
    assert _until(format_time(now - timedelta(seconds=20)), now=now) == "20s ago"
    assert _until(format_time(now + timedelta(hours=2, minutes=5)), now=now) == "in 2h05m"
    assert _until("not a time", now=now) == "not a time"


def test_a_finished_request_says_whether_anything_was_lost():
    """A finished request reads "done: all durable" or "done, lost: ..." with the reasons, never a bare "(done)"; one still uploading says so."""
    deadline = format_time(datetime.now(UTC))
    common = {"reason": "spot-terminate", "final": True, "deadline": deadline, "finished": True}
    ok = render_status(status(**common, settled=True, ok=True, lost=[], outstanding=[]))
    assert "done: all durable" in ok
    lost = render_status(
        status(
            **common,
            settled=True,
            ok=False,
            lost=["rank0: no checkpoint before the deadline", "rank1: disk full"],
            outstanding=[],
        )
    )
    assert "done, lost: rank0: no checkpoint before the deadline; rank1: disk full" in lost
    late = render_status(
        status(**common, settled=True, ok=True, lost=[], late=["rank0: durable 2.0 s after the deadline"])
    )
    assert "done: all durable (rank0: durable 2.0 s after the deadline)" in late
    uploading = render_status(status(**common, settled=False, ok=None, lost=[], outstanding=["rank0"]))
    assert "closed, still uploading: rank0" in uploading
