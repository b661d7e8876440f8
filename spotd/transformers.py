"""``spotd.transformers.SpotdCallback`` and ``latest_checkpoint``: the face of
:mod:`spotd.integrations.transformers`.

Needs ``pip install spotd[transformers]``; importing it imports transformers."""

from spotd.integrations.transformers import SpotdCallback, latest_checkpoint

__all__ = ["SpotdCallback", "latest_checkpoint"]
