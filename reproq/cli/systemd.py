"""``manage.py reproq systemd [--kind worker|web] ...``: print (or write) systemd unit files for
this project: a template unit of ``manage.py reproq worker`` processes, or a uvicorn web
service whose processes run the embedded runtime. Values come from this process (its Python,
working directory and settings module) unless given; every value is checked before it goes
into a unit, and quoted and %-escaped as systemd reads it."""

from __future__ import annotations

import argparse
import getpass
import os
import re
import sys
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from .argtypes import positive_int

MODULE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
ASGI_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$")
USER_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}\$?$")
HOST_RE = re.compile(r"^[A-Za-z0-9.:\[\]-]{1,255}$")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def _absolute_path(text: str) -> str:
    if not text or any(ord(c) < 32 for c in text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a path")
    if not os.path.isabs(text):
        raise argparse.ArgumentTypeError(f"{text!r} must be an absolute path")
    return os.path.normpath(text)


def _matching(pattern: re.Pattern[str], what: str) -> Any:
    def check(text: str) -> str:
        if not pattern.match(text):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return text
    return check


def _port(text: str) -> int:
    value = positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a TCP port (1-65535)")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kind", choices=["worker", "web"], default="worker",
                        help="worker: template unit of `reproq worker` processes (default); "
                             "web: uvicorn serving the app with the runtime embedded")
    parser.add_argument("--name", type=_matching(NAME_RE, "a unit name"),
                        help="unit name without .service (default reproq-worker@ / reproq-web)")
    parser.add_argument("--user", type=_matching(USER_RE, "a user name"),
                        help="user the service runs as (default: the current user)")
    parser.add_argument("--workdir", type=_absolute_path,
                        help="project directory (default: the current directory)")
    parser.add_argument("--python", type=_absolute_path,
                        help="the virtualenv's python (default: this one)")
    parser.add_argument("--settings-module", type=_matching(MODULE_RE, "a Python module path"),
                        help="DJANGO_SETTINGS_MODULE for the service (default: this process's)")
    parser.add_argument("--env-file", type=_absolute_path,
                        help="optional EnvironmentFile (DATABASE_URL, secrets)")
    parser.add_argument("--concurrency", type=positive_int,
                        help="worker: tasks at once per process (default: the settings')")
    parser.add_argument("--queues", type=_matching(re.compile(r"^[A-Za-z0-9_.:,-]{1,500}$"),
                                                   "a comma-separated list of queue names"),
                        help="worker: queues to claim from (default: the settings')")
    parser.add_argument("--asgi", type=_matching(ASGI_RE, "module.path:attribute"),
                        help="web: the ASGI application (default: <project>.asgi:application)")
    parser.add_argument("--host", type=_matching(HOST_RE, "a host or address"),
                        default="127.0.0.1", help="web: address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=_port, default=8000, help="web: port (default 8000)")
    parser.add_argument("--workers", type=positive_int, default=1,
                        help="web: uvicorn worker processes (default 1)")
    parser.add_argument("--output-dir", type=_absolute_path,
                        help="write the unit file there instead of printing it")
    parser.add_argument("--force", action="store_true", help="overwrite an existing file")


def _quote(arg: str) -> str:
    """One ExecStart argument: %-escaped, double-quoted when it holds spaces or quotes."""
    arg = arg.replace("%", "%%")
    if re.search(r'[\s"\'\\;]', arg):
        return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return arg


def _value(text: str) -> str:
    """A plain unit value (Description, Environment=...): %-escaped."""
    return text.replace("%", "%%")


def render(options: dict[str, Any]) -> tuple[str, str]:
    """(file name, unit text) for the options `add_arguments` parses."""
    from ..conf import current_runtime_settings

    settings_module = (options.get("settings_module")
                       or os.environ.get("DJANGO_SETTINGS_MODULE", ""))
    if not MODULE_RE.match(settings_module or ""):
        raise CommandError("give --settings-module: DJANGO_SETTINGS_MODULE is not set here")
    workdir = options.get("workdir") or os.getcwd()
    python = options.get("python") or sys.executable
    user = options.get("user") or getpass.getuser()
    if not USER_RE.match(user):
        raise CommandError(f"the current user {user!r} cannot be written into a unit: give "
                           "--user")
    grace = current_runtime_settings().shutdown_grace_seconds
    kind = options["kind"]
    if kind == "worker":
        name = options.get("name") or "reproq-worker@"
        argv = [python, "-m", "django", "reproq", "worker"]
        if options.get("concurrency"):
            argv += ["--concurrency", str(options["concurrency"])]
        if options.get("queues"):
            argv += ["--queues", options["queues"]]
        description = "reproq worker" + (" %i" if name.endswith("@") else "")  # %i: instance
    else:
        name = options.get("name") or "reproq-web"
        asgi = options.get("asgi") or f"{settings_module.rsplit('.', 1)[0]}.asgi:application"
        argv = [python, "-m", "uvicorn", asgi, "--host", options["host"], "--port",
                str(options["port"]), "--workers", str(options["workers"]), "--lifespan", "on",
                "--proxy-headers"]
        description = "reproq web (uvicorn, tasks run in-process)"  # no specifiers
    lines = [
        "[Unit]",
        f"Description={description} for {_value(settings_module)}",
        "After=network-online.target postgresql.service",
        "Wants=network-online.target",
        "",
        "[Service]",
        "Type=simple",
        f"User={user}",
        f"WorkingDirectory={_value(workdir)}",
        f"Environment={_quote('DJANGO_SETTINGS_MODULE=' + settings_module)}",
        "Environment=PYTHONUNBUFFERED=1",
    ]
    if options.get("env_file"):
        lines.append(f"EnvironmentFile=-{_value(options['env_file'])}")
    lines += [
        "ExecStart=" + " ".join(_quote(a) for a in argv),
        # SIGTERM: stop claiming, let running tasks finish for SHUTDOWN_GRACE_SECONDS, release
        # the rest; systemd waits a little longer before SIGKILL (leases cover that case).
        "KillSignal=SIGTERM",
        "KillMode=mixed",
        f"TimeoutStopSec={int(grace) + 15}",
        "Restart=always",
        "RestartSec=2",
        "NoNewPrivileges=true",
        "PrivateTmp=true",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
    ]
    return f"{name}.service", "\n".join(lines) + "\n"


def handle(command: BaseCommand, **options: Any) -> None:
    if options["kind"] == "web" and (options.get("concurrency") or options.get("queues")):
        raise CommandError("--concurrency and --queues are for --kind worker; the web service "
                           "takes them from REPROQ_RUNTIME")
    if options["kind"] == "worker" and options.get("asgi"):
        raise CommandError("--asgi is for --kind web")
    filename, text = render(options)
    out_dir = options.get("output_dir")
    if not out_dir:
        command.stdout.write(text, ending="")
        return
    target = Path(out_dir) / filename
    if not Path(out_dir).is_dir():
        raise CommandError(f"{out_dir} is not a directory")
    if target.exists() and not options["force"]:
        raise CommandError(f"{target} exists: give --force to overwrite it")
    target.write_text(text)
    unit = filename.replace("@.service", "@1.service")
    command.stdout.write(f"wrote {target}\nthen: sudo systemctl daemon-reload && "
                         f"sudo systemctl enable --now {unit}")
