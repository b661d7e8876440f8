"""PyTorch checkpointing that spotd can make durable: three lines in a training loop.

```python
from spotd.torch import Checkpointer
ckpt = Checkpointer(model=model, optimizer=opt, scheduler=sched, every_steps=500)
start = ckpt.restore()          # next step to run: 0 if nothing to resume from
for step in range(start, total_steps):
    train_one_step(step)
    if ckpt.step(step):         # saves when due or when spotd asks; True = stop now, it is durable
        break
```

Modules: ``checkpointer`` (the loop-facing class), ``files`` (names, atomic writes, retention on disk),
``state`` (what a checkpoint holds and how it is read back), ``link`` (what it says to spotd), ``ranks``
(with several ranks: one stop step for all, one restore step for all).
This package imports torch; the spotd daemon never imports it.
"""

from spotd.integrations.torch.checkpointer import Checkpointer, SaveInfo
from spotd.integrations.torch.files import CheckpointError
from spotd.integrations.torch.link import AUTO, Guard
from spotd.integrations.torch.ranks import NONE, PERIODIC, SAVE, STOP, agree
from spotd.integrations.torch.state import Stateful

__all__ = [
    "AUTO",
    "NONE",
    "PERIODIC",
    "SAVE",
    "STOP",
    "CheckpointError",
    "Checkpointer",
    "Guard",
    "SaveInfo",
    "Stateful",
    "agree",
]
