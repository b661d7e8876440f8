"""An IMDSv2 simulator: the real wire protocol on loopback, for tests, drills and the demo.

It answers like EC2's metadata service: ``PUT /latest/api/token`` with a TTL header, 401 for a missing,
bad or expired token (when tokens are required), 404 before a notice, JSON bodies as ``text/plain``.
Notices and faults are armed from Python (:class:`ImdsSimulator`, :class:`SimulatorThread`) or over a
small JSON control API under ``/_sim/``; ``spotd simulate-imds`` runs it in the foreground.
"""

from spotd.tools.simulator.cli import add_arguments, main
from spotd.tools.simulator.server import FAULT_MODES, HUGE_BODY_BYTES, ImdsSimulator
from spotd.tools.simulator.thread import SimulatorThread

__all__ = ["FAULT_MODES", "HUGE_BODY_BYTES", "ImdsSimulator", "SimulatorThread", "add_arguments", "main"]
