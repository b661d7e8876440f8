"""Hugging Face Accelerate: ``accelerator.save_state`` / ``load_state`` checkpoints that spotd makes durable,
and one stop step for every rank.

```python
from spotd.accelerate import SpotdAccelerate
spot = SpotdAccelerate(accelerator, every_steps=500)   # after accelerator.prepare(...)
start = spot.restore()                                 # load_state of the newest; 0 on a fresh start
for step, batch in spot.batches(train_dl, start=start, epochs=epochs):
    train_one_step(batch)
    if spot.step(step):                                # saves when due or asked; True = stop, it is durable
        break
```

Each checkpoint is ``accelerator.save_state`` into ``<checkpoint_dir>/<name>/.tmp-step-<N>/``, renamed to
``step-<N>`` (9 digits: the number of steps done) once every rank has written its part, then reported to
spotd: a directory that is there under its final name is complete, and a save killed half-way is a hidden
temporary that nothing uploads or restores. :meth:`SpotdAccelerate.batches` keeps the data position: it sets
the epoch on the loader and skips the batches of the resumed epoch already trained on
(``accelerator.skip_first_batches``); with ``DataLoaderConfiguration(use_seedable_sampler=True)`` the order
of an epoch does not depend on when the loader is iterated.

The stop decision is spotd's all-reduce MAX (Accelerate's ``set_trigger``/``check_trigger`` is a sum of the
same kind); ``ProjectConfiguration(automatic_checkpoint_naming=True)`` is refused, as it would pick the
directory ``save_state`` writes to. This module imports accelerate; spotd's daemon never imports it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Final

from accelerate import Accelerator

from spotd.integrations.node import NONE, PERIODIC, NodeLink, Verdict
from spotd.integrations.torch import ranks
from spotd.integrations.torch.link import AUTO, Guard, _Auto

__all__ = ["SpotdAccelerate"]

log = logging.getLogger("spotd.accelerate")

_STEP_RE: Final = re.compile(r"^step-(\d{9})$")
_TEMP_PREFIX: Final = ".tmp-"
#: Written by each node's speaker last, before the rename; one name per node, so the parts of a multi-node
#: checkpoint restored side by side never collide.
MARKER_GLOB: Final = "spotd-node-*.json"


class SpotdAccelerate:
    """Periodic and spotd-requested ``save_state`` checkpoints of an Accelerate loop; build it on every
    rank (collective)."""

    __slots__ = ("_accelerator", "_every_steps", "_keep", "_last_saved", "_node", "_prune", "directory")

    def __init__(
        self,
        accelerator: Accelerator,
        *,
        every_steps: int | None = None,
        keep: int = 2,
        name: str = "accelerate",
        checkpoint_dir: str | os.PathLike[str] | None = None,
        guard: Guard | _Auto | None = AUTO,
        handle_sigterm: bool | None = None,
        sync_every: int = 1,
    ) -> None:
        if every_steps is not None and (isinstance(every_steps, bool) or every_steps < 1):
            raise ValueError(f"every_steps={every_steps!r}: give a whole number of steps >= 1, or None")
        if keep < 1:
            raise ValueError(f"keep={keep!r} would delete every checkpoint: keep at least 1 (default 2)")
        if accelerator.project_configuration.automatic_checkpoint_naming:
            raise ValueError(
                "ProjectConfiguration(automatic_checkpoint_naming=True) makes save_state pick its own "
                "directory; fix: leave it off, SpotdAccelerate names the checkpoints"
            )
        self._accelerator = accelerator
        self._every_steps = every_steps
        self._keep = keep
        # Collective when distributed.
        self._node = NodeLink(
            name=name,
            guard=guard,
            checkpoint_dir=checkpoint_dir,
            handle_sigterm=handle_sigterm,
            sync_every=sync_every,
        )
        self.directory = self._node.directory / name
        self._last_saved: int | None = None
        self._prune = False

    # -- resuming --------------------------------------------------------------------------------------

    def complete_steps(self) -> list[int]:
        """Steps of the complete checkpoints on this node's disk, oldest first."""
        if not self.directory.is_dir():
            return []
        steps = []
        for entry in self.directory.iterdir():
            match = _STEP_RE.match(entry.name)
            if match and entry.is_dir() and any(entry.glob(MARKER_GLOB)):
                steps.append(int(match.group(1)))
        return sorted(steps)

    def restore(self) -> int:
        """``load_state`` of the newest checkpoint every rank has; returns the step to run next (0: none)."""
        common = ranks.common_step(self.complete_steps())
        if common is None:
            return 0
        path = self.directory / f"step-{common:09d}"
        self._accelerator.load_state(str(path))
        self._last_saved = common
        log.info("spotd: restored %s, resuming at step %d", path, common)
        return common

    def batches(self, dataloader: Any, *, start: int, epochs: int) -> Iterator[tuple[int, Any]]:
        """``(step, batch)`` from ``start`` to the end of ``epochs`` epochs, the resumed epoch's trained
        batches skipped. ``len(dataloader)`` batches make an epoch."""
        per_epoch = len(dataloader)
        if per_epoch < 1:
            return
        step = start
        for epoch in range(start // per_epoch, epochs):
            set_epoch = getattr(dataloader, "set_epoch", None)
            if callable(set_epoch):
                set_epoch(epoch)
            skip = step - epoch * per_epoch
            loader: Iterable[Any] = (
                self._accelerator.skip_first_batches(dataloader, skip) if skip else dataloader
            )
            for batch in loader:
                yield step, batch
                step += 1

    # -- saving ----------------------------------------------------------------------------------------

    def step(self, step: int) -> bool:
        """Call after finishing ``step`` on every rank. Saves when due or asked; True means stop now."""
        done = step + 1
        if self._prune:
            self._retention()
        due = self._every_steps is not None and done % self._every_steps == 0
        verdict = self._node.decide(step, due=due)
        if verdict.level == NONE:
            return False
        self._save(done, None if verdict.level == PERIODIC else verdict)
        if not verdict.stop:
            return False
        self._node.wait_durable(verdict)
        log.info("spotd: stopping after step %d, the checkpoint is saved", done)
        return True

    def save(self, step: int) -> Path:
        """Save now, as if ``step`` steps are done (the value :meth:`restore` will return); every rank."""
        return self._save(step, None)

    def close(self) -> None:
        self._node.close()

    def _save(self, done: int, verdict: Verdict | None) -> Path:
        final = self.directory / f"step-{done:09d}"
        speaker = self._node.speaker
        if self._last_saved != done or not final.is_dir():
            temp = self.directory / f"{_TEMP_PREFIX}step-{done:09d}"
            if speaker:
                shutil.rmtree(temp, ignore_errors=True)  # left by a save killed half-way
                temp.mkdir(parents=True)
                # Asked for: spotd uploads each file as it is closed (under step-N/, through the rename).
                self._node.announce(final, done, verdict, temp=temp)
            self._node.barrier()
            self._accelerator.save_state(str(temp))
            self._node.barrier()  # every rank's part (its RNG state at least) is written
            if speaker:
                marker = temp / f"spotd-node-{self._node.topology.node_rank}.json"
                marker.write_text(json.dumps({"step": done}) + "\n")
                shutil.rmtree(final, ignore_errors=True)
                os.replace(temp, final)
                _fsync_dir(self.directory)
            self._last_saved = done
        self._node.report(final, done, verdict)
        self._prune = speaker
        if speaker:
            self._retention()  # at once without a daemon; with one, from the first step it is durable
        return final

    def _retention(self) -> None:
        """Keep the newest ``keep``; older ones go only once the newest is durable (checked each step)."""
        link = self._node.link
        if link.expected() and not link.wait_durable(0):
            return
        self._prune = False
        for old in self.complete_steps()[: -self._keep]:
            shutil.rmtree(self.directory / f"step-{old:09d}", ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
