"""``spotd simulate-imds``: the simulator in the foreground, armed from the command line."""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Awaitable, Callable

from spotd.tools.simulator.server import (
    FAULT_MODES,
    LIFE_CYCLES,
    SPOT_ACTIONS,
    TOKEN_FAULT_MODES,
    ImdsSimulator,
)

__all__ = ["add_arguments", "main"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=1338, help="port (default 1338; 0 picks a free one)")
    parser.add_argument(
        "--action",
        choices=sorted(SPOT_ACTIONS),
        default=None,
        help="arm a spot interruption notice with this action",
    )
    parser.add_argument(
        "--after",
        type=float,
        default=0.0,
        metavar="S",
        help="seconds until the spot notice appears (with --action)",
    )
    parser.add_argument(
        "--lead",
        type=float,
        default=120.0,
        metavar="S",
        help="seconds from the notice to the interruption time it announces (default 120)",
    )
    parser.add_argument(
        "--rebalance-after",
        type=float,
        default=None,
        metavar="S",
        help="serve a rebalance recommendation after S seconds",
    )
    parser.add_argument(
        "--maintenance",
        default=None,
        metavar="CODE",
        help="schedule a maintenance event, e.g. system-reboot or instance-stop",
    )
    parser.add_argument(
        "--maintenance-after",
        type=float,
        default=600.0,
        metavar="S",
        help="NotBefore of the maintenance event, seconds from now (default 600)",
    )
    parser.add_argument(
        "--no-require-token", action="store_true", help="also serve IMDSv1 requests that carry no token"
    )
    # The identity it reports, so a drill or a test can match a real (or moto) instance.
    parser.add_argument("--instance-id", default="i-0123456789abcdef0", help="instance-id to report")
    parser.add_argument("--instance-type", default="g5.2xlarge", help="instance-type to report")
    parser.add_argument(
        "--availability-zone",
        default="us-east-1a",
        metavar="AZ",
        help="placement/availability-zone to report (placement/region follows from it)",
    )
    parser.add_argument(
        "--life-cycle",
        choices=sorted(LIFE_CYCLES),
        default="spot",
        help="instance-life-cycle to report (default spot)",
    )


async def _serve(
    args: argparse.Namespace, started: Callable[[ImdsSimulator], Awaitable[None] | None]
) -> None:
    sim = ImdsSimulator(
        host=args.host,
        port=args.port,
        require_token=not args.no_require_token,
        instance_id=args.instance_id,
        instance_type=args.instance_type,
        availability_zone=args.availability_zone,
        life_cycle=args.life_cycle,
    )
    await sim.start()
    try:
        if args.action:
            sim.arm_instance_action(args.action, after_s=args.after, lead_s=args.lead)
        if args.rebalance_after is not None:
            sim.arm_rebalance(after_s=args.rebalance_after)
        if args.maintenance:
            sim.add_maintenance(args.maintenance, not_before_s=args.maintenance_after)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        result = started(sim)
        if result is not None:
            await result
        await stop.wait()
    finally:
        await sim.close()


def main(args: argparse.Namespace) -> int:
    """Run the simulator until SIGINT/SIGTERM; print where it listens and how to drive it."""

    def started(sim: ImdsSimulator) -> None:
        url = sim.url
        print(f"IMDS simulator listening on {url}", flush=True)
        print(f"  point spotd at it:   SPOTD_IMDS_ENDPOINT={url} spotd run", flush=True)
        print(
            f'  interrupt:           curl -X POST {url}/_sim/notice -d \'{{"action": "terminate", '
            f'"after": 0, "lead": 120}}\'',
            flush=True,
        )
        print(f"  rebalance:           curl -X POST {url}/_sim/rebalance -d '{{\"after\": 0}}'", flush=True)
        print(
            f'  maintenance:         curl -X POST {url}/_sim/maintenance -d \'{{"code": "system-reboot", '
            f'"not_before": 300}}\'',
            flush=True,
        )
        print(
            f'  fault:               curl -X POST {url}/_sim/fault -d \'{{"mode": "503", "count": 3}}\' '
            f"(modes: {', '.join(sorted(FAULT_MODES | TOKEN_FAULT_MODES))})",
            flush=True,
        )
        print(
            f'  identity:            curl -X POST {url}/_sim/identity -d \'{{"instance_id": "i-0abc", '
            f'"instance_type": "g5.2xlarge", "availability_zone": "us-east-1b", "life_cycle": "spot"}}\'',
            flush=True,
        )
        print(f"  clear / state:       curl -X POST {url}/_sim/clear ; curl {url}/_sim/state", flush=True)

    try:
        asyncio.run(_serve(args, started))
    except OSError as exc:
        print(
            f"spotd simulate-imds: cannot listen on {args.host}:{args.port}: {exc}; "
            f"choose another --port (0 picks a free one)",
            flush=True,
        )
        return 1
    return 0
