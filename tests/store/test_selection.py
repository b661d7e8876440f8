"""Which checkpoints: naming, listing, restore candidates per rank, retention — pure functions, no store."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from spotd.errors import CommitError
from spotd.store import CommitInfo, FileEntry, Manifest
from spotd.store.selection import (
    ORPHAN_GRACE,
    IncompleteStep,
    checkpoint_name,
    event_name,
    global_manifest,
    named_candidates,
    part_key,
    part_node,
    plan_retention,
    restore_candidates,
    run_checkpoint_name,
    scan_listing,
    valid_name,
)

T0 = datetime(2026, 11, 25, 4, 0, 0, tzinfo=UTC)
LATER = T0 + timedelta(days=1)  # "now" for retention: every name made near T0 is past ORPHAN_GRACE


def info(step: int | None = 1, *, rank: int | None = None, trainer: str = "train") -> CommitInfo:
    return CommitInfo(
        job_id="j",
        step=step,
        trainer=trainer,
        rank=rank,
        world_size=None,
        request_id=None,
        reason="periodic",
        instance_id="i-1",
        final=False,
    )


def m(
    seconds: int, *, step: int | None = 1, rank: int | None = None, world_size: int | None = None
) -> Manifest:
    """A manifest committed ``seconds`` after T0."""
    at = T0 + timedelta(seconds=seconds)
    return Manifest(
        name=f"{at.strftime('%Y%m%dT%H%M%S.%fZ')}-s{step or 0:09d}-train-r{rank}-0000",
        job_id="j",
        step=step,
        created_at=at,
        instance_id="i-1",
        trainer="train",
        rank=rank,
        world_size=world_size,
        request_id=None,
        reason="periodic",
        files=(),
    )


def newest_first(*manifests: Manifest) -> list[Manifest]:
    return sorted(manifests, key=lambda x: x.name, reverse=True)


# ---- naming


def test_names_sort_by_commit_time_whatever_the_step() -> None:
    """A later commit's name sorts after an earlier one's, even with a lower step (a restarted run)."""
    early = checkpoint_name(info(900), T0)
    late = checkpoint_name(info(5), T0 + timedelta(microseconds=1))
    assert early < late


def test_name_carries_time_step_trainer_and_rank() -> None:
    """A name reads time, zero-padded step, sanitized trainer, rank, then a random tail."""
    name = checkpoint_name(info(500, rank=0, trainer="my trainer/1"), T0)
    assert name.startswith("20261125T040000.000000Z-s000000500-my_trainer_1-r0-")
    assert len(name.rsplit("-", 1)[1]) == 4


def test_name_without_step_or_rank() -> None:
    """Without a step the step field is dashes (same width) and without a rank there is no -r part."""
    assert checkpoint_name(info(None), T0).startswith("20261125T040000.000000Z-s----------train-")


def test_same_microsecond_names_differ() -> None:
    """Two commits in the same microsecond still get different names (the random tail)."""
    assert len({checkpoint_name(info(1), T0) for _ in range(20)}) > 1


def test_event_name_sanitizes_the_instance() -> None:
    """An event record's name is its time and the sanitized instance id, 'unknown' when there is none."""
    assert event_name("i-0123/x", T0) == "20261125T040000.000000Z-i-0123_x.json"
    assert event_name("", T0) == "20261125T040000.000000Z-unknown.json"


# ---- listing


def test_scan_listing_groups_keys_by_checkpoint_and_skips_hidden_names() -> None:
    """Keys group into checkpoint names; only names with a top-level MANIFEST.json count as committed."""
    prefix = "j/checkpoints/"
    keys = [
        f"{prefix}a/MANIFEST.json",
        f"{prefix}a/model.pt",
        f"{prefix}b/model.pt",
        f"{prefix}b/sub/MANIFEST.json",
        f"{prefix}.spotd-tmp-x/model.pt",
    ]
    listing = scan_listing(keys, prefix)
    assert listing.names == {"a", "b"} and listing.with_manifest == ("a",)


# ---- restore candidates


def test_single_rank_candidates_are_newest_first_one_each() -> None:
    """Single-rank commits are each a candidate of their own, newest first."""
    a, b = m(1), m(2)
    assert restore_candidates(newest_first(a, b)).sets == ((b,), (a,))


def test_multi_rank_step_is_restored_as_one_set_per_rank() -> None:
    """A complete multi-rank step is one candidate: each rank's newest commit of it, in rank order."""
    r0, r1 = m(1, step=10, rank=0, world_size=2), m(2, step=10, rank=1, world_size=2)
    r1_again = m(3, step=10, rank=1, world_size=2)
    found = restore_candidates(newest_first(r0, r1, r1_again))
    assert found.sets == ((r0, r1_again),) and found.incomplete == ()


def test_step_with_a_missing_rank_is_skipped_for_an_older_complete_one() -> None:
    """A step some rank has not committed is not a candidate; the older complete step is, and the gap is reported."""
    old = (m(1, step=10, rank=0, world_size=2), m(2, step=10, rank=1, world_size=2))
    partial = m(3, step=20, rank=0, world_size=2)
    found = restore_candidates(newest_first(*old, partial))
    assert found.sets == (old,)
    assert found.incomplete == (IncompleteStep(step=20, world_size=2, ranks=(0,)),)


def test_named_candidates_fall_back_to_older_commits_of_the_same_rank() -> None:
    """Restoring by name tries that commit, then older ones of its rank only; an unknown name has none."""
    a0, b1, c0, d0 = m(1, rank=0), m(2, rank=1), m(3, rank=0), m(4, rank=0)
    manifests = newest_first(a0, b1, c0, d0)
    assert named_candidates(manifests, c0.name) == ((c0,), (a0,))
    assert named_candidates(manifests, "nope") == ()


# ---- retention


def test_retention_keeps_keep_newest_per_rank() -> None:
    """With keep=2 each rank keeps its two newest commits and the older ones are doomed."""
    r0 = [m(i, rank=0) for i in range(4)]
    r1 = [m(10 + i, rank=1) for i in range(2)]
    plan = plan_retention(newest_first(*r0, *r1), [x.name for x in (*r0, *r1)], keep=2, now=LATER)
    assert set(plan.doomed) == {r0[0].name, r0[1].name} and plan.orphans == ()


def test_retention_removes_only_old_orphans_not_in_flight() -> None:
    """An uncommitted directory is deleted only when older than every kept commit and not being uploaded here."""
    kept = [m(10), m(11)]
    old_orphan, busy_orphan = "20261125T040001.000000Z-old", "20261125T040002.000000Z-busy"
    new_orphan = "20261125T050000.000000Z-new"  # maybe another rank's commit still under way
    names = [x.name for x in kept] + [old_orphan, busy_orphan, new_orphan]
    plan = plan_retention(newest_first(*kept), names, keep=2, now=LATER, inflight={busy_orphan})
    assert plan.doomed == () and plan.orphans == (old_orphan,)


def test_a_fresh_orphan_is_left_for_another_daemon_to_finish() -> None:
    """A directory named by a commit that started within ORPHAN_GRACE is never deleted, even when older than every kept commit: another daemon on the same store may be uploading its rank's first commit."""
    kept = m(10, rank=1)
    fresh = checkpoint_name(info(1, rank=0), T0 + timedelta(seconds=5))
    stale = checkpoint_name(info(1, rank=0), T0 + timedelta(seconds=1))
    now = T0 + timedelta(seconds=1) + ORPHAN_GRACE + timedelta(seconds=2)
    plan = plan_retention([kept], [kept.name, fresh, stale], keep=2, now=now)
    assert plan.orphans == (stale,)


def test_multi_node_orphans_go_only_behind_a_kept_multi_node_commit() -> None:
    """The parts of a multi-node step that never committed are deleted once older than the oldest kept multi-node commit; with only other kinds kept they stay (they may be the first in flight)."""
    waiting = run_checkpoint_name(RUN, 5)
    single = m(10)
    assert plan_retention([single], [single.name, waiting], keep=2, now=LATER).orphans == ()
    newer = global_m(20, step=6)
    assert plan_retention([newer], [newer.name, waiting], keep=2, now=LATER).orphans == (waiting,)


def test_retention_with_nothing_committed_deletes_nothing() -> None:
    """Without any commit nothing is deleted, orphans included (they may be the first commit in flight)."""
    plan = plan_retention([], ["20261125T040001.000000Z-x"], keep=1, now=LATER)
    assert plan.doomed == () and plan.orphans == ()


# ---- multi-node


RUN = "20261201T193000Z-1a2b3c"


def test_run_checkpoint_name_sorts_by_run_then_step() -> None:
    """A run's names sort by step; a later run's sort after every name of an earlier one, whatever the step; each is a valid name."""
    assert run_checkpoint_name(RUN, 500) == "20261201T193000Z-1a2b3c-s000000500"
    assert run_checkpoint_name(RUN, 99) < run_checkpoint_name(RUN, 100)
    assert run_checkpoint_name(RUN, 999_999) < run_checkpoint_name("20261201T193001Z-000000", 0)
    assert (
        valid_name(run_checkpoint_name("../x y", 1)) and run_checkpoint_name("../x y", 1) == "_x_y-s000000001"
    )
    with pytest.raises(ValueError, match="whole number"):
        run_checkpoint_name(RUN, -1)


def test_valid_name_refuses_paths_and_hidden_names() -> None:
    """A checkpoint name is one visible key component."""
    assert valid_name("20261201T193000Z-1a2b3c-s000000500")
    assert not any(valid_name(n) for n in ("", ".x", "a/b", "a b", ".."))


def test_part_keys_round_trip() -> None:
    """parts/node-<k>.json names node k; nothing else does."""
    assert part_key(3) == "parts/node-3.json" and part_node("parts/node-3.json") == 3
    assert part_node("parts/node-x.json") is None and part_node("sub/parts/node-1.json") is None


def part(
    node: int, *files: tuple[str, int, str], step: int = 7, ranks: tuple[int, ...] | None = None, **kw
) -> Manifest:
    return Manifest(
        name=run_checkpoint_name(RUN, step),
        job_id="j",
        step=step,
        created_at=T0 + timedelta(seconds=node),
        instance_id=f"i-{node}",
        trainer="train",
        rank=None,
        world_size=4,
        request_id=kw.get("request_id"),
        reason=kw.get("reason", "periodic"),
        files=tuple(FileEntry(path=p, size=n, checksum=c) for p, n, c in files),
        nodes=2,
        node=node,
        ranks=ranks if ranks is not None else (2 * node, 2 * node + 1),
    )


def test_global_manifest_is_the_union_of_the_parts() -> None:
    """The global manifest lists every part's files once, sorted, covers every rank (rank None, nodes set), takes the newest part's time and the asked node's request and reason."""
    p0 = part(0, ("d/.metadata", 3, "crc32:AAAAAA=="), ("d/__0_0.distcp", 5, "crc32:AAAAAB=="))
    p1 = part(1, ("d/__2_0.distcp", 7, "crc32:AAAAAC=="), request_id="spot-1", reason="spot")
    g = global_manifest([p1, p0], name=p0.name)
    assert [f.path for f in g.files] == ["d/.metadata", "d/__0_0.distcp", "d/__2_0.distcp"]
    assert (g.nodes, g.node, g.ranks, g.rank, g.world_size, g.step) == (2, None, None, None, 4, 7)
    assert g.created_at == p1.created_at and (g.request_id, g.reason) == ("spot-1", "spot")
    assert g.instance_id == "i-0" and g.covers_every_rank
    assert global_manifest([p0, p1], name=p0.name).to_json() == g.to_json()  # the same bytes from any node


@pytest.mark.parametrize(
    ("parts", "problem"),
    [
        (lambda: [part(0)], "parts of nodes [0], expected 0..1"),
        (lambda: [part(0), part(1, step=8)], "names"),
        (lambda: [part(0), replace(part(1), step=8)], "node 1 saved step 8"),
        (lambda: [part(0), part(1, ranks=(1, 2))], "a rank is claimed by two nodes"),
        (lambda: [part(0), part(1, ranks=(2,))], "ranks [0, 1, 2] of world size 4"),
        (
            lambda: [part(0, ("cfg.json", 1, "crc32:AAAAAA==")), part(1, ("cfg.json", 1, "crc32:AAAAAB=="))],
            "cfg.json was saved with different contents on two nodes",
        ),
    ],
)
def test_parts_that_disagree_make_no_global_manifest(parts, problem: str) -> None:
    """Parts that are not one checkpoint are a CommitError naming what disagrees."""
    got = parts()
    with pytest.raises(CommitError, match="do not make one checkpoint") as caught:
        global_manifest(got, name=run_checkpoint_name(RUN, 7))
    assert problem in str(caught.value)


def test_same_file_from_two_nodes_is_listed_once() -> None:
    """A file both nodes hold with the same content (a shared config.json) is one entry."""
    same = ("cfg.json", 1, "crc32:AAAAAA==")
    g = global_manifest([part(0, same), part(1, same)], name=run_checkpoint_name(RUN, 7))
    assert [f.path for f in g.files] == ["cfg.json"]


def global_m(seconds: int, step: int) -> Manifest:
    return replace(m(seconds, step=step, world_size=4), nodes=2, name=run_checkpoint_name(RUN, step))


def test_a_global_manifest_is_a_candidate_of_its_own_beside_per_rank_sets() -> None:
    """A multi-node manifest restores alone; a per-rank set of the same step and world size is still grouped without it."""
    g = global_m(5, step=10)
    r0, r1 = m(1, step=10, rank=0, world_size=4), m(2, step=10, rank=1, world_size=4)
    found = restore_candidates(newest_first(g, r0, r1))
    assert found.sets == ((g,),)
    assert found.incomplete == (IncompleteStep(step=10, world_size=4, ranks=(0, 1)),)


def test_retention_counts_global_commits_apart_from_per_rank_ones() -> None:
    """keep applies to multi-node commits together and to each rank's own commits, separately."""
    globals_ = [global_m(i, step=100 + i) for i in range(3)]
    single = [m(10 + i) for i in range(2)]
    manifests = sorted([*globals_, *single], key=lambda x: x.name, reverse=True)
    plan = plan_retention(manifests, [x.name for x in manifests], keep=2, now=LATER)
    assert plan.doomed == (globals_[0].name,)


def test_named_restore_of_a_global_falls_back_to_older_globals_only() -> None:
    """Restoring a multi-node checkpoint by name falls back to older multi-node ones, not to a single process's."""
    old, new = global_m(1, step=1), global_m(2, step=2)
    single = m(0, rank=None)
    manifests = newest_first(old, new, single)
    assert named_candidates(manifests, new.name) == ((new,), (old,))
