"""The ``spotd`` command. Exit codes: 0 ok, 1 runtime failure, 2 usage, 78 bad configuration."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from spotd import __version__
from spotd.config import Config, load_config
from spotd.errors import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK, ConfigError, SpotdError
from spotd.events import parse_time

__all__ = ["main"]

EPILOG = """\
configuration: /etc/spotd/spotd.toml (or --config PATH, or $SPOTD_CONFIG); every key can be overridden
by SPOTD_<SECTION>_<KEY> environment variables, e.g. SPOTD_STORE_URI=s3://bucket/prefix.
exit codes: 0 ok, 1 runtime failure, 2 usage, 78 bad configuration.
"""


def _config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        metavar="PATH",
        default=None,
        help="TOML config file (default: $SPOTD_CONFIG, else /etc/spotd/spotd.toml if it exists)",
    )


def _load(args: argparse.Namespace, **overrides: Any) -> Config:
    return load_config(args.config, overrides={k: v for k, v in overrides.items() if v is not None})


def _socket_path(args: argparse.Namespace) -> str:
    import os

    if os.environ.get("SPOTD_SOCKET"):
        return os.environ["SPOTD_SOCKET"]
    return _load(args).socket.path


# -- commands ------------------------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    from spotd.daemon.app import run_daemon
    from spotd.logs import configure_logging

    cfg = _load(args)
    if not cfg.store.uri:
        raise ConfigError(
            "store.uri",
            "is not set, so checkpoints would die with the instance",
            'set store.uri = "s3://bucket/prefix" in the config or SPOTD_STORE_URI',
        )
    configure_logging(fmt=cfg.log.format, level=cfg.log.level)
    return run_daemon(cfg)


def cmd_status(args: argparse.Namespace) -> int:
    from spotd.client import control

    try:
        reply = control("status", socket_path=_socket_path(args), timeout=args.timeout)
    except (ConnectionError, OSError, TimeoutError) as exc:
        print(f"spotd status: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    reply.pop("op", None)
    if args.json:
        print(json.dumps(reply, indent=2, sort_keys=True))
    else:
        print(render_status(reply))
    return EXIT_OK


def _ago(text: str | None) -> str:
    if not text:
        return ""
    seconds = (datetime.now(UTC) - parse_time(text)).total_seconds()
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def _span(seconds: float) -> str:
    """1m50s, 45s, 2h05m: how a person reads a countdown."""
    whole = round(abs(seconds))
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


def _until(text: str | None, *, now: datetime | None = None) -> str:
    """'in 1m50s' for a deadline ahead, '20s ago' for one passed; the raw text if it is not a time."""
    if not text:
        return "?"
    try:
        left = (parse_time(text) - (now or datetime.now(UTC))).total_seconds()
    except ValueError:
        return text
    return f"in {_span(left)}" if left >= 0 else f"{_span(left)} ago"


def render_status(s: dict[str, Any]) -> str:
    inst = s.get("instance") or {}
    rows = [
        ("phase", s.get("phase", "?")),
        ("job", s.get("job_id", "?")),
        ("instance", f"{inst.get('id')} ({inst.get('type')}, {inst.get('az')}, {inst.get('life_cycle')})"),
        ("imds", "up" if s.get("imds_up") else "DOWN (no notice can be seen)"),
        ("store", s.get("store", "?")),
        ("checkpoint dir", s.get("checkpoint_dir", "?")),
    ]
    trainers = s.get("trainers") or []
    rows.append(("trainers", str(len(trainers)) if trainers else "none connected"))
    for t in trainers:
        rank = "" if t.get("rank") is None else f", rank {t['rank']}/{t.get('world_size')}"
        rows.append(("", f"{t.get('name')} (pid {t.get('pid')}{rank})"))
    uploads = s.get("uploads")
    if uploads:
        for i, line in enumerate(_upload_lines(uploads)):
            rows.append(("periodic uploads" if i == 0 else "", line))
    req = s.get("request")
    if req:
        state = _request_state(req)
        final = "final, " if req.get("final") else ""
        rows.append(
            ("request", f"{req.get('reason')} ({final}deadline {_until(req.get('deadline'))}): {state}")
        )
        upload = req.get("upload")
        if upload and upload.get("estimate_seconds") is not None:
            verdict = "fits" if upload.get("fits") else "AT RISK: will not fit"
            if upload.get("rate_capped"):
                verdict += " (rate measured under store.background_rate)"
            if upload.get("rate_cpu_starved"):
                verdict += " (rate measured while the trainer held the cores)"
            if upload.get("rate_yielded"):
                verdict += " (rate measured while periodic uploads gave way to the trainer)"
            rows.append(
                (
                    "upload",
                    f"~{upload['estimate_seconds']:.1f} s for {upload.get('bytes', 0) / 1e6:.0f} MB at the "
                    f"measured rate, {upload.get('seconds_left', 0):.1f} s left: {verdict}",
                )
            )
    for w in s.get("waiting_for_ranks") or []:
        rows.append(("multi-rank", f"{w.get('name')}: waiting for rank(s) {w.get('missing_ranks')} to save"))
    notices = s.get("notices") or []
    rows.append(("notices", ", ".join(f"{n['kind']}:{n['action']}" for n in notices) if notices else "none"))
    last = s.get("last_durable")
    if last:
        rows.append(("last durable", f"{last.get('name')} step {last.get('step')} {_ago(last.get('time'))}"))
    else:
        rows.append(("last durable", "none yet"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _upload_lines(u: dict[str, Any]) -> list[str]:
    """The periodic uploads: the rate an emergency upload is estimated at, the last one, and how they give
    way to the trainers (``store.yield_to_trainer``)."""
    rate = u.get("rate_bytes_per_second")
    if rate is None:
        lines = ["none measured yet (an emergency upload's time is estimated from them)"]
    else:
        n = u.get("samples", 0)
        text = f"{rate / 1e6:.0f} MB/s measured, median of {n} upload{'s' if n != 1 else ''}"
        if u.get("cap_bytes_per_second"):
            text += f", capped at {u['cap_bytes_per_second'] / 1e6:.0f} MB/s (store.background_rate)"
        if u.get("rate_yielded"):
            text += ", all held back for the trainer (an emergency upload may be faster)"
        lines = [text]
    last = u.get("last")
    if last:
        mb, seconds = last.get("bytes", 0) / 1e6, last.get("seconds", 0)
        text = f"last: {mb:.0f} MB in {seconds:.1f} s, {_ago(last.get('time'))}"
        if (last.get("yielded") or 0) >= 0.01:
            text += f", held back {last['yielded']:.0%} of its time to give the trainer its cores"
        if (last.get("core_wait") or 0) >= 0.01:
            text += f", waited for a core {last['core_wait']:.0%} of it"
        lines.append(text)
    y = u.get("yielding")
    if y:
        allowed = f"store.yield_to_trainer {y.get('slowdown'):g}"
        if y.get("unreadable"):
            lines.append(
                f"not giving way ({allowed}): the trainers' /proc/<pid>/task/*/schedstat cannot be read; run "
                'spotd in their PID namespace, or set store.background_rate (e.g. "20MB")'
            )
        elif not y.get("trainers"):
            lines.append(f"give way to the trainers when they connect ({allowed})")
        else:
            window, slots = y.get("window", 0), y.get("slots", 0)
            if window < 1:
                held = f"one part in flight {window:.0%} of the time"
            else:
                held = f"{int(window)} of {slots} parts in flight"
            pids = ", ".join(str(p) for p in y["trainers"])
            text = f"giving way to pid {pids}: {held}"
            if y.get("pressure") is not None:
                text += f"; the trainer was last slowed {y['pressure']:.1f} x what {allowed} allows"
            lines.append(text)
    return lines


def _request_state(req: dict[str, Any]) -> str:
    """What became of a request: still waiting, still uploading, or done and whether anything was lost."""
    outstanding = ", ".join(req.get("outstanding") or []) or "-"
    if not req.get("finished"):
        return f"waiting on {outstanding}"
    if req.get("settled") is False:
        return f"closed, still uploading: {outstanding}"
    if req.get("ok") is None:
        return "done"  # a daemon from before requests said what became of them
    if not req["ok"]:
        return f"done, lost: {'; '.join(req.get('lost') or [])}"
    late = req.get("late") or []
    return f"done: all durable ({'; '.join(late)})" if late else "done: all durable"


def cmd_checkpoint(args: argparse.Namespace) -> int:
    from spotd.client import control

    try:
        reply = control(
            "drill", socket_path=_socket_path(args), timeout=args.timeout, reason=args.reason, wait=True
        )
    except (ConnectionError, OSError, TimeoutError) as exc:
        print(f"spotd checkpoint: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    if not reply.get("ok") and reply.get("message"):
        # Nothing was asked (no trainer connected): the reason and its fix are the whole answer.
        if args.json:
            print(json.dumps(reply, indent=2, sort_keys=True))
        print(f"spotd checkpoint: {reply['message']}", file=sys.stderr)
        return EXIT_FAILURE
    if args.json:
        print(json.dumps(reply, indent=2, sort_keys=True))
    else:
        print(f"request {reply.get('request_id')}: {reply.get('trainers', 0)} trainer(s) asked")
        for d in reply.get("durable") or []:
            print(f"  durable  {d['trainer']}: {d['name']} (step {d.get('step')})")
        for m in reply.get("missing") or []:
            print(f"  missing  {m}")
        for lost in reply.get("lost") or []:
            print(f"  lost     {lost}")
        if reply.get("notice_to_durable_seconds") is not None:
            print(
                f"  request to durable: {reply['notice_to_durable_seconds']:.2f} s, "
                f"{reply.get('bytes', 0)} bytes"
            )
    return EXIT_OK if reply.get("ok") else EXIT_FAILURE


def cmd_complete(args: argparse.Namespace) -> int:
    from spotd.client import control

    try:
        reply = control(
            "finished",
            socket_path=_socket_path(args),
            timeout=args.timeout,
            reason=args.reason,
            checkpoint=not args.no_checkpoint,
        )
    except (ConnectionError, OSError, TimeoutError) as exc:
        print(f"spotd complete: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    reply.pop("op", None)
    if args.json:
        print(json.dumps(reply, indent=2, sort_keys=True))
    elif reply.get("ok"):
        print(
            f"job {reply.get('job_id')}: {reply.get('status')} ({reply.get('reason')}); final checkpoint "
            f"{reply.get('checkpoint') or 'none'} (step {reply.get('step')})"
            f"{'; output ' + reply['output'] if reply.get('output') else ''}; "
            f"on_complete = {reply.get('on_complete')}"
        )
    else:
        print(f"spotd complete: {reply.get('message')}", file=sys.stderr)
    return EXIT_OK if reply.get("ok") else EXIT_FAILURE


def _store(args: argparse.Namespace) -> Any:
    from spotd.store import open_store

    cfg = _load(args)
    if not cfg.store.uri:
        raise ConfigError("store.uri", "is not set", "set store.uri in the config or SPOTD_STORE_URI")
    return cfg, open_store(cfg)


def cmd_list(args: argparse.Namespace) -> int:
    async def go() -> int:
        cfg, store = _store(args)
        try:
            manifests = await store.list()
        finally:
            await store.close()
        if args.json:
            print(json.dumps([json.loads(m.to_json()) for m in manifests], indent=2))
            return EXIT_OK
        if not manifests:
            print(f"no committed checkpoints for job {cfg.job_id!r} in {store.uri}")
            return EXIT_OK
        print(f"{'NAME':<48} {'STEP':>9} {'SIZE':>10} {'FILES':>5}  CREATED")
        for m in manifests:
            step = "-" if m.step is None else str(m.step)
            print(
                f"{m.name:<48} {step:>9} {_human(m.total_bytes):>10} {len(m.files):>5}  "
                f"{m.created_at.isoformat(timespec='seconds')}"
            )
        return EXIT_OK

    return asyncio.run(go())


def cmd_restore(args: argparse.Namespace) -> int:
    async def go() -> int:
        from spotd.tools.progress import Progress

        cfg, store = _store(args)
        dest = Path(args.to or cfg.checkpoint_dir)
        await asyncio.to_thread(dest.mkdir, parents=True, exist_ok=True)
        bar: Progress | None = None

        def progress(done: int, total: int) -> None:
            nonlocal bar
            if bar is None:
                bar = Progress(total=total, label="restore")
            bar.total = total
            bar.set(done)

        try:
            result = await store.restore(dest, name=args.name, progress=progress)
        finally:
            if bar is not None:
                bar.close()
            await store.close()
        for skipped in result.skipped:
            print(f"skipped {skipped}: failed verification", file=sys.stderr)
        if result.moved_aside:
            n = len(result.moved_aside)
            shown = ", ".join(result.moved_aside[:10]) + (", …" if n > 10 else "")
            print(
                f"moved {n} local {'file' if n == 1 else 'files'} the restore replaced into "
                f"{result.aside_dir} (kept, not overwritten): {shown}",
                file=sys.stderr,
            )
        m = result.manifest
        print(
            f"restored {m.name} (step {m.step}): {result.files} files, {_human(result.bytes)} "
            f"in {result.seconds:.2f} s into {dest}, every file verified"
        )
        return EXIT_OK

    return asyncio.run(go())


def cmd_history(args: argparse.Namespace) -> int:
    async def go() -> int:
        from spotd.aws.pricing import PriceBook
        from spotd.daemon.costs import price_history, price_settings
        from spotd.store.history import summarize
        from spotd.store.ledger import Ledger

        cfg, store = _store(args)
        book = None if args.no_cost else PriceBook(settings=price_settings(cfg))
        try:
            view = await Ledger.of_store(store).read()
            history = summarize(view, now=datetime.now(UTC))
            if book is not None and history.sessions:
                history = await price_history(history, book)
        finally:
            if book is not None:
                await book.close()
            await store.close()
        if args.json:
            print(json.dumps(history.to_dict(), indent=2, sort_keys=True))
        elif not history.sessions:
            print(f"no sessions recorded for job {cfg.job_id!r} in {store.uri}")
        else:
            print(render_history(history.to_dict()))
        return EXIT_OK

    return asyncio.run(go())


def _dollars(value: float | None) -> str:
    if value is None:
        return "?"
    return f"${value:.2f}" if value >= 0.01 or value == 0 else f"${value:.6f}"


def render_history(h: dict[str, Any]) -> str:
    """``spotd history`` as a person reads it: one block per session, then the job's totals."""
    end = h.get("end") or {}
    head = f"job {h['job_id']}: {h['status']}"
    if end:
        head += f" ({end.get('reason')}, {end.get('at')})"
    lines = [head, ""]
    for s in h["sessions"]:
        inst = s["instance"]
        lines.append(
            f"{s['session']}  {inst['type']} {inst['az']} {inst['life_cycle']}  {s['status']}"
            f"{' (running)' if s['running'] else ''}"
        )
        lines.append("  " + " → ".join(f"{t['status']} {t['at'][11:19]}" for t in s["timeline"]))
        billable = s.get("billable_seconds")
        cost = f", cost {_dollars(s['cost_usd'])}" if h.get("priced") else ""
        lines.append(
            f"  training {_span(s['training_seconds'])}, instance {_span(s['instance_seconds'])}"
            f"{'' if billable is None else f', billable {_span(billable)}'}{cost}"
        )
        for i in s["interruptions"]:
            took = i.get("notice_to_durable_seconds")
            durable = f"durable in {took:.1f} s" if i["durable"] and took is not None else "NOT durable"
            lines.append(
                f"  interruption {i['kind']}/{i['action']} at {i['detected_at'][11:19]}: {durable}, "
                f"{_human(i['bytes'])}"
            )
            lines += [f"    lost: {x}" for x in i["lost"]]
        if s["lost_seconds"]:
            steps = "unknown steps" if s["lost_steps"] is None else f"{s['lost_steps']} steps"
            worth = f", {_dollars(s['lost_work_usd'])}" if h.get("priced") else ""
            lines.append(f"  work lost: {_span(s['lost_seconds'])} of training ({steps}){worth}")
    lines.append("")
    billable = h.get("billable_seconds")
    lines.append(
        f"{len(h['sessions'])} sessions, {h['interruptions']} interruptions; training "
        f"{_span(h['training_seconds'])}, instances {_span(h['instance_seconds'])}"
        f"{'' if billable is None else f', billable {_span(billable)} (in on-demand seconds)'}"
    )
    if h.get("cost_usd") is not None:
        lines.append(
            f"cost {_dollars(h['cost_usd'])}; on demand it would have cost "
            f"{_dollars(h['on_demand_cost_usd'])}; "
            f"savings {h['savings_percent']:.1f}% = (1 - billable/training) x 100; "
            f"lost work {_dollars(h['lost_work_usd'])}"
        )
    for error in h.get("pricing_errors") or []:
        lines.append(f"no price: {error}")
    for key in h.get("unreadable_records") or []:
        lines.append(f"unreadable ledger record skipped: {key}")
    return "\n".join(lines)


def _human(n: int) -> str:
    value = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return str(n)


# -- parser --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spotd",
        description="Keep GPU training on EC2 spot instances from losing work.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"spotd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, fn: Callable[[argparse.Namespace], int], help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name,
            help=help_,
            description=help_,
            epilog=EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        _config_arg(p)
        p.set_defaults(func=fn)
        return p

    add("run", cmd_run, "run the daemon in the foreground (what systemd runs)")

    p = add(
        "status",
        cmd_status,
        "show phase, notice, trainers and the last durable checkpoint of the running daemon",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the daemon (default 5)")

    p = add("checkpoint", cmd_checkpoint, "ask every trainer to checkpoint now and upload it (a drill)")
    p.add_argument("--reason", default="drill", help="free text recorded in the logs (default: drill)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for durable (default 600)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")

    p = add(
        "complete",
        cmd_complete,
        "mark the job Completed: a final checkpoint, the output, then policy.on_complete",
    )
    p.add_argument("--reason", default="complete", help="recorded in the ledger (default: complete)")
    p.add_argument(
        "--no-checkpoint",
        action="store_true",
        help="do not ask the trainers for a final checkpoint; the newest durable one is final",
    )
    p.add_argument(
        "--timeout", type=float, default=900.0, help="seconds to wait for the daemon (default 900)"
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")

    p = add("list", cmd_list, "list committed checkpoints in the store, newest first")
    p.add_argument("--json", action="store_true", help="print the manifests as JSON")

    p = add("restore", cmd_restore, "download a committed checkpoint and verify every file")
    p.add_argument("--to", metavar="DIR", help="destination directory (default: checkpoint_dir)")
    p.add_argument("--name", help="checkpoint name from `spotd list` (default: the newest)")

    p = add("history", cmd_history, "the job across instances: sessions, interruptions, cost and savings")
    p.add_argument("--json", action="store_true", help="print the history as JSON")
    p.add_argument(
        "--no-cost", action="store_true", help="do not look prices up (EC2 and the AWS Price List API)"
    )

    from spotd.tools import simulator

    p = add("simulate-imds", lambda a: simulator.main(a), "run an IMDSv2 simulator for drills and tests")
    simulator.add_arguments(p)

    try:
        from spotd.tools import demo
    except ImportError:  # pragma: no cover - demo is part of the package
        demo = None  # type: ignore[assignment]
    if demo is not None:
        p = add("demo", lambda a: demo.main(a), "the whole story on this machine, nothing to configure")
        demo.add_arguments(p)

    from spotd.tools import install

    p = add("install", lambda a: install.main(a), "install the systemd units, config and spotd user")
    install.add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        print(f"spotd: bad configuration: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except SpotdError as exc:
        print(f"spotd {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
