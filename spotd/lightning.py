"""``spotd.lightning.SpotdCallback``: the face of :mod:`spotd.integrations.lightning`.

Needs ``pip install spotd[lightning]``; importing it imports lightning."""

from spotd.integrations.lightning import ResumableLoader, SpotdCallback

__all__ = ["ResumableLoader", "SpotdCallback"]
