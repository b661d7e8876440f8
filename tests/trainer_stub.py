"""A stand-in training process: steps, reports a connection, and answers checkpoint requests.

Prints one JSON line per event on stdout: connected, requested, durable, step, finished, exit.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import spotd.client


def emit(event: str, **fields: object) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", required=True)
    parser.add_argument("--steps", type=int, default=100000)
    parser.add_argument("--step-sleep", type=float, default=0.01)
    parser.add_argument("--size", type=int, default=4096, help="bytes per checkpoint file")
    parser.add_argument("--periodic-every", type=int, default=0)
    parser.add_argument(
        "--finish-at", type=int, default=None, help="save, then guard.finished() at this step"
    )
    args = parser.parse_args()
    warnings.simplefilter("default")
    guard = spotd.client.connect(name=args.name)
    deadline = time.monotonic() + 10
    while not guard.connected and time.monotonic() < deadline and os.environ.get("SPOTD_SOCKET"):
        time.sleep(0.01)
    emit("connected", connected=guard.connected, checkpoint_dir=guard.checkpoint_dir, pid=os.getpid())
    root = Path(guard.checkpoint_dir or ".")
    handled: set[str] = set()
    for step in range(args.steps):
        time.sleep(args.step_sleep)
        req = guard.request
        periodic = args.periodic_every and step and step % args.periodic_every == 0
        if (guard.checkpoint_requested and req is not None and req.request_id not in handled) or periodic:
            rel = f"{args.name}/step-{step:06d}.bin"
            (root / args.name).mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(os.urandom(args.size))
            if req is not None and guard.checkpoint_requested:
                handled.add(req.request_id)
                emit(
                    "requested",
                    step=step,
                    request_id=req.request_id,
                    final=req.final,
                    reason=req.reason,
                    deadline=req.deadline.isoformat(),
                    received=time.time(),
                )
            guard.saved(rel, step=step)
            ok = guard.wait_durable(timeout=30)
            emit("durable", ok=ok, step=step, path=rel)
            if req is not None and req.final:
                emit("exit", step=step, reason="final")
                guard.close()
                return 0
        if args.finish_at is not None and step == args.finish_at:
            rel = f"{args.name}/step-{step:06d}.bin"
            (root / args.name).mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(os.urandom(args.size))
            guard.saved(rel, step=step)
            answer = guard.finished(step, timeout=60)
            emit("finished", step=step, answer=answer)
            guard.close()
            return 0 if answer and answer.get("ok") else 1
        if step % 50 == 0:
            emit("step", step=step)
    emit("exit", step=args.steps, reason="done")
    guard.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
