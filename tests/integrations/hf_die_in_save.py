"""examples/transformers_train.py, SIGKILLed in the middle of writing the checkpoint of step $DIE_AT_STEP:
after the weights, optimizer and scheduler, before the RNG state and trainer_state.json."""

from __future__ import annotations

import os
import runpy
import signal
import sys
from pathlib import Path

from transformers import Trainer

DIE_AT = int(os.environ["DIE_AT_STEP"])
_save_rng_state = Trainer._save_rng_state


def dying(self: Trainer, output_dir: str) -> None:
    if self.state.global_step == DIE_AT:
        print('{"event": "dying"}', flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    _save_rng_state(self, output_dir)


Trainer._save_rng_state = dying  # type: ignore[method-assign]
example = Path(__file__).resolve().parents[2] / "examples" / "transformers_train.py"
sys.argv = [str(example), *sys.argv[1:]]
runpy.run_path(str(example), run_name="__main__")
