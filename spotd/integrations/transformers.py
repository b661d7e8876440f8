"""The Hugging Face ``Trainer``, spot-safe with one callback, resumed by its own ``resume_from_checkpoint``.

```python
import spotd.transformers
trainer = transformers.Trainer(..., callbacks=[spotd.transformers.SpotdCallback()])
trainer.train(resume_from_checkpoint=spotd.transformers.latest_checkpoint(args.output_dir))
```

``args.output_dir`` must lie inside spotd's ``checkpoint_dir``. What :class:`SpotdCallback` adds:

- at the end of every optimizer step the ranks agree (spotd's all-reduce MAX: the Trainer never synchronises
  ``control`` across ranks by itself) on whether anyone was asked; then every rank sets ``should_save`` and,
  for a final request, ``should_training_stop`` at that same step, so the Trainer writes its own
  ``checkpoint-N/`` (weights, optimizer, scheduler, RNG state of every rank, trainer state);
- a checkpoint directory is reported to spotd after every rank has written its part of it (a barrier), never
  while the Trainer is still writing it file by file; saves of the Trainer's own schedule (``save_steps``)
  are committed in the background; a final one is waited for until durable, then training stops;
- on a final request no evaluation, epoch-end save, hub push or best-model reload starts inside the window
  (``should_evaluate`` cleared; ``push_to_hub``, ``load_best_model_at_end`` and ``save_total_limit`` turned
  off for the rest of this run); after ``train()`` returns, ``callback.stopped`` says so: skip whatever the
  script does next (a final evaluation, ``save_model``, ``push_to_hub``).

Keep ``save_total_limit`` at 2 or more: the Trainer deletes old checkpoints itself, and the one before the
newest is what spotd still holds while the newest uploads.

This module imports transformers; spotd's daemon never imports it.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Final

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from spotd.integrations.node import NodeLink, Verdict
from spotd.integrations.torch.link import AUTO, Guard, _Auto

__all__ = ["SpotdCallback", "latest_checkpoint"]

log = logging.getLogger("spotd.transformers")

_CHECKPOINT_RE: Final = re.compile(r"^checkpoint-(\d+)$")
#: The Trainer writes it last (after weights, optimizer, scheduler and RNG state): present = complete.
TRAINER_STATE: Final = "trainer_state.json"


def latest_checkpoint(output_dir: str | os.PathLike[str]) -> str | None:
    """The newest complete ``checkpoint-N`` under ``output_dir``, or None (a fresh start).

    Unlike ``transformers.trainer_utils.get_last_checkpoint`` it skips a directory the Trainer did not finish
    writing (no ``trainer_state.json``): the process died mid-save, and resuming from it would fail."""
    root = Path(output_dir)
    if not root.is_dir():
        return None
    found: list[tuple[int, Path]] = []
    for entry in root.iterdir():
        match = _CHECKPOINT_RE.match(entry.name)
        if match and entry.is_dir():
            if (entry / TRAINER_STATE).is_file():
                found.append((int(match.group(1)), entry))
            else:
                log.warning("spotd: skipping %s, which the Trainer did not finish writing", entry)
    return str(max(found)[1]) if found else None


class SpotdCallback(TrainerCallback):
    """Stops every rank at one step when spotd asks, and makes the Trainer's checkpoints durable."""

    def __init__(
        self,
        *,
        name: str = "transformers",
        guard: Guard | _Auto | None = AUTO,
        handle_sigterm: bool | None = None,
        sync_every: int = 1,
    ) -> None:
        if isinstance(sync_every, bool) or sync_every < 1:
            raise ValueError(f"sync_every={sync_every!r}: give a whole number of steps >= 1")
        self._name = name
        self._guard = guard
        self._handle_sigterm = handle_sigterm
        self._sync_every = sync_every
        self._node: NodeLink | None = None
        self._verdict: Verdict | None = None
        self._stopping = False
        #: True once training stopped because spotd asked (a spot notice or SIGTERM).
        self.stopped = False

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self._node is not None:
            return
        # Collective (every rank runs the callbacks); the process group exists once TrainingArguments do.
        self._node = NodeLink(
            name=self._name,
            guard=self._guard,
            handle_sigterm=self._handle_sigterm,
            sync_every=self._sync_every,
        )
        guard = self._node.link.guard
        daemon_dir = getattr(guard, "checkpoint_dir", None) if guard is not None else None
        if daemon_dir and not _inside(Path(str(args.output_dir)), Path(daemon_dir)):
            log.warning(
                "spotd: output_dir %s is outside spotd's checkpoint_dir %s, so nothing will be uploaded; "
                "fix: TrainingArguments(output_dir=...) inside %s",
                args.output_dir,
                daemon_dir,
                daemon_dir,
            )

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl:
        node = self._node
        if node is None:
            return control
        verdict = node.decide(state.global_step)
        if not verdict.save:
            return control
        self._verdict = verdict
        control.should_save = True
        # The Trainer writes checkpoint-<global_step>/ next: spotd may upload each file as it is closed.
        node.announce(
            Path(str(args.output_dir)) / f"checkpoint-{state.global_step}", state.global_step, verdict
        )
        if verdict.stop:
            self._stopping = True
            control.should_training_stop = True
            control.should_evaluate = False
            # Nothing of the rest of this run may start inside the window; the run ends after this save.
            args.push_to_hub = False
            args.load_best_model_at_end = False
            args.save_total_limit = None
        return control

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        node = self._node
        if node is None:
            return
        verdict, self._verdict = self._verdict, None
        path = Path(str(args.output_dir)) / f"checkpoint-{state.global_step}"
        node.report(path, state.global_step, verdict)  # after a barrier: every rank's files are written
        if verdict is not None and verdict.stop:
            node.wait_durable(verdict)
            self.stopped = True
            log.info("spotd: stopping at step %d, the checkpoint is saved", state.global_step)

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl:
        if self._stopping:
            # The loop broke out of the epoch: what the epoch's end would start waits for the next run.
            control.should_evaluate = False
            control.should_save = False
            control.should_log = False
        return control

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self._node is not None:
            self._node.close()
            self._node = None


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return True
