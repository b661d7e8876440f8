"""The training process of the container test: the standard library and spotd.client, nothing heavier.

It steps until SIGTERM. A checkpoint request is saved, reported, and waited on until spotd says it is
durable; training then goes on, even after a final request, so that one process also shows the stop
path. On SIGTERM it saves once more, reports it (no request: nobody asked), waits until it is durable,
and exits 0. The SIGTERM handling is this stub's own (spotd.client has none yet): what the test proves
with it is that the units' stop order leaves spotd running to commit a trainer's last-chance save.

Every event is one JSON line appended to --events, a file the host reads.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import TextIO

import spotd.client

STEP_S = 0.05  # one "training step"
DURABLE_TIMEOUT_S = 60.0  # well inside the unit's TimeoutStopSec=75s


class Trainer:
    def __init__(self, *, name: str, events: TextIO) -> None:
        self.name = name
        self.events = events
        self.stopping = False
        self.guard = spotd.client.connect(name=name)

    def emit(self, event: str, **fields: object) -> None:
        record = {"event": event, "pid": os.getpid(), "uid": os.getuid(), "time": time.time(), **fields}
        self.events.write(json.dumps(record) + "\n")
        self.events.flush()

    def on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        # Only a flag: the save happens in the loop, between steps, like a real trainer's.
        self.stopping = True

    def save(self, step: int, kind: str, **fields: object) -> None:
        rel = f"{self.name}/{kind}-step-{step:06d}.bin"
        path = Path(self.guard.checkpoint_dir or ".") / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(4096))
        self.guard.saved(rel, step=step)
        self.emit("saved", kind=kind, step=step, path=rel, **fields)
        durable = self.guard.wait_durable(timeout=DURABLE_TIMEOUT_S)
        self.emit("durable", kind=kind, step=step, path=rel, ok=durable)

    def run(self) -> int:
        deadline = time.monotonic() + 30
        while not self.guard.connected:
            if time.monotonic() > deadline:
                self.emit("not_connected", socket=self.guard.socket_path)
                return 1
            time.sleep(STEP_S)
        self.emit("connected", checkpoint_dir=self.guard.checkpoint_dir, groups=os.getgroups())
        handled: set[str] = set()
        step = 0
        while not self.stopping:
            step += 1
            time.sleep(STEP_S)
            request = self.guard.request
            if self.guard.checkpoint_requested and request and request.request_id not in handled:
                handled.add(request.request_id)
                self.save(step, "requested", reason=request.reason, final=request.final)
        self.save(step, "sigterm")
        self.guard.close()
        self.emit("exit", step=step)
        return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", required=True)
    parser.add_argument("--events", required=True, help="JSON-lines file the events are appended to")
    args = parser.parse_args()
    with open(args.events, "a", encoding="utf-8") as events:
        trainer = Trainer(name=args.name, events=events)
        signal.signal(signal.SIGTERM, trainer.on_sigterm)
        return trainer.run()


if __name__ == "__main__":
    sys.exit(main())
