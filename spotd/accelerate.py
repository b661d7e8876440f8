"""``spotd.accelerate.SpotdAccelerate``: the face of :mod:`spotd.integrations.accelerate`.

Needs ``pip install spotd[accelerate]``; importing it imports accelerate."""

from spotd.integrations.accelerate import SpotdAccelerate

__all__ = ["SpotdAccelerate"]
