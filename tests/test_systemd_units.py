"""``manage.py reproq systemd``: the units it writes pass ``systemd-analyze verify`` where
systemd is installed, quote what systemd would split or expand, and their ExecStart really
runs a worker that executes tasks and stops cleanly on SIGTERM. Bad values are refused."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.tasks import default_task_backend

from tests.servers import REPO_ROOT, child_env, wait_for_status, wait_until
from tests.testapp import tasks

pytestmark = pytest.mark.django_db(transaction=True)


def unit(*argv: str) -> str:
    out = StringIO()
    call_command("reproq", "systemd", *argv, stdout=out)
    return out.getvalue()


def directives(text: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            found.setdefault(key, []).append(value)
    return found


def verify(tmp_path, name: str, text: str) -> None:
    """systemd's own parser, where this machine has it (it is not a dependency)."""
    if shutil.which("systemd-analyze") is None:
        return
    path = tmp_path / name
    path.write_text(text)
    done = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_worker_unit_defaults_and_quoting(tmp_path):
    text = unit("--workdir", "/srv/my app/100%", "--env-file", "/etc/reproq env",
                "--concurrency", "4", "--queues", "default,emails", "--user", "www-data")
    d = directives(text)
    assert d["Description"] == ["reproq worker %i for tests.settings"]
    assert d["User"] == ["www-data"]
    assert d["WorkingDirectory"] == ["/srv/my app/100%%"]  # % is a specifier: doubled
    assert d["EnvironmentFile"] == ["-/etc/reproq env"]
    assert "DJANGO_SETTINGS_MODULE=tests.settings" in d["Environment"]
    assert shlex.split(d["ExecStart"][0]) == [
        sys.executable, "-m", "django", "reproq", "worker", "--concurrency", "4",
        "--queues", "default,emails"]
    assert d["KillSignal"] == ["SIGTERM"] and d["Restart"] == ["always"]
    from reproq.conf import current_runtime_settings

    assert int(d["TimeoutStopSec"][0]) > current_runtime_settings().shutdown_grace_seconds
    verify(tmp_path, "reproq-worker@2.service", text)


def test_web_unit_serves_the_asgi_app_with_uvicorn(tmp_path):
    text = unit("--kind", "web", "--asgi", "tests.asgi:application", "--port", "9001",
                "--workers", "3", "--host", "0.0.0.0", "--workdir", str(REPO_ROOT))
    d = directives(text)
    assert shlex.split(d["ExecStart"][0]) == [
        sys.executable, "-m", "uvicorn", "tests.asgi:application", "--host", "0.0.0.0",
        "--port", "9001", "--workers", "3", "--lifespan", "on", "--proxy-headers"]
    assert d["Description"][0].startswith("reproq web")
    verify(tmp_path, "reproq-web.service", text)
    # Without --asgi: the settings package's asgi module.
    assert "tests.asgi:application" in unit("--kind", "web")


def test_written_unit_runs_a_worker_that_stops_cleanly_on_sigterm(tmp_path):
    out = StringIO()
    call_command("reproq", "systemd", "--workdir", str(REPO_ROOT), "--output-dir",
                 str(tmp_path), "--concurrency", "2", stdout=out)
    assert "systemctl enable --now reproq-worker@1.service" in out.getvalue()
    path = tmp_path / "reproq-worker@.service"
    d = directives(path.read_text())
    with pytest.raises(CommandError, match="exists: give --force"):
        call_command("reproq", "systemd", "--output-dir", str(tmp_path), stdout=StringIO())
    call_command("reproq", "systemd", "--output-dir", str(tmp_path), "--force",
                 "--workdir", str(REPO_ROOT), "--concurrency", "2", stdout=StringIO())

    # Run what systemd would run: ExecStart in WorkingDirectory with the unit's Environment.
    env = child_env("unit-token")
    for item in d["Environment"]:
        key, value = shlex.split(item)[0].split("=", 1)
        env[key] = value
    argv = [a.replace("%%", "%") for a in shlex.split(d["ExecStart"][0])]
    log = tmp_path / "worker.log"
    with open(log, "wb") as sink:
        proc = subprocess.Popen(argv, cwd=d["WorkingDirectory"][0].replace("%%", "%"),
                                env=env, stdout=sink, stderr=subprocess.STDOUT)
    try:
        result = tasks.add.enqueue(20, 22)
        wait_for_status(result.id, {"SUCCESSFUL"}, timeout=30, logs=log.read_text)
        assert default_task_backend.get_result(result.id).return_value == 42
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=int(d["TimeoutStopSec"][0])) == 0
        wait_until(lambda: "stopping" in log.read_text() or None, timeout=5,
                   what="the worker to say it stops")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize(("argv", "message"), [
    (["--workdir", "relative/dir"], "must be an absolute path"),
    (["--workdir", "/srv/app\nExecStartPre=/bin/sh"], "is not a path"),
    (["--user", "root\nExecStart=/bin/sh"], "is not a user name"),
    (["--user", "Bad User"], "is not a user name"),
    (["--settings-module", "my settings"], "is not a Python module path"),
    (["--python", "python3"], "must be an absolute path"),
    (["--env-file", "env"], "must be an absolute path"),
    (["--name", "../evil"], "is not a unit name"),
    (["--kind", "cron"], "invalid choice"),
    (["--concurrency", "0"], "must be >= 1"),
    (["--queues", "a b"], "comma-separated list of queue names"),
    (["--kind", "web", "--asgi", "no_colon"], "is not module.path:attribute"),
    (["--kind", "web", "--port", "70000"], "is not a TCP port"),
    (["--kind", "web", "--host", "a b"], "is not a host or address"),
    (["--kind", "web", "--concurrency", "4"], "are for --kind worker"),
    (["--asgi", "tests.asgi:application"], "--asgi is for --kind web"),
    (["--output-dir", "/nonexistent/reproq-units"], "is not a directory"),
], ids=lambda v: repr(v)[:50])
def test_bad_values_are_refused_before_anything_is_written(argv, message):
    with pytest.raises(CommandError, match=message):
        unit(*argv)


def test_without_a_settings_module_it_asks_for_one(monkeypatch):
    monkeypatch.delenv("DJANGO_SETTINGS_MODULE", raising=False)
    with pytest.raises(CommandError, match="give --settings-module"):
        unit()
    assert "DJANGO_SETTINGS_MODULE=other.settings" in unit("--settings-module", "other.settings")
    assert os.environ.get("DJANGO_SETTINGS_MODULE") is None


def test_from_the_command_line_options_do_not_collide_with_djangos_own():
    # manage.py reads --settings itself before any subcommand sees it: ours is --settings-module.
    done = subprocess.run(
        [sys.executable, "-m", "django", "reproq", "systemd", "--kind", "web",
         "--settings-module", "elsewhere.settings"], env=child_env("cli-token"), cwd=REPO_ROOT,
        capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "Environment=DJANGO_SETTINGS_MODULE=elsewhere.settings" in done.stdout
    assert "elsewhere.asgi:application" in done.stdout
