"""spotd.integrations.node and the helpers around the framework integrations, in process: which request a
speaker acts on, what it reports, and which checkpoint directories count as complete."""

from __future__ import annotations

from pathlib import Path

import pytest

from spotd.integrations.node import NONE, PERIODIC, SAVE, STOP, NodeLink
from tests.integrations.test_torch_checkpointer import FakeGuard, FakeRequest


class ReportingGuard(FakeGuard):
    """FakeGuard whose saved() accepts the final flag the speaker sends for a peer's request."""

    def saved(self, path: str, step: int | None = None, *, final: bool = False) -> None:
        self.saves.append((path, step))
        self.finals = [*getattr(self, "finals", []), final]


def link(tmp_path: Path, guard: FakeGuard) -> NodeLink:
    return NodeLink(name="t", guard=guard, checkpoint_dir=tmp_path)


def test_a_final_request_stops_once_and_is_answered_by_the_save(tmp_path: Path) -> None:
    """A final request gives STOP; the report answers it with the path relative to checkpoint_dir; the same request never stops the run twice."""
    guard = ReportingGuard(checkpoint_dir=str(tmp_path))
    node = link(tmp_path, guard)
    guard.request = FakeRequest("spot-1", final=True)
    verdict = node.decide(7)
    assert verdict.level == STOP and verdict.request is not None
    (tmp_path / "ckpt").mkdir()
    node.report(tmp_path / "ckpt", 8, verdict)
    assert guard.saves == [("ckpt", 8)] and guard.finals == [False]
    assert node.decide(8).level == NONE


def test_a_drill_saves_without_stopping_and_periodic_is_only_due(tmp_path: Path) -> None:
    """A non-final request is SAVE; with none, a due periodic save is PERIODIC and otherwise nothing."""
    guard = ReportingGuard(checkpoint_dir=str(tmp_path))
    node = link(tmp_path, guard)
    assert node.decide(1).level == NONE
    assert node.decide(2, due=True).level == PERIODIC
    guard.request = FakeRequest("drill-1", final=False)
    assert node.decide(3).level == SAVE


def test_a_final_request_answered_by_a_periodic_save_still_stops(tmp_path: Path) -> None:
    """A request that arrived while a periodic save was being reported (the client counts that save as its answer) still stops the run at the next step."""
    guard = ReportingGuard(checkpoint_dir=str(tmp_path))
    node = link(tmp_path, guard)
    (tmp_path / "p").mkdir()
    guard.request = FakeRequest("spot-2", final=True)
    node.report(tmp_path / "p", 5, None)  # periodic: answers nothing on our side
    assert node.decide(5).stop


def test_a_path_that_is_not_on_this_node_is_not_reported(tmp_path: Path) -> None:
    """A checkpoint another node wrote (a Lightning .ckpt on global rank 0's disk) is not reported by this node."""
    guard = ReportingGuard(checkpoint_dir=str(tmp_path))
    node = link(tmp_path, guard)
    node.report(tmp_path / "missing.ckpt", 3, None)
    assert guard.saves == []


def test_latest_checkpoint_skips_one_the_trainer_did_not_finish(tmp_path: Path) -> None:
    """latest_checkpoint() is the highest checkpoint-N with trainer_state.json; a half-written newer one and other names are skipped; None when there is none."""
    transformers = pytest.importorskip("spotd.transformers")
    assert transformers.latest_checkpoint(tmp_path / "absent") is None
    for n, complete in ((50, True), (100, True), (150, False)):
        (tmp_path / f"checkpoint-{n}").mkdir()
        if complete:
            (tmp_path / f"checkpoint-{n}" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-x").mkdir()
    assert transformers.latest_checkpoint(tmp_path) == str(tmp_path / "checkpoint-100")
