"""The training process of the container test: the standard library and spotd.client, nothing heavier.

It steps, and its loop is the documented one: when ``guard.checkpoint_requested``, save, ``guard.saved()``,
and if ``guard.request.final``, wait until spotd says the save is durable and exit 0. It installs no SIGTERM
handler of its own: ``spotd.client.connect()`` does, and turns SIGTERM into a final request
(reason ``sigterm``) that this same loop answers. So a spot notice and a stop from systemd take one path.

Every event is one JSON line appended to --events, a file the host reads.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import TextIO

import spotd.client

STEP_S = 0.05  # one "training step"


class Trainer:
    def __init__(self, *, name: str, events: TextIO) -> None:
        self.name = name
        self.events = events
        # spotd.client's SIGTERM handling is on by default: nothing of our own.
        self.guard = spotd.client.connect(name=name)

    def emit(self, event: str, **fields: object) -> None:
        record = {"event": event, "pid": os.getpid(), "uid": os.getuid(), "time": time.time(), **fields}
        self.events.write(json.dumps(record) + "\n")
        self.events.flush()

    def save(self, step: int) -> str:
        rel = f"{self.name}/step-{step:06d}-pid-{os.getpid()}.bin"
        path = Path(self.guard.checkpoint_dir or ".") / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(4096))
        return rel

    def run(self) -> int:
        deadline = time.monotonic() + 30
        while not self.guard.connected:
            if time.monotonic() > deadline:
                self.emit("not_connected", socket=self.guard.socket_path)
                return 1
            time.sleep(STEP_S)
        self.emit("connected", checkpoint_dir=self.guard.checkpoint_dir, groups=os.getgroups())
        step = 0
        while True:
            step += 1
            time.sleep(STEP_S)
            if not self.guard.checkpoint_requested:
                continue
            request = self.guard.request
            assert request is not None  # checkpoint_requested says there is one
            rel = self.save(step)
            self.guard.saved(rel, step=step)
            what = {"step": step, "path": rel, "reason": request.reason, "request_id": request.request_id}
            self.emit("saved", final=request.final, **what)
            final = self.guard.request
            if final is not None and final.final:
                durable = self.guard.wait_durable(timeout=final.seconds_left())
                self.emit("durable", ok=durable, **what)
                break
        self.guard.close()
        self.emit("exit", step=step)
        return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", required=True)
    parser.add_argument("--events", required=True, help="JSON-lines file the events are appended to")
    args = parser.parse_args()
    with open(args.events, "a", encoding="utf-8") as events:
        return Trainer(name=args.name, events=events).run()


if __name__ == "__main__":
    sys.exit(main())
