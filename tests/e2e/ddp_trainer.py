"""A torchrun worker for the multi-rank tests: DDP on gloo, deterministic data, ranks that run at different
paces, spotd.torch's Checkpointer. One JSON line per event on stdout, prefixed by torchrun with the rank.

Usage: torchrun --nproc-per-node 2 tests/e2e/ddp_trainer.py --steps N [--skew-ms 30] [--barrier]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time

import torch
import torch.distributed as dist
from torch import nn

from spotd.torch import Checkpointer


def emit(event: str, **fields: object) -> None:
    # One write() per line: both ranks share torchrun's stdout, and print() may split a line in two writes.
    os.write(1, (json.dumps({"event": event, "rank": dist.get_rank(), **fields}) + "\n").encode())


def weights_digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--skew-ms", type=float, default=30.0, help="extra time per step on odd ranks")
    parser.add_argument("--step-ms", type=float, default=10.0)
    parser.add_argument("--barrier", action="store_true", help="dist.barrier() after the loop, as many do")
    parser.add_argument(
        "--plain-allreduce",
        action="store_true",
        help="average gradients parameter by parameter instead of DDP (bitwise across restarts with > 2 ranks)",
    )
    parser.add_argument("--sharded", action="store_true", help="Checkpointer(sharded=True): DCP directories")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 8))
    # DDP regroups its gradient buckets after the first step of every run, so with more than 2 ranks a
    # resumed run sums gradients in another order than an uninterrupted one (not bitwise; 2 ranks are).
    model = net if args.plain_allreduce else torch.nn.parallel.DistributedDataParallel(net)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    ckpt = Checkpointer(model=net, optimizer=opt, every_steps=args.every, sharded=args.sharded)
    start = ckpt.restore()
    emit("started", step=start, digest=weights_digest(net))
    pause_s = (args.step_ms + (args.skew_ms if rank % 2 else 0.0)) / 1000
    stopped = None
    for step in range(start, args.steps):
        g = torch.Generator().manual_seed(step * 1000 + rank)
        x, y = torch.randn(16, 32, generator=g), torch.randn(16, 8, generator=g)
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        if args.plain_allreduce:
            for p in net.parameters():
                dist.all_reduce(p.grad)
                p.grad /= dist.get_world_size()
        opt.step()
        time.sleep(pause_s)
        if ckpt.step(step):
            stopped = step + 1
            break
    if args.barrier:
        dist.barrier()
    if stopped is not None:
        emit("stopped", step=stopped, t=time.time(), digest=weights_digest(net))
    else:
        emit("done", step=args.steps, digest=weights_digest(net))
    ckpt.close()
    # No dist.destroy_process_group(): under torch 2.13 with gloo it sometimes waits forever for a peer
    # that has already left (seen with sharded saves, and by the HF examples); exiting frees it all.
    return 0


if __name__ == "__main__":
    sys.exit(main())
