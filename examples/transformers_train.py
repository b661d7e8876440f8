"""The Hugging Face Trainer under spotd: a tiny GPT-2 built from a config (nothing downloaded) that a spot
notice stops at a step and ``resume_from_checkpoint`` resumes there.

    python examples/transformers_train.py --max-steps 200 --save-steps 50 --checkpoint-dir /tmp/ckpt
    torchrun --nproc-per-node 2 examples/transformers_train.py ...   # DDP on gloo

The spotd part is two lines: ``SpotdCallback()`` in the callbacks and ``latest_checkpoint(output_dir)`` as
``resume_from_checkpoint``. Every event is one JSON line on stdout (``started``, ``evaluation``, ``stopped``,
``done`` with a digest of the final weights), each with the rank.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from typing import Any

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

import spotd.transformers

RANK = int(os.environ.get("RANK", "0"))


def emit(event: str, **fields: Any) -> None:
    # One write() per line: under torchrun the ranks share one stdout, and print() may split a line.
    os.write(1, (json.dumps({"event": event, "rank": RANK, **fields}) + "\n").encode())


def digest(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class Tokens(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """Seeded random token sequences: a language-modelling set that needs no download."""

    def __init__(self, *, rows: int, length: int, vocab: int, seed: int) -> None:
        self.ids = torch.randint(0, vocab, (rows, length), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class Events(TrainerCallback):
    def __init__(self, step_sleep: float) -> None:
        self.step_sleep = step_sleep

    def on_train_begin(self, args: Any, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        emit("started", step=state.global_step, pid=os.getpid())

    def on_step_end(self, args: Any, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        if self.step_sleep:
            time.sleep(self.step_sleep)

    def on_evaluate(self, args: Any, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        emit("evaluation", step=state.global_step)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--max-steps", type=int, default=200)
    p.add_argument("--save-steps", type=int, default=50, help="the Trainer's own periodic checkpoints")
    p.add_argument("--eval-steps", type=int, default=40)
    p.add_argument("--checkpoint-dir", default=None, help="default: $SPOTD_CHECKPOINT_DIR")
    p.add_argument("--step-sleep", type=float, default=0.0, help="seconds to sleep a step (for drills)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    torch.set_num_threads(1)
    root = args.checkpoint_dir or os.environ.get("SPOTD_CHECKPOINT_DIR") or "/opt/ml/checkpoints"
    output_dir = os.path.join(root, "hf-run")
    config = GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2)
    torch.manual_seed(args.seed)
    model = GPT2LMHeadModel(config)
    training = TrainingArguments(
        output_dir=output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=16,
        learning_rate=1e-3,
        lr_scheduler_type="linear",
        save_strategy="steps",
        save_steps=args.save_steps,
        save_total_limit=2,
        eval_strategy="steps",
        eval_steps=args.eval_steps,
        logging_steps=10,
        report_to="none",
        seed=args.seed,
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
        ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
    )
    spotd_cb = spotd.transformers.SpotdCallback()
    trainer = Trainer(
        model=model,
        args=training,
        train_dataset=Tokens(rows=128, length=16, vocab=64, seed=args.seed),
        eval_dataset=Tokens(rows=32, length=16, vocab=64, seed=args.seed + 1),
        callbacks=[spotd_cb, Events(args.step_sleep)],
    )
    trainer.train(resume_from_checkpoint=spotd.transformers.latest_checkpoint(output_dir))
    if spotd_cb.stopped:
        emit("stopped", step=trainer.state.global_step)
    else:
        emit("done", step=trainer.state.global_step, digest=digest(model))
    return 0


if __name__ == "__main__":
    sys.exit(main())
