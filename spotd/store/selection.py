"""Which checkpoints: names that sort by time, what a listing holds, restore candidates per rank, what
retention deletes, and the global manifest a complete set of node parts makes. Pure functions over
names and manifests; the store does the I/O around them.

Three kinds of committed checkpoint live side by side under ``checkpoints/``, each a unit of restore and
retention: a single process's (world_size unset or 1), a per-rank one (world_size > 1, one manifest per
rank, restorable only as a set of every rank at one step), and a multi-node one (one MANIFEST.json built
from the nodes' parts, covering every rank).
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Final

from spotd.errors import CommitError
from spotd.store.manifest import MANIFEST, PARTS_DIR, FileEntry, Manifest, Provenance

__all__ = [
    "ORPHAN_GRACE",
    "Candidates",
    "IncompleteStep",
    "Listing",
    "Retention",
    "checkpoint_name",
    "event_name",
    "global_manifest",
    "named_candidates",
    "part_key",
    "part_node",
    "plan_retention",
    "restore_candidates",
    "run_checkpoint_name",
    "sanitize",
    "scan_listing",
    "valid_name",
]


#: How old a directory :func:`checkpoint_name` named must be before retention may take it for abandoned:
#: more than any commit takes, since another daemon on the same store may still be uploading it.
ORPHAN_GRACE: Final = timedelta(hours=6)
_COMMIT_TIME_RE: Final = re.compile(r"^(\d{8}T\d{6}\.\d{6})Z-")


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


def run_checkpoint_name(run_id: str, step: int) -> str:
    """``20261201T193000Z-1a2b3c-s000000500``: the one name every rank and every node's daemon computes
    for a multi-rank checkpoint from what the trainers say (the run identity rank 0 broadcast at start,
    and the step). It sorts by run start time, then by step; the random tail of the run identity keeps
    two runs started in the same second apart."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step {step!r} is not a whole number >= 0")
    run = sanitize(run_id, 64).lstrip(".") or "x"
    return f"{run}-s{step:09d}"


def valid_name(name: str) -> bool:
    """Whether ``name`` can be a checkpoint directory: one non-hidden key component of safe characters."""
    return bool(name) and not name.startswith(".") and sanitize(name, len(name)) == name


_PART_RE: Final = re.compile(rf"^{PARTS_DIR}/node-(\d+)\.json$")


def part_key(node: int) -> str:
    """Where node ``node``'s part goes, relative to its checkpoint's directory."""
    return f"{PARTS_DIR}/node-{node}.json"


def part_node(tail: str) -> int | None:
    """The node of a part's key relative to its checkpoint's directory, or None when it is not one."""
    match = _PART_RE.match(tail)
    return int(match.group(1)) if match else None


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
    """``manifests`` newest first → what a restore without a name tries, in order. A single process's
    checkpoint and a multi-node one (one manifest for every rank) are each a candidate of their own. A
    per-rank checkpoint (world_size > 1) is restorable only as a consistent set: every rank's newest
    checkpoint of that same step; a step with a rank missing is skipped, which falls back to an older
    step."""
    sets: list[tuple[Manifest, ...]] = []
    incomplete: list[IncompleteStep] = []
    seen: set[tuple[int | None, int]] = set()
    for m in manifests:
        if m.is_part:
            continue
        if m.covers_every_rank:
            sets.append((m,))
            continue
        assert m.world_size is not None  # covers_every_rank says so
        key = (m.step, m.world_size)
        if key in seen:
            continue
        seen.add(key)
        by_rank: dict[int | None, Manifest] = {}
        for other in manifests:  # newest first, so the first per rank is the newest
            if other.step == m.step and other.world_size == m.world_size and not other.covers_every_rank:
                by_rank.setdefault(other.rank, other)
        if all(r in by_rank for r in range(m.world_size)):
            sets.append(tuple(by_rank[r] for r in range(m.world_size)))
        else:
            ranks = tuple(sorted(r for r in by_rank if r is not None))
            incomplete.append(IncompleteStep(step=m.step, world_size=m.world_size, ranks=ranks))
    return Candidates(sets=tuple(sets), incomplete=tuple(incomplete))


def named_candidates(manifests: Sequence[Manifest], name: str) -> tuple[tuple[Manifest, ...], ...]:
    """What a restore of ``name`` tries: that checkpoint, then older ones of the same kind and rank (an
    explicit name still falls back when it fails to verify). Empty when no checkpoint has that name."""
    chosen = next((m for m in manifests if m.name == name), None)
    if chosen is None:
        return ()
    older = [(m,) for m in manifests if m.name < name and _unit(m) == _unit(chosen)]
    return ((chosen,), *older)


def _unit(m: Manifest) -> tuple[str, int | None]:
    """What retention counts ``keep`` of, and a named restore falls back within: multi-node checkpoints
    together, every other checkpoint per rank (as before they existed)."""
    return ("nodes", None) if m.nodes is not None else ("rank", m.rank)


@dataclass(frozen=True, slots=True, kw_only=True)
class Retention:
    """What a retention pass deletes: committed checkpoints past ``keep`` and abandoned directories."""

    doomed: tuple[str, ...]  # committed; delete MANIFEST.json first so a crash leaves an orphan, never half
    orphans: tuple[str, ...]  # never committed and older than every kept commit


def plan_retention(
    manifests: Sequence[Manifest],
    names: Iterable[str],
    *,
    keep: int,
    now: datetime,
    inflight: Iterable[str] = (),
) -> Retention:
    """Keep the ``keep`` newest commits per rank, and the ``keep`` newest multi-node commits (``manifests``
    newest first); the others are doomed.

    A directory without a manifest (a failed commit, or the parts of a multi-node step that never
    committed) is an orphan to delete when nothing may still be writing it; ``inflight`` (being uploaded
    by this process) never is. Another daemon on the same store may be uploading one, and what it writes
    may be the first commit of its rank, with nothing of that rank kept yet to compare with; so:

    - a name :func:`checkpoint_name` made (it starts with the time that commit started) must be older
      than every kept commit and than :data:`ORPHAN_GRACE`;
    - any other name (a multi-node step's, :func:`run_checkpoint_name`) must be older than every kept
      multi-node commit, of which there must be one: a node uploading a step that some kept step
      follows could only ever commit what retention would doom at once.
    """
    per_unit: dict[tuple[str, int | None], int] = {}
    kept: list[str] = []
    kept_nodes: list[str] = []
    doomed: list[str] = []
    for m in manifests:
        unit = _unit(m)
        per_unit[unit] = per_unit.get(unit, 0) + 1
        if per_unit[unit] > keep:
            doomed.append(m.name)
            continue
        kept.append(m.name)
        if m.nodes is not None:
            kept_nodes.append(m.name)
    if not kept:
        return Retention(doomed=(), orphans=())
    committed = {m.name for m in manifests}
    busy = set(inflight)

    def abandoned(name: str) -> bool:
        if name in busy:
            return False
        started = _COMMIT_TIME_RE.match(name)
        if started is not None:
            at = datetime.strptime(started.group(1), "%Y%m%dT%H%M%S.%f").replace(tzinfo=UTC)
            return name < min(kept) and now - at > ORPHAN_GRACE
        return bool(kept_nodes) and name < min(kept_nodes)

    orphans = sorted(n for n in set(names) - committed if abandoned(n))
    return Retention(doomed=tuple(doomed), orphans=tuple(orphans))


def global_manifest(parts: Sequence[Manifest], *, name: str) -> Manifest:
    """The MANIFEST.json a complete set of node parts of ``name`` commits: the union of their files.

    Deterministic (any node building it from the same parts gets the same bytes, so a write that lost
    the race finds its own manifest): created_at is the newest part's, provenance is node 0's but for
    the request and reason, which are the first node's (in node order) that was asked for a checkpoint.
    :class:`~spotd.errors.CommitError` when the parts do not make one checkpoint: a node missing or
    twice, different steps or sizes, ranks claimed twice or missing, or one path with two contents.
    """
    if not parts:
        raise CommitError(f"checkpoint {name}: no parts to commit")
    by_node = sorted(parts, key=lambda p: p.node if p.node is not None else -1)
    first = by_node[0]
    nodes = first.nodes

    def refuse(problem: str) -> CommitError:
        return CommitError(f"checkpoint {name}: the node parts do not make one checkpoint: {problem}")

    if nodes is None or [p.node for p in by_node] != list(range(nodes)):
        raise refuse(f"parts of nodes {[p.node for p in by_node]}, expected 0..{(nodes or 1) - 1}")
    for p in by_node:
        if p.name != name or p.nodes != nodes:
            raise refuse(f"node {p.node}'s part names {p.name!r} of {p.nodes} nodes")
        if (p.step, p.world_size, p.job_id) != (first.step, first.world_size, first.job_id):
            raise refuse(
                f"node {p.node} saved step {p.step} of world size {p.world_size}, node 0 step {first.step} "
                f"of world size {first.world_size}"
            )
    ranks = [r for p in by_node for r in (p.ranks or ())]
    if len(set(ranks)) != len(ranks):
        raise refuse(f"a rank is claimed by two nodes ({sorted(ranks)})")
    if first.world_size is not None and sorted(ranks) != list(range(first.world_size)):
        raise refuse(f"ranks {sorted(ranks)} of world size {first.world_size}")
    files: dict[str, FileEntry] = {}
    for p in by_node:
        for f in p.files:
            seen = files.setdefault(f.path, f)
            if seen != f:
                # Both nodes' uploads went to one key: only one of the two contents is there.
                raise refuse(f"{f.path} was saved with different contents on two nodes")
    asked = next((p for p in by_node if p.request_id is not None), first)
    return replace(
        first,
        name=name,
        created_at=max(p.created_at for p in by_node),
        files=tuple(files[path] for path in sorted(files)),
        rank=None,
        node=None,
        ranks=None,
        request_id=asked.request_id,
        reason=asked.reason,
    )
