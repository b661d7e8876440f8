"""``from spotd.torch import Checkpointer``: the face of :mod:`spotd.integrations.torch`.

Kept so training scripts written against the first release keep working; the code lives in
``spotd/integrations/torch/`` beside the other framework integrations.
"""

from spotd.integrations.torch import (
    AUTO,
    NONE,
    PERIODIC,
    SAVE,
    STOP,
    Checkpointer,
    CheckpointError,
    Guard,
    SaveInfo,
    Stateful,
    agree,
)

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
