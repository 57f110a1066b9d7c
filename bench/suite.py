"""``./dev bench all``: every workload (W1-W5 and the pgbench ceiling), reproq and its peers in
the same run, printed as markdown tables followed by the targets and whether each was met.

    ./dev bench all [--smoke] [--peers LIST|none] [--only w1,w2,w3,w4,w5,pgbench]
                    [--repeat N] [--out FILE]
    ./dev bench w2 [...]          one workload (same options)
    ./dev bench peers             create/update the peers' virtualenv and print its versions

Progress goes to stderr, the tables to stdout (and to ``--out``). ``--smoke`` runs every
workload tiny, one repetition, reproq only unless ``--peers`` is given.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import sys
from typing import Any

from bench import common
from bench.config import Ctx, sizes_for
from bench.report import Section, targets_section

WORKLOADS = ("w1", "w2", "w3", "w4", "w5", "pgbench")


def parse(argv: list[str], prog: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog)
    p.add_argument("--smoke", action="store_true", help="every workload tiny (CI smoke)")
    p.add_argument("--peers", default=None,
                   help="comma-separated peers, or 'none' (default: all; none with --smoke)")
    p.add_argument("--only", default=None, help="comma-separated: " + ",".join(WORKLOADS))
    p.add_argument("--repeat", type=int, default=None)
    p.add_argument("--tasks", type=int, default=None, help="W2 backlog size")
    p.add_argument("--w5-rows", type=int, default=None)
    p.add_argument("--w4-rate", type=float, default=None)
    p.add_argument("--out", default=None, help="also write the markdown to this file")
    return p.parse_args(argv)


def machine() -> dict[str, str]:
    info = {"cores": str(os.cpu_count()), "python": platform.python_version(),
            "kernel": platform.release()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as f:
            kb = int(f.readline().split()[1])
            info["memory"] = f"{kb / 1024 / 1024:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    with contextlib.suppress(OSError):
        info["load"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return info


def build_systems(ctx_log: Any, args: argparse.Namespace, admin_url: str
                  ) -> tuple[list[Any], list[str], dict[str, str]]:
    from bench.systems import PeerSystem, Reproq

    systems: list[Any] = [Reproq(admin_url)]
    dropped: list[str] = []
    versions: dict[str, str] = {}
    from bench.peers import DEFAULT_PEERS, PEER_MODULES, ensure_venv
    from bench.peers import versions as peer_versions

    wanted = args.peers if args.peers is not None else ("none" if args.smoke else "all")
    names = [] if wanted == "none" else (
        DEFAULT_PEERS if wanted == "all" else [x.strip() for x in wanted.split(",") if x.strip()])
    if not names:
        return systems, dropped, versions
    unknown = [n for n in names if n not in PEER_MODULES]
    if unknown:
        raise SystemExit(f"unknown peers {unknown}; known: {', '.join(PEER_MODULES)}")
    try:
        python = ensure_venv(lambda m: ctx_log(m))
        versions = peer_versions(python)
    except Exception as exc:  # no PyPI, no venv: reproq alone, and say why
        dropped += [f"{n}: the peers' virtualenv could not be set up ({exc})" for n in names]
        return systems, dropped, versions
    for name in names:
        try:
            system = PeerSystem(name, python, admin_url)
            ctx_log(f"setting up {name} in database {system.db}")
            system.setup()
            systems.append(system)
        except Exception as exc:
            dropped.append(f"{name}: setup failed: {type(exc).__name__}: {str(exc)[:300]}")
    return systems, dropped, versions


def clean_old_logs(days: float = 1.0) -> None:
    """Logs of the processes a run started are kept for a day (for post-mortems), then go."""
    import tempfile
    import time
    from pathlib import Path

    for path in (Path(tempfile.gettempdir()) / "reproq-bench-logs").glob("*.log"):
        try:
            if path.stat().st_mtime < time.time() - days * 86400:
                path.unlink()
        except OSError:
            pass


def main(argv: list[str], only: str | None = None) -> None:
    args = parse(argv, "bench " + (only or "all"))
    clean_old_logs()
    selected = [only] if only else (
        [w.strip() for w in args.only.split(",")] if args.only else list(WORKLOADS))
    bad = [w for w in selected if w not in WORKLOADS]
    if bad:
        raise SystemExit(f"unknown workloads {bad}; available: {', '.join(WORKLOADS)}")
    sizes = sizes_for(args.smoke, repeat=args.repeat, w2_tasks=args.tasks,
                      w5_rows=args.w5_rows, w4_rate=args.w4_rate)
    if sizes.w5_ready >= sizes.w5_rows:
        sizes = sizes_for(args.smoke, repeat=args.repeat, w2_tasks=args.tasks,
                          w5_rows=args.w5_rows, w4_rate=args.w4_rate,
                          w5_ready=max(1, sizes.w5_rows // 10))
    admin = common.admin_url()
    started = datetime.datetime.now(datetime.UTC)
    mach = machine()
    ctx = Ctx(sizes=sizes, systems=[], admin_url=admin, postmaster=None)
    systems, dropped, versions = build_systems(ctx.log, args, admin)
    ctx.systems = systems
    ctx.postmaster = common.postmaster_pid(admin)
    if ctx.postmaster is None:
        ctx.log("PostgreSQL is not on this host's /proc: its CPU will read n/a")
    pg = common.server_info(admin)
    modules = {"w1": "bench.w1", "w2": "bench.w2", "w3": "bench.w3", "w4": "bench.w4",
               "w5": "bench.w5", "pgbench": "bench.pgbench"}
    import importlib

    try:
        for name in selected:
            try:
                importlib.import_module(modules[name]).run(ctx)
            except Exception as exc:  # a workload that breaks does not stop the others
                ctx.fail("all", name, exc)
    finally:
        for system in systems:
            system.close()
    mach["load after"] = machine().get("load", "?")
    out = [render_header(started, mach, pg, sizes, systems, versions, args.smoke)]
    out += [sec.markdown() for sec in ctx.sections]
    if ctx.targets:
        out.append(targets_section(ctx.targets).markdown())
    problems = Section("Peers dropped and failures", ["what"])
    for line in dropped + ctx.failures:
        problems.add(line.replace("|", "/").replace("\n", " "))
    if problems.rows:
        out.append(problems.markdown())
    text = "\n".join(out)
    sys.stdout.write(text)
    sys.stdout.flush()
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


def render_header(started: datetime.datetime, mach: dict[str, str], pg: dict[str, str],
                  sizes: Any, systems: list[Any], versions: dict[str, str],
                  smoke: bool) -> str:
    import django

    lines = [f"## reproq benchmark ({'SMOKE, not figures' if smoke else 'full run'}), "
             f"{started:%Y-%m-%d %H:%M} UTC", ""]
    lines.append(f"- machine: {mach.get('cpu', '?')}, {mach.get('cores')} cores, "
                 f"{mach.get('memory', '?')} RAM, Linux {mach.get('kernel')}; load average "
                 f"{mach.get('load', '?')} at start, {mach.get('load after', '?')} at end")
    lines.append(f"- PostgreSQL {pg.get('version')} on the same host: synchronous_commit="
                 f"{pg.get('synchronous_commit')}, fsync={pg.get('fsync')}, shared_buffers="
                 f"{pg.get('shared_buffers')}, max_connections={pg.get('max_connections')}")
    lines.append(f"- Python {mach.get('python')}, Django {django.get_version()}; peers: "
                 + (", ".join(f"{k} {v}" for k, v in versions.items()) or "none"))
    lines.append(f"- systems: {', '.join(s.name for s in systems)}; {sizes.repeat} "
                 f"repetition(s), worker concurrency {sizes.concurrency}")
    return "\n".join(lines) + "\n"


def peers_main(argv: list[str]) -> None:
    from bench.peers import ensure_venv, venv_dir, versions

    python = ensure_venv(lambda m: print(m, file=sys.stderr))
    print(f"peers' virtualenv: {venv_dir()}")
    for k, v in versions(python).items():
        print(f"  {k} {v}")
