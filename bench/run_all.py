"""Issue 13's benchmark in one run: upload and restore, notice -> durable, unchanged files, background upload.

    .venv/bin/python bench/run_all.py [--quick] [--only upload,e2e,unchanged,background] [--repeat N]
                                      [--servers moto,s3rver] [--json FILE]

Runs each section as a subprocess of its own bench (a fresh interpreter each: the background section pins
cores and torch threads), one after the other, and prints one summary: per section a markdown table of
medians with the goal beside each figure and whether it is met. Progress (one line per measurement started
and finished) goes to stderr. ``--json FILE`` writes every repetition of every section.

* upload: ``bench/upload.py``: 1 x 1 GiB, 64 x 16 MiB and a DCP-like set, upload and restore, spotd vs
  ``s5cmd cp`` vs ``aws s3 cp``, against moto and s3rver; wall ratio and CPU s/GB; restores also against
  "s5cmd + sync" (s5cmd's restore made as durable as spotd's). Goal: <= 1.0 x s5cmd's wall and CPU per GB.
* e2e: ``bench/e2e.py --overlap both``: notice served -> durable at 1 GB and 100 MB, overlap on and off.
  Goal: <= 1.0 x (torch.save + s5cmd cp); the overlap moonshot <= 0.6.
* unchanged: ``bench/unchanged.py``: bytes sent for a second checkpoint with 80 % of its files unchanged.
  Goal: only the changed files' bytes (+ 1 %).
* background: ``bench/background.py --placement pinned``: training step slowdown during a background upload,
  the S3 server on a core of its own (``--placement shared``, moto beside the loop on every core, starves moto
  until botocore times out). Goal: <= 5 % slower, read from the time the loop waits for a core.

``--quick`` is the small-scale check that all of it works (7 min on a loaded 2-core VM): 256 MiB,
16 x 16 MiB and 2 x 16 shards; 256 MB and 100 MB; 10 x 8 MiB; 64 MB; one repetition unless --repeat.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import background  # noqa: E402
import e2e  # noqa: E402
import unchanged  # noqa: E402
import upload  # noqa: E402
from benchlib import host, progress  # noqa: E402

TITLES = {
    "upload": "Upload and restore: spotd vs s5cmd vs aws cli",
    "e2e": "Notice -> durable, with and without overlap",
    "unchanged": "Bytes sent for a second checkpoint with 80 % unchanged files",
    "background": "Training step slowdown during a background upload",
}
REPORTS = {
    "upload": upload.report,
    "e2e": e2e.report,
    "unchanged": unchanged.report,
    "background": background.report,
}


def section_args(name: str, quick: bool, repeat: int, servers: str) -> list[str]:
    """The bench's own command line for one section, at full or quick scale."""
    if name == "upload":
        return ["upload.py", "--repeat", str(repeat), "--servers", servers, *(["--quick"] if quick else [])]
    if name == "e2e":
        sizes = "256,100" if quick else "1024,100"
        return ["e2e.py", "--sizes", sizes, "--reps", str(repeat), "--overlap", "both"]
    if name == "unchanged":
        return [
            "unchanged.py",
            "--repeat",
            str(repeat),
            "--file-mb",
            "8" if quick else "32",
            "--unchanged",
            "0.8",
        ]
    # A cap that binds against moto (50 MB/s never does): the row shows what the knob buys and costs.
    size = "64" if quick else "256"
    return [
        "background.py",
        "--size-mb",
        size,
        "--reps",
        str(repeat),
        "--placement",
        "pinned",
        "--rate",
        "8MB",
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--quick",
        action="store_true",
        help="small scale, to check that everything works (default: full scale)",
    )
    ap.add_argument(
        "--only",
        default=",".join(TITLES),
        help=f"comma-separated sections to run, in this order: {','.join(TITLES)} (default: all)",
    )
    ap.add_argument(
        "--repeat",
        type=int,
        default=0,
        help="repetitions in every section, medians reported (default: 3, or 1 with --quick)",
    )
    ap.add_argument("--servers", default="moto,s3rver", help="S3 servers of the upload section: moto, s3rver")
    ap.add_argument("--json", type=Path, metavar="FILE", help="write every repetition of every section here")
    args = ap.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    if not only or any(s not in TITLES for s in only):
        ap.error(f"--only takes a comma-separated subset of {','.join(TITLES)}")
    repeat = args.repeat or (1 if args.quick else 3)
    if repeat < 1:
        ap.error("--repeat at least 1")
    scale = "quick" if args.quick else "full scale"
    summary: dict[str, Any] = {
        "command": [Path(sys.argv[0]).as_posix(), *(sys.argv[1:] if argv is None else argv)],
        "scale": scale,
        "repeat": repeat,
        "host_before": host(),
        "sections": {},
        "failed": {},
    }
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="spotd-bench-all-") as tmp:
        for name in [s for s in TITLES if s in only]:
            out = Path(tmp) / f"{name}.json"
            script, *rest = section_args(name, args.quick, repeat, args.servers)
            cmd = [sys.executable, str(HERE / script), *rest, "--json-out", str(out)]
            shown = " ".join([f"bench/{script}", *rest])
            progress(f"section {name} started: {shown}")
            t0 = time.monotonic()
            # The bench's own report (stdout) is the table printed below; its progress lines go to stderr.
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
            if proc.returncode != 0 or not out.exists():
                summary["failed"][name] = proc.returncode
                progress(
                    f"section {name} FAILED (exit {proc.returncode}); its output:\n{proc.stdout[-2000:]}"
                )
                continue
            summary["sections"][name] = {**json.loads(out.read_text()), "shown_command": shown}
            elapsed, total = time.monotonic() - t0, time.monotonic() - started
            progress(f"section {name} done in {elapsed:.0f} s ({total:.0f} s since the start)")
    summary["host_after"] = host()
    summary["seconds"] = time.monotonic() - started
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1) + "\n")
    print(render(summary))
    return 1 if summary["failed"] else 0


def render(summary: dict[str, Any]) -> str:
    h = summary["host_before"]
    lines = [
        f"# Issue 13: everything in one run ({summary['scale']}, medians of {summary['repeat']})",
        "",
        f"`{' '.join(summary['command'])}`: {h['time']}, {h['cores']} cores, Python {h['python']}, "
        f"load average {h['load_average']} before and {summary['host_after']['load_average']} after; "
        f"{summary['seconds'] / 60:.1f} min.",
    ]
    for name, doc in summary["sections"].items():
        lines += ["", f"## {TITLES[name]}", "", f"`{doc['shown_command']}`", "", REPORTS[name](doc)]
    for name, code in summary["failed"].items():
        lines += ["", f"## {TITLES[name]}", "", f"FAILED (exit {code}); see the progress lines on stderr."]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
