"""The job ledger: every instance session of a job, recorded in the store as it happens.

Layout under the store URI, beside the checkpoints::

    <job_id>/ledger/sessions/<session>/<seq:06d>-<event>.json   one record per event, never rewritten
    <job_id>/ledger/sessions/<session>/heartbeat.json           the session's latest sign of life
    <job_id>/ledger/END.json                                    the job's end, written once (if absent)

A session is one run of the daemon on one instance, named ``<start time>-<instance id>`` so names sort in
time. Each record is its own small object written whole (S3 PUT; the file store's temp-then-rename), and no
session writes another's keys: a session that dies in the middle of a write leaves at most a temporary file
that ``list_keys`` does not show, never a damaged record of another session. A record that cannot be parsed
anyway (another tool, a disk gone bad) is skipped and named in :attr:`LedgerView.unreadable`.

Records are one schema, versioned (``"v": 1``): ``job_id``, ``session``, ``seq``, ``event`` (a
:class:`~spotd.events.SessionEventKind`), ``at``, ``instance`` (id, type, az, life_cycle, region) and
``data``, whose keys per event are listed on :class:`~spotd.events.SessionEventKind`. A reader keeps a
record of a newer version or an unknown event too, and only uses the fields it knows.

Only the store's public primitives are used (``put_bytes``, ``get_bytes``, ``list_keys``).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, Protocol

from spotd.errors import StoreError
from spotd.events import InstanceIdentity, Phase, SessionEventKind, format_time, parse_time
from spotd.logs import get_logger
from spotd.store.base import AlreadyExists, BaseStore

if TYPE_CHECKING:
    from spotd.store.api import CheckpointStore

__all__ = [
    "LEDGER_VERSION",
    "JobEnd",
    "Ledger",
    "LedgerObjects",
    "LedgerRecord",
    "LedgerView",
    "SessionWriter",
    "session_name",
]

log = get_logger("spotd.ledger")

LEDGER_VERSION: Final = 1
HEARTBEAT: Final = "heartbeat.json"
END: Final = "END.json"
#: Reads of one ledger at once: a long job has a few hundred small records.
_READ_CONCURRENCY: Final = 16


class LedgerObjects(Protocol):
    """The store primitives the ledger needs (:class:`~spotd.store.base.BaseStore` has them)."""

    async def put_bytes(self, key: str, data: bytes, *, if_absent: bool = False) -> None: ...
    async def get_bytes(self, key: str) -> bytes | None: ...
    async def list_keys(self, prefix: str) -> list[str]: ...


def session_name(instance_id: str, started: datetime) -> str:
    """``20261125T040000123Z-i-0abc``: sorts by start time; unique per daemon run on an instance."""
    stamp = started.astimezone(UTC).strftime("%Y%m%dT%H%M%S") + f"{started.microsecond // 1000:03d}Z"
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in instance_id) or "unknown"
    return f"{stamp}-{safe}"


def _identity_dict(identity: InstanceIdentity, region: str) -> dict[str, str]:
    return {
        "id": identity.instance_id,
        "type": identity.instance_type,
        "az": identity.availability_zone,
        "life_cycle": identity.life_cycle,
        "region": region,
    }


@dataclass(frozen=True, slots=True)
class LedgerRecord:
    """One event of one session, as stored."""

    job_id: str
    session: str
    seq: int
    event: str  # a SessionEventKind value; a newer writer's unknown event is kept as its string
    at: datetime
    instance: InstanceIdentity
    region: str
    data: dict[str, Any] = field(default_factory=dict)
    v: int = LEDGER_VERSION

    @property
    def kind(self) -> SessionEventKind | None:
        try:
            return SessionEventKind(self.event)
        except ValueError:
            return None

    def to_json(self) -> bytes:
        body = {
            "v": self.v,
            "job_id": self.job_id,
            "session": self.session,
            "seq": self.seq,
            "event": self.event,
            "at": format_time(self.at),
            "instance": _identity_dict(self.instance, self.region),
            "data": self.data,
        }
        return json.dumps(body, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> LedgerRecord:
        """Raises ValueError (or KeyError/TypeError) when ``raw`` is not a ledger record."""
        body = json.loads(raw)
        if not isinstance(body, dict) or not isinstance(body.get("v"), int) or body["v"] < 1:
            raise ValueError("not a ledger record (no version)")
        inst = body.get("instance") or {}
        data = body.get("data") or {}
        if not isinstance(inst, dict) or not isinstance(data, dict):
            raise ValueError("instance and data must be objects")
        return cls(
            v=body["v"],
            job_id=str(body["job_id"]),
            session=str(body["session"]),
            seq=int(body["seq"]),
            event=str(body["event"]),
            at=parse_time(str(body["at"])),
            instance=InstanceIdentity(
                instance_id=str(inst.get("id", "unknown")),
                instance_type=str(inst.get("type", "unknown")),
                availability_zone=str(inst.get("az", "unknown")),
                life_cycle=str(inst.get("life_cycle", "unknown")),
            ),
            region=str(inst.get("region", "")),
            data=data,
        )


@dataclass(frozen=True, slots=True)
class JobEnd:
    """``END.json``: how the job ended. Written once; the first writer wins."""

    job_id: str
    status: Phase  # COMPLETED | STOPPED
    reason: str  # "finished" | "complete" | MaxRuntimeExceeded | MaxWaitTimeExceeded
    at: datetime
    session: str
    instance_id: str
    checkpoint: str | None = None  # the final committed checkpoint's name
    step: int | None = None
    output: str | None = None  # where [output] dir went, as a URL

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "v": LEDGER_VERSION,
                "job_id": self.job_id,
                "status": self.status.value,
                "reason": self.reason,
                "at": format_time(self.at),
                "session": self.session,
                "instance_id": self.instance_id,
                "checkpoint": self.checkpoint,
                "step": self.step,
                "output": self.output,
            },
            sort_keys=True,
        ).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> JobEnd:
        body = json.loads(raw)
        status = Phase(body["status"])
        if status not in (Phase.COMPLETED, Phase.STOPPED):
            raise ValueError(f"a job ends Completed or Stopped, not {status.value}")
        step = body.get("step")
        return cls(
            job_id=str(body["job_id"]),
            status=status,
            reason=str(body.get("reason", "")),
            at=parse_time(str(body["at"])),
            session=str(body.get("session", "")),
            instance_id=str(body.get("instance_id", "unknown")),
            checkpoint=body.get("checkpoint"),
            step=step if isinstance(step, int) else None,
            output=body.get("output"),
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(self.to_json())
        out.pop("v", None)
        return out


@dataclass(frozen=True, slots=True)
class LedgerView:
    """Everything the ledger holds: records by session then seq, each session's heartbeat, the end."""

    job_id: str
    records: tuple[LedgerRecord, ...]
    heartbeats: dict[str, datetime]
    end: JobEnd | None
    unreadable: tuple[str, ...] = ()

    def sessions(self) -> dict[str, list[LedgerRecord]]:
        out: dict[str, list[LedgerRecord]] = {}
        for record in self.records:
            out.setdefault(record.session, []).append(record)
        for name in self.heartbeats:
            out.setdefault(name, [])
        return dict(sorted(out.items()))


class SessionWriter:
    """Appends one session's records, numbered in order. Not safe for concurrent appends: one writer task."""

    __slots__ = ("_identity", "_job_id", "_ledger", "_region", "_seq", "session")

    def __init__(self, *, ledger: Ledger, session: str, identity: InstanceIdentity, region: str) -> None:
        self._ledger = ledger
        self._job_id = ledger.job_id
        self.session = session
        self._identity = identity
        self._region = region
        self._seq = 0

    def record(self, kind: SessionEventKind, at: datetime, data: dict[str, Any]) -> LedgerRecord:
        """The next record of this session (not yet written)."""
        record = LedgerRecord(
            job_id=self._job_id,
            session=self.session,
            seq=self._seq,
            event=kind.value,
            at=at,
            instance=self._identity,
            region=self._region,
            data=data,
        )
        self._seq += 1
        return record

    async def write(self, record: LedgerRecord) -> str:
        """Store ``record`` under its own key (a retry rewrites the same bytes); returns the key."""
        key = f"{self._ledger.sessions_prefix}{self.session}/{record.seq:06d}-{record.event}.json"
        await self._ledger.objects.put_bytes(key, record.to_json())
        return key

    async def heartbeat(self, at: datetime) -> None:
        body = json.dumps({"v": LEDGER_VERSION, "session": self.session, "at": format_time(at)}).encode()
        key = f"{self._ledger.sessions_prefix}{self.session}/{HEARTBEAT}"
        await self._ledger.objects.put_bytes(key, body)


class Ledger:
    """One job's ledger in a store."""

    __slots__ = ("job_id", "objects")

    def __init__(self, *, objects: LedgerObjects, job_id: str) -> None:
        self.objects = objects
        self.job_id = job_id

    @classmethod
    def of_store(cls, store: CheckpointStore) -> Ledger:
        """The ledger of ``store``'s job, over its primitives."""
        if not isinstance(store, BaseStore):
            raise TypeError(f"{type(store).__name__} has no storage primitives for a ledger")
        return cls(objects=store, job_id=store.job_id)

    @property
    def prefix(self) -> str:
        return f"{self.job_id}/ledger/"

    @property
    def sessions_prefix(self) -> str:
        return f"{self.prefix}sessions/"

    def writer(self, *, session: str, identity: InstanceIdentity, region: str) -> SessionWriter:
        return SessionWriter(ledger=self, session=session, identity=identity, region=region)

    async def ended(self) -> JobEnd | None:
        """How the job ended, or None while it has not. Raises StoreError when the store cannot be read."""
        raw = await self.objects.get_bytes(self.prefix + END)
        if raw is None:
            return None
        try:
            return JobEnd.from_json(raw)
        except (ValueError, KeyError, TypeError) as exc:
            # An end nobody can read still is an end: never start the job again because of a bad byte.
            log.error("ledger.bad_end", key=self.prefix + END, error=str(exc))
            return JobEnd(
                job_id=self.job_id,
                status=Phase.STOPPED,
                reason=f"unreadable {END}",
                at=datetime.now(UTC),
                session="",
                instance_id="unknown",
            )

    async def mark_ended(self, end: JobEnd) -> tuple[JobEnd, bool]:
        """Write END.json unless there is one; returns the end that stands and whether it is ``end``."""
        key = self.prefix + END
        try:
            await self.objects.put_bytes(key, end.to_json(), if_absent=True)
            return end, True
        except AlreadyExists:
            raw = await self.objects.get_bytes(key)
            if raw == end.to_json():
                return end, True  # our own retried write had landed
            standing = await self.ended()
            if standing is None:  # pragma: no cover - deleted between the two calls
                raise StoreError(f"{key} exists and then did not") from None
            return standing, False

    async def read(self) -> LedgerView:
        """Every record, heartbeat and the end. Raises StoreError when the store cannot be listed."""
        keys = await self.objects.list_keys(self.prefix)
        beat_keys = [k for k in keys if k.endswith("/" + HEARTBEAT)]
        record_keys = [
            k
            for k in keys
            if k.startswith(self.sessions_prefix) and k.endswith(".json") and k not in beat_keys
        ]
        gate = asyncio.Semaphore(_READ_CONCURRENCY)

        async def get(key: str) -> bytes | None:
            async with gate:
                return await self.objects.get_bytes(key)

        bodies = await asyncio.gather(*(get(k) for k in [*record_keys, *beat_keys]))
        records: list[LedgerRecord] = []
        unreadable: list[str] = []
        for key, body in zip(record_keys, bodies[: len(record_keys)], strict=True):
            if body is None:
                continue  # deleted since the listing
            try:
                records.append(LedgerRecord.from_json(body))
            except (ValueError, KeyError, TypeError) as exc:
                unreadable.append(key)
                log.warning("ledger.bad_record", key=key, error=str(exc))
        heartbeats: dict[str, datetime] = {}
        for key, body in zip(beat_keys, bodies[len(record_keys) :], strict=True):
            session = key[len(self.sessions_prefix) :].split("/", 1)[0]
            try:
                heartbeats[session] = parse_time(json.loads(body or b"")["at"])
            except (ValueError, KeyError, TypeError) as exc:
                unreadable.append(key)
                log.warning("ledger.bad_record", key=key, error=str(exc))
        records.sort(key=lambda r: (r.session, r.seq))
        return LedgerView(
            job_id=self.job_id,
            records=tuple(records),
            heartbeats=heartbeats,
            end=await self.ended(),
            unreadable=tuple(unreadable),
        )
