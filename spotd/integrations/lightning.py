"""PyTorch Lightning, spot-safe with one callback, resumed by ``fit(ckpt_path="last")``.

```python
import spotd.lightning
trainer = lightning.Trainer(..., callbacks=[spotd.lightning.SpotdCallback()])
trainer.fit(model, ckpt_path="last")      # resumes after an interruption; a fresh start the first time
```

:class:`SpotdCallback` is a :class:`~lightning.pytorch.callbacks.ModelCheckpoint` (same arguments, same
periodic schedule) whose files go to ``<checkpoint_dir>/lightning/last-spotd-step=<step>.ckpt``: inside what
spotd uploads, in a directory that does not change from run to run, under names ``ckpt_path="last"`` finds
(Lightning picks the newest ``last*.ckpt`` of every ModelCheckpoint's directory). On top of ModelCheckpoint:

- every save it makes is reported to spotd once written, and committed in the background; an older file is
  deleted only once a newer one is durable;
- a spotd request on any rank is agreed on with ``trainer.strategy.reduce_boolean_decision`` at the end of
  an optimizer step, and every rank saves that step; a final one (spot notice, SIGTERM) then waits until
  the checkpoint is durable and stops with ``trainer.should_stop`` even before ``min_steps``/``min_epochs``,
  with validation switched off so none starts inside the two-minute window;
- the RNG state of every rank travels in the checkpoint (Lightning's own does not carry it), so a resumed run
  draws the same dropout masks as an uninterrupted one;
- SIGTERM is spotd's: Lightning's own handler (which runs a collective inside the signal handler and ends
  ``fit`` with ``SIGTERMException``) is taken out of the chain while training runs.

Resuming mid-epoch keeps the data position only with a loader Lightning can resume: one with
``state_dict``/``load_state_dict``, such as :class:`ResumableLoader`.

This module imports lightning; spotd's daemon never imports it.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from spotd.integrations.node import NONE, SAVE, STOP, NodeLink, Verdict
from spotd.integrations.torch.link import AUTO, Guard, _Auto, resolve_dir

__all__ = ["ResumableLoader", "SpotdCallback"]

log = logging.getLogger("spotd.lightning")

#: ``last`` first: ``fit(ckpt_path="last")`` looks for ``last*.ckpt``.
DEFAULT_FILENAME = "last-spotd-{step:09d}"


class SpotdCallback(ModelCheckpoint):
    """A ModelCheckpoint that spotd makes durable and that stops every rank at one step when spotd asks.

    ``dirpath`` defaults to ``$SPOTD_CHECKPOINT_DIR/lightning`` (``/opt/ml/checkpoints/lightning`` without
    it), which must lie inside the daemon's ``checkpoint_dir``. Other keyword arguments are ModelCheckpoint's
    (``every_n_train_steps=500`` for a periodic save by steps; the default saves at each epoch's end).
    """

    def __init__(
        self,
        dirpath: str | os.PathLike[str] | None = None,
        filename: str = DEFAULT_FILENAME,
        *,
        name: str = "lightning",
        guard: Guard | _Auto | None = AUTO,
        handle_sigterm: bool | None = None,
        sync_every: int = 1,
        **kwargs: Any,
    ) -> None:
        if isinstance(sync_every, bool) or sync_every < 1:
            raise ValueError(f"sync_every={sync_every!r}: give a whole number of steps >= 1")
        where = resolve_dir(None, None) / name if dirpath is None else Path(dirpath)
        super().__init__(dirpath=where, filename=filename, **kwargs)
        self._spotd_name = name
        self._spotd_guard = guard
        self._spotd_sigterm = handle_sigterm
        self._sync_every = sync_every
        self._node: NodeLink | None = None
        self._verdict: Verdict | None = None
        self._held = NONE
        self._doomed: list[str] = []
        self._rng_to_restore: list[Any] | None = None
        #: True once training stopped because spotd asked (a spot notice or SIGTERM): skip what follows fit.
        self.stopped = False

    # -- lifecycle ---------------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and self._node is None:
            # Collective; the process group exists from here on.
            self._node = NodeLink(
                name=self._spotd_name,
                guard=self._spotd_guard,
                handle_sigterm=self._spotd_sigterm,
                sync_every=1,  # held here: the agreement is Lightning's reduce_boolean_decision
                single_writer=True,
            )
            daemon_dir = self._node.directory
            told = self._node.speaker and self._node.link.guard is not None
            told = told and bool(getattr(self._node.link.guard, "checkpoint_dir", None))
            if told and self.dirpath and not _inside(Path(self.dirpath), daemon_dir):
                log.warning(
                    "spotd: SpotdCallback(dirpath=%s) is outside spotd's checkpoint_dir %s, so nothing will "
                    "be uploaded; fix: drop dirpath, or point it inside %s",
                    self.dirpath,
                    daemon_dir,
                    daemon_dir,
                )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if self._spotd_sigterm is not False:
            from spotd.client import signals

            # Lightning put its handler in front of spotd's when fit started; undone by its own teardown.
            signals.reinstate()
        if self._rng_to_restore is not None:
            _set_rng(self._rng_to_restore, trainer.global_rank)
            self._rng_to_restore = None

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        if stage == "fit" and self._node is not None:
            node = self._node
            if node.speaker and self._doomed and node.link.expected():
                from spotd.client import signals

                # The last save may still be uploading: the files it supersedes go once it is durable
                # (a bounded wait), not left behind because training ended first.
                if node.link.wait_durable(signals.peer_grace_s()):
                    self._delete_superseded()
            self._node.close()
            self._node = None

    # -- the checkpoint --------------------------------------------------------------------------------

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Every rank dumps the checkpoint (global rank 0 writes it): a collective is allowed here.
        checkpoint["spotd"] = {"rng": _gather(_get_rng())}

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        states = checkpoint.get("spotd", {}).get("rng")
        if isinstance(states, list) and len(states) == trainer.world_size:
            self._rng_to_restore = states

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)  # every rank; ends with a barrier
        if self._node is not None:
            self._node.report(Path(filepath), trainer.global_step, self._verdict)

    def _remove_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        node = self._node
        if node is None or not node.link.expected():
            super()._remove_checkpoint(trainer, filepath)
            return
        # Not before a newer save is durable: this may be the only copy spotd has (or is still uploading).
        if node.speaker:
            self._doomed.append(filepath)

    def _delete_superseded(self) -> None:
        node = self._node
        if not self._doomed or node is None or not node.link.wait_durable(0):
            return
        for filepath in self._doomed:
            try:
                Path(filepath).unlink(missing_ok=True)
            except OSError as exc:
                log.warning("spotd: could not delete old checkpoint %s: %s", filepath, exc)
        self._doomed.clear()

    # -- deciding at each step -------------------------------------------------------------------------

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        node = self._node
        if node is None or _accumulating(trainer):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            return
        level, request = node.local_level()
        self._held = max(self._held, level)
        verdict: Verdict | None = None
        if trainer.global_step % self._sync_every == 0:
            held, self._held = self._held, NONE
            # Lightning's own collective, on whatever device the strategy runs on; a second one only when
            # something is asked, to tell a final request from a drill.
            if trainer.strategy.reduce_boolean_decision(held >= SAVE, all=False):
                stop = trainer.strategy.reduce_boolean_decision(held >= STOP, all=False)
                verdict = Verdict(STOP if stop else SAVE, request)
        if verdict is None:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            if node.speaker:
                self._delete_superseded()
            return
        self._save_requested(trainer, verdict)
        if verdict.stop:
            self._stop(trainer, verdict)

    def _save_requested(self, trainer: pl.Trainer, verdict: Verdict) -> None:
        self._verdict = verdict
        try:
            if self._last_global_step_saved == trainer.global_step and self._last_checkpoint_saved:
                # The periodic save of this very step is on disk: report it again, don't rewrite it.
                assert self._node is not None
                self._node.report(Path(self._last_checkpoint_saved), trainer.global_step, verdict)
                return
            candidates = self._monitor_candidates(trainer)
            if self.monitor is None and self.save_top_k != 0:
                self._save_topk_checkpoint(trainer, candidates)  # names it and keeps top-k's books
            else:
                self._save_checkpoint(trainer, self.format_checkpoint_name(candidates))
        finally:
            self._verdict = None

    def _stop(self, trainer: pl.Trainer, verdict: Verdict) -> None:
        assert self._node is not None
        self._node.wait_durable(verdict)
        trainer.should_stop = True
        # Lightning ignores should_stop until min_epochs / min_steps are met, and runs a validation when it
        # does stop: neither may happen inside the window.
        trainer.fit_loop.min_epochs = 0
        trainer.fit_loop.epoch_loop.min_steps = None
        trainer.limit_val_batches = 0
        self.stopped = True
        log.info("spotd: stopped at step %d, the checkpoint is saved", trainer.global_step)


class ResumableLoader(torch.utils.data.DataLoader):  # type: ignore[type-arg]
    """A DataLoader that Lightning resumes mid-epoch: no batch repeated, none skipped.

    Its state is (epoch, batches served in it), saved in the ``.ckpt`` by Lightning. With ``shuffle=True`` the
    order of an epoch comes from ``seed + epoch``, so a resumed epoch serves the rest of the same order.
    (Under DDP Lightning puts a DistributedSampler in, which orders by its seed and epoch the same way.)
    """

    def __init__(self, *args: Any, seed: int = 0, **kwargs: Any) -> None:
        if kwargs.get("generator") is None:
            kwargs["generator"] = torch.Generator()
        super().__init__(*args, **kwargs)
        self.seed = seed
        self._epoch = 0
        self._served = 0
        self._skip = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "served": self._served}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._epoch = int(state["epoch"])
        self._skip = int(state["served"])

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        skip, self._skip = self._skip, 0
        if not skip and self._served:
            self._epoch += 1  # a fresh pass after a finished (or abandoned) one
        self._served = skip
        if isinstance(self.generator, torch.Generator):
            self.generator.manual_seed(self.seed + self._epoch)
        iterator = super().__iter__()
        for _ in range(skip):
            next(iterator)
        for batch in iterator:
            self._served += 1
            yield batch


def _accumulating(trainer: pl.Trainer) -> bool:
    """Mid gradient accumulation: not a step boundary to save or stop at."""
    should_accumulate = getattr(trainer.fit_loop, "_should_accumulate", None)
    return bool(should_accumulate()) if callable(should_accumulate) else False


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return True


def _get_rng() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
        # Tensors and plain numbers only: Lightning loads checkpoints with weights_only.
        state["numpy"] = (kind, torch.from_numpy(np.asarray(keys).astype("int64")), pos, has_gauss, cached)
    except ImportError:
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng(states: list[Any], rank: int) -> None:
    state = states[rank]
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _gather(mine: Any) -> list[Any]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [mine]
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return everyone
