"""What the Lightning, Hugging Face and Accelerate integrations share: one spotd link per node, one stop step
for every rank, and a checkpoint reported once it is whole.

A framework writes one checkpoint for all ranks (a Lightning ``.ckpt`` from global rank 0, a Hugging Face
``checkpoint-N/`` or an Accelerate ``save_state`` directory that every rank adds its RNG state to). So on each
node exactly one process, local rank 0 (the *speaker*), connects to that node's spotd and reports what the
node holds, after a barrier, as one checkpoint: its hello says ``rank = node_rank``, ``world_size = nodes``
and ``local_world_size = 1`` (one trainer speaks for the node), so a single node commits it whole and several
nodes commit one part each. Where global rank 0 alone writes the whole checkpoint (Lightning), every speaker
says ``rank = 0``, ``world_size = 1``: node 0's file is the job's checkpoint, and every node restores it. The
other local ranks do not connect; they keep spotd's SIGTERM handler (torchrun
forwards SIGTERM to every worker), whose flag they bring to the agreement.

The stop decision is :func:`spotd.integrations.torch.ranks.agree`'s all-reduce MAX, made at the same step on
every rank, so a request heard by any speaker (or a SIGTERM on any rank) stops every rank at that step.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from spotd.client import signals
from spotd.integrations.torch import ranks
from spotd.integrations.torch.link import (
    AUTO,
    CheckpointRequestLike,
    DaemonLink,
    Guard,
    _Auto,
    connect,
    default_socket_path,
    resolve_dir,
)
from spotd.integrations.torch.ranks import NONE, PERIODIC, SAVE, STOP, Topology

__all__ = ["NONE", "PERIODIC", "SAVE", "STOP", "NodeLink", "Verdict"]

log = logging.getLogger("spotd.integrations")


class _SigtermFlag:
    """SIGTERM on a rank without a guard: a flag the next agreement carries to every rank."""

    __slots__ = ("__weakref__", "received")

    def __init__(self) -> None:
        self.received = False

    def on_sigterm(self) -> None:
        self.received = True


class Verdict:
    """What every rank agreed on at one step, and which request (if any) this rank's speaker answers."""

    __slots__ = ("level", "request")

    def __init__(self, level: int, request: CheckpointRequestLike | None) -> None:
        self.level = level
        self.request = request

    @property
    def save(self) -> bool:
        """Some rank was asked for a checkpoint (a drill, or a final one)."""
        return self.level >= SAVE

    @property
    def stop(self) -> bool:
        """Some rank was asked for a final checkpoint: save, wait until durable, stop."""
        return self.level >= STOP


class NodeLink:
    """One node's link to spotd for a framework integration; build it on every rank at the same point."""

    __slots__ = (
        "_agreement",
        "_handled",
        "_held",
        "_sigterm",
        "_sigterm_handled",
        "directory",
        "link",
        "speaker",
        "topology",
    )

    def __init__(
        self,
        *,
        name: str,
        guard: Guard | _Auto | None = AUTO,
        checkpoint_dir: str | os.PathLike[str] | None = None,
        handle_sigterm: bool | None = None,
        sync_every: int = 1,
        group: Any = None,
        single_writer: bool = False,
    ) -> None:
        """Collective when distributed (the run identity and the node's directory are agreed on).

        ``single_writer``: global rank 0 writes the whole checkpoint, other nodes hold no part of it."""
        topology = ranks.topology()
        self.topology = topology
        self.speaker = topology.local_rank == 0
        run_id = ranks.run_identity(group=group)
        self._sigterm: _SigtermFlag | None = None
        self._sigterm_handled = False
        if not self.speaker:
            # No guard here, so nobody else turns this rank's SIGTERM into a stop: keep a flag of our own.
            self._sigterm = _install_sigterm_flag(handle_sigterm)
            self.link = DaemonLink(guard=None, socket_path=None, owned=False)
        elif isinstance(guard, _Auto):
            socket_path = default_socket_path()
            nodes = max(1, topology.world_size // max(1, topology.local_world_size))
            speaks_for = Topology(
                rank=0 if single_writer else topology.node_rank,
                world_size=1 if single_writer else nodes,
                local_rank=0,
                local_world_size=1,
                node_rank=topology.node_rank,
            )
            self.link = DaemonLink(
                guard=connect(
                    name, socket_path, handle_sigterm=handle_sigterm, topology=speaks_for, run_id=run_id
                ),
                socket_path=socket_path,
                owned=True,
            )
        else:
            path = getattr(guard, "socket_path", None) if guard is not None else None
            self.link = DaemonLink(
                guard=guard,
                socket_path=os.fspath(path) if isinstance(path, (str, os.PathLike)) else None,
                owned=False,
            )
        mine = str(resolve_dir(checkpoint_dir, self.link.guard)) if self.speaker else None
        self.directory = Path(_speakers_choice(mine, topology, group) or resolve_dir(checkpoint_dir, None))
        self._agreement = (
            ranks.StopAgreement(group=group, every=sync_every) if ranks.distributed(group) else None
        )
        self._handled: str | None = None
        self._held = NONE

    # -- deciding --------------------------------------------------------------------------------------

    def _pending(self) -> CheckpointRequestLike | None:
        """The request not yet acted on. Read off ``request``, not ``checkpoint_requested``: a periodic save
        reported while a request was open answers it in the client, and a final one must still stop us."""
        guard = self.link.guard
        if guard is None:
            return None
        try:
            request = guard.request
        except Exception as exc:
            log.warning("reading the spotd request failed: %s", exc)
            return None
        if request is None or request.request_id == self._handled:
            return None
        return request

    def local_level(self, *, due: bool = False) -> tuple[int, CheckpointRequestLike | None]:
        """This rank's own wish, before the agreement."""
        self.link.notice_connection()
        request = self._pending()
        if request is not None:
            return (STOP if request.final else SAVE), request
        if self._sigterm is not None and self._sigterm.received and not self._sigterm_handled:
            return STOP, None
        return (PERIODIC if due else NONE), None

    def decide(self, step: int, *, due: bool = False) -> Verdict:
        """Collective when distributed: every rank gets the same level at the same ``step``."""
        level, request = self.local_level(due=due)
        if self._agreement is not None:
            level = self._agreement(level, step)
        return Verdict(level, request)

    # -- reporting -------------------------------------------------------------------------------------

    def barrier(self) -> None:
        """Every rank of the job is here (a MIN all-reduce, so it works on gloo and NCCL alike)."""
        ranks.all_ok(True)

    def announce(self, path: Path, step: int, verdict: Verdict | None, *, temp: Path | None = None) -> None:
        """Before the framework writes a checkpoint directory asked for by ``verdict``: the speaker creates it
        (``temp`` when the files go there first) and tells spotd, which uploads each file the moment it is
        closed. Call it before the ranks start writing (before a barrier, or before the framework's save)."""
        if not self.speaker or verdict is None or not verdict.save:
            return
        try:
            (temp or path).mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # the save itself will say what is wrong
            log.debug("spotd: could not create %s before the save: %s", temp or path, exc)
            return
        final_for_peer = verdict.stop and verdict.request is None
        self.link.announce(path, temp, step, final=final_for_peer, directory=True)

    def report(self, path: Path, step: int, verdict: Verdict | None) -> None:
        """After every rank's files are written: the speaker tells spotd about what this node holds.

        ``verdict`` None is a save of the framework's own schedule (committed in the background)."""
        self.barrier()
        request = verdict.request if verdict is not None else None
        if request is not None:
            self._handled = request.request_id
        if verdict is not None and verdict.stop and self._sigterm is not None:
            self._sigterm_handled = True
        if not self.speaker:
            return
        if not path.exists():
            # Another node wrote it (a Lightning .ckpt lives on global rank 0's disk only).
            log.info("spotd: %s is not on this node's disk; nothing for this node's spotd to upload", path)
            return
        final_for_peer = verdict is not None and verdict.stop and request is None
        self.link.report(path, step, final=final_for_peer)

    def wait_durable(self, verdict: Verdict) -> bool:
        """Collective: the speakers wait for their node's part, then every rank learns whether all are in."""
        durable = True
        if self.speaker and self.link.expected():
            request = verdict.request
            timeout_s = (
                max(0.0, float(request.seconds_left())) if request is not None else signals.peer_grace_s()
            )
            started = time.monotonic()
            durable = self.link.wait_durable(timeout_s)
            if not durable:
                log.warning(
                    "spotd: the checkpoint was not confirmed durable within %.1fs; stopping anyway",
                    time.monotonic() - started,
                )
        return ranks.all_ok(durable)

    def close(self) -> None:
        self.link.close()


def _install_sigterm_flag(handle_sigterm: bool | None) -> _SigtermFlag | None:
    from spotd.client import signals

    if not signals.sigterm_enabled(handle_sigterm):
        return None
    flag = _SigtermFlag()
    if not signals.install(flag.on_sigterm):
        log.warning("spotd: SIGTERM cannot be handled outside the main thread; it will end this rank")
    # The handler holds the flag weakly: the NodeLink keeps it alive.
    return flag


def _speakers_choice(mine: str | None, topology: Topology, group: Any) -> str | None:
    """The speaker's checkpoint directory, on every rank of its node (only the speaker asked the daemon)."""
    if not ranks.distributed(group):
        return mine
    import torch.distributed as dist

    everyone: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, (topology.node_rank, mine), group=group)
    for node_rank, directory in everyone:
        if node_rank == topology.node_rank and directory is not None:
            return str(directory)
    return mine
