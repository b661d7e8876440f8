"""``from spotd.torch import Checkpointer``: the face of :mod:`spotd.integrations.torch`.

Kept so training scripts written against the first release keep working; the code lives in
``spotd/integrations/torch.py`` beside the other framework integrations.
"""

from spotd.integrations.torch import AUTO, Checkpointer, CheckpointError, Guard, SaveInfo, Stateful

__all__ = ["AUTO", "CheckpointError", "Checkpointer", "Guard", "SaveInfo", "Stateful"]
