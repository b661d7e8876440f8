"""Which checkpoints: names that sort by time, what a listing holds, restore candidates per rank, what
retention deletes. Pure functions over names and manifests; the store does the I/O around them."""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from spotd.store.manifest import MANIFEST, Manifest, Provenance

__all__ = [
    "Candidates",
    "IncompleteStep",
    "Listing",
    "Retention",
    "checkpoint_name",
    "event_name",
    "named_candidates",
    "plan_retention",
    "restore_candidates",
    "sanitize",
    "scan_listing",
]


def sanitize(text: str, limit: int = 40) -> str:
    """``text`` as a key component: letters, digits and ``_.-`` kept, anything else ``_``; never empty."""
    out = "".join(c if c.isalnum() or c in "_.-" else "_" for c in text)[:limit]
    return out or "x"


def checkpoint_name(info: Provenance, now: datetime) -> str:
    """``20261125T040000.123456Z-s000000500-train-r0-1a2b``: names sort by commit time, so a listing is
    authoritative and LATEST is only a hint."""
    step = f"s{info.step:09d}" if info.step is not None else "s---------"
    rank = f"-r{info.rank}" if info.rank is not None else ""
    # The random tail makes names unique across instances that commit in the same microsecond.
    return f"{now.strftime('%Y%m%dT%H%M%S.%fZ')}-{step}-{sanitize(info.trainer)}{rank}-{secrets.token_hex(2)}"


def event_name(instance_id: str, now: datetime) -> str:
    """The file name of one interruption record under ``<job>/events/``."""
    return f"{now.strftime('%Y%m%dT%H%M%S.%fZ')}-{sanitize(instance_id or 'unknown', 64)}.json"


@dataclass(frozen=True, slots=True, kw_only=True)
class Listing:
    """The checkpoint directories under ``checkpoints/``: every name, and those with a MANIFEST.json."""

    names: frozenset[str]
    with_manifest: tuple[str, ...]


def scan_listing(keys: Iterable[str], prefix: str) -> Listing:
    """Group the keys under ``prefix`` (``<job>/checkpoints/``) by checkpoint name; hidden (``.``) names
    are half-written temporaries and not checkpoints."""
    names: set[str] = set()
    with_manifest: list[str] = []
    for key in keys:
        name, _, tail = key[len(prefix) :].partition("/")
        if not name or name.startswith("."):
            continue
        names.add(name)
        if tail == MANIFEST:
            with_manifest.append(name)
    return Listing(names=frozenset(names), with_manifest=tuple(with_manifest))


@dataclass(frozen=True, slots=True, kw_only=True)
class IncompleteStep:
    """A multi-rank step some rank has not committed (yet, or ever): not restorable."""

    step: int | None
    world_size: int
    ranks: tuple[int, ...]  # the ranks that did commit it


@dataclass(frozen=True, slots=True, kw_only=True)
class Candidates:
    """Restore candidates newest first; each set is restored together or not at all."""

    sets: tuple[tuple[Manifest, ...], ...]
    incomplete: tuple[IncompleteStep, ...]


def restore_candidates(manifests: Sequence[Manifest]) -> Candidates:
    """``manifests`` newest first → what a restore without a name tries, in order. A multi-rank checkpoint
    (world_size > 1) is restorable only as a consistent set: every rank's newest checkpoint of that same
    step; a step with a rank missing is skipped, which falls back to an older step."""
    sets: list[tuple[Manifest, ...]] = []
    incomplete: list[IncompleteStep] = []
    seen: set[tuple[int | None, int]] = set()
    for m in manifests:
        if not m.world_size or m.world_size <= 1:
            sets.append((m,))
            continue
        key = (m.step, m.world_size)
        if key in seen:
            continue
        seen.add(key)
        by_rank: dict[int | None, Manifest] = {}
        for other in manifests:  # newest first, so the first per rank is the newest
            if other.step == m.step and other.world_size == m.world_size:
                by_rank.setdefault(other.rank, other)
        if all(r in by_rank for r in range(m.world_size)):
            sets.append(tuple(by_rank[r] for r in range(m.world_size)))
        else:
            ranks = tuple(sorted(r for r in by_rank if r is not None))
            incomplete.append(IncompleteStep(step=m.step, world_size=m.world_size, ranks=ranks))
    return Candidates(sets=tuple(sets), incomplete=tuple(incomplete))


def named_candidates(manifests: Sequence[Manifest], name: str) -> tuple[tuple[Manifest, ...], ...]:
    """What a restore of ``name`` tries: that checkpoint, then older ones of the same rank (an explicit
    name still falls back when it fails to verify). Empty when no checkpoint has that name."""
    chosen = next((m for m in manifests if m.name == name), None)
    if chosen is None:
        return ()
    older = [(m,) for m in manifests if m.name < name and m.rank == chosen.rank]
    return ((chosen,), *older)


@dataclass(frozen=True, slots=True, kw_only=True)
class Retention:
    """What a retention pass deletes: committed checkpoints past ``keep`` and abandoned directories."""

    doomed: tuple[str, ...]  # committed; delete MANIFEST.json first so a crash leaves an orphan, never half
    orphans: tuple[str, ...]  # never committed and older than every kept commit


def plan_retention(
    manifests: Sequence[Manifest], names: Iterable[str], *, keep: int, inflight: Iterable[str] = ()
) -> Retention:
    """Keep the ``keep`` newest commits per rank (``manifests`` newest first). A directory without a
    manifest is an orphan to delete only when it is older than every kept commit and not ``inflight``
    (being uploaded by this process): a newer one may be another rank's commit still under way."""
    per_rank: dict[int | None, int] = {}
    kept: list[str] = []
    doomed: list[str] = []
    for m in manifests:
        per_rank[m.rank] = per_rank.get(m.rank, 0) + 1
        (kept if per_rank[m.rank] <= keep else doomed).append(m.name)
    if not kept:
        return Retention(doomed=(), orphans=())
    oldest_kept = min(kept)
    committed = {m.name for m in manifests}
    busy = set(inflight)
    orphans = sorted(n for n in set(names) - committed if n < oldest_kept and n not in busy)
    return Retention(doomed=tuple(doomed), orphans=tuple(orphans))
