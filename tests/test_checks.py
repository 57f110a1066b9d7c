"""System checks and settings validation: backend OPTIONS, REPROQ_RUNTIME and REPROQ_* env vars."""

from __future__ import annotations

from datetime import timedelta
from io import StringIO

import pytest
from django.conf import settings
from django.core import checks
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.tasks import task_backends
from django.test import override_settings

from reproq.conf import (
    BackendOptions,
    current_runtime_settings,
    explain_runtime,
    load_runtime_settings,
    parse_backend_options,
)


def tasks_with(options=None, **params):
    """settings.TASKS with the default backend's OPTIONS replaced (and other params changed)."""
    base = dict(settings.TASKS["default"])
    if options is not None:
        base["OPTIONS"] = options
    base.update(params)
    return {"default": base}


def backend_errors(options=None, **params):
    with override_settings(TASKS=tasks_with(options, **params)):
        return task_backends["default"].check()


def run_check():
    """`manage.py check`; returns its output or raises SystemCheckError."""
    out = StringIO()
    call_command("check", stdout=out, stderr=StringIO())
    return out.getvalue()


def only(errors):
    assert len(errors) == 1, errors
    return errors[0]


# --------------------------------------------------------------------------- backend OPTIONS


def test_valid_configuration_has_no_errors():
    assert task_backends["default"].check() == []
    assert "no issues" in run_check()


@pytest.mark.parametrize(
    ("options", "key", "hint"),
    [
        ({"MAX_ATTEMPTS": 0}, "MAX_ATTEMPTS", "write a whole number >= 1, e.g. 3"),
        ({"MAX_ATTEMPTS": True}, "MAX_ATTEMPTS", "write a whole number >= 1"),
        ({"MAX_ATTEMPTS": 2.5}, "MAX_ATTEMPTS", "write a whole number >= 1"),
        ({"TIMEOUT_SECONDS": "x"}, "TIMEOUT_SECONDS", "write a whole number of seconds > 0"),
        ({"TIMEOUT_SECONDS": -5}, "TIMEOUT_SECONDS", "e.g. 900"),
        ({"EXPIRES_IN": 5}, "EXPIRES_IN", "positive datetime.timedelta, e.g. timedelta(hours=1)"),
        ({"EXPIRES_IN": timedelta(0)}, "EXPIRES_IN", "timedelta"),
        ({"DEDUP_ACTIVE": "yes"}, "DEDUP_ACTIVE", "write True or False"),
        ({"RETRY_JITTER": 2}, "RETRY_JITTER", "between 0 and 1"),
        ({"RETRY_BASE_SECONDS": -1}, "RETRY_BASE_SECONDS", ">= 0"),
        ({"RETRY_MAX_SECONDS": 0}, "RETRY_MAX_SECONDS", "> 0"),
        ({"CODE_REF": 123}, "CODE_REF", "string"),
        ({"DATABASE": 5}, "DATABASE", "DATABASES alias"),
    ],
    ids=repr,
)
def test_invalid_option_value_is_an_error_with_a_hint(options, key, hint):
    error = only(backend_errors(options))
    assert isinstance(error, checks.Error)
    assert error.id == "reproq.E001"
    assert f"TASKS[\"default\"][\"OPTIONS\"]['{key}']" in error.msg
    assert repr(next(iter(options.values()))) in error.msg
    assert hint in error.hint


def test_unknown_option_key_is_an_error_listing_the_valid_ones():
    error = only(backend_errors({"MAX_ATTEMPT": 3}))
    assert "'MAX_ATTEMPT'" in error.msg
    assert "is not a reproq option" in error.msg
    assert "MAX_ATTEMPTS" in error.hint
    assert "TIMEOUT_SECONDS" in error.hint


def test_unknown_database_alias_is_an_error():
    error = only(backend_errors({"DATABASE": "replica"}))
    assert "'replica' is not in DATABASES" in error.msg
    assert "DATABASES" in error.hint


def test_options_that_are_not_a_dict_are_an_error():
    error = only(backend_errors(["MAX_ATTEMPTS", 3]))
    assert "must be a dict" in error.msg
    assert '"OPTIONS": {' in error.hint


def test_every_bad_option_is_reported_at_once():
    errors = backend_errors({"MAX_ATTEMPTS": 0, "TIMEOUT_SECONDS": "x", "EXPIRES_IN": 5,
                             "MAX_ATTEMPT": 1})
    assert len(errors) == 4
    text = "\n".join(e.msg for e in errors)
    for key in ("'MAX_ATTEMPTS'", "'TIMEOUT_SECONDS'", "'EXPIRES_IN'", "'MAX_ATTEMPT'"):
        assert key in text
    assert all(e.hint for e in errors)


def test_invalid_queue_names_are_an_error():
    error = only(backend_errors(QUEUES=["default", "bad queue", "x" * 65]))
    assert "QUEUES" in error.msg
    assert "'bad queue'" in error.msg
    assert "letters, digits" in error.hint


def test_good_options_are_applied_and_bad_ones_fall_back_to_defaults():
    opts, problems = parse_backend_options("default", {"MAX_ATTEMPTS": 5, "TIMEOUT_SECONDS": 0})
    assert len(problems) == 1
    assert opts.max_attempts == 5
    assert opts.timeout_seconds == BackendOptions().timeout_seconds
    opts, problems = parse_backend_options("default", {
        "DEDUP_ACTIVE": False, "EXPIRES_IN": timedelta(hours=1), "CODE_REF": "abc"})
    assert problems == []
    assert (opts.dedup_active, opts.expires_in, opts.code_ref) == (
        False, timedelta(hours=1), "abc")
    assert parse_backend_options("default", None) == (BackendOptions(), [])


@pytest.mark.parametrize(
    "options",
    [{"MAX_ATTEMPTS": 0}, {"TIMEOUT_SECONDS": "x"}, {"EXPIRES_IN": 5}, {"MAX_ATTEMPT": 3}],
    ids=repr,
)
def test_manage_py_check_fails_on_bad_options(options):
    with override_settings(TASKS=tasks_with(options)), pytest.raises(SystemCheckError) as exc:
        run_check()
    text = str(exc.value)
    assert "reproq.E001" in text
    assert next(iter(options)) in text
    assert "HINT:" in text


# --------------------------------------------------------------------------- REPROQ_RUNTIME


def runtime(raw=None, environ=None, overrides=None):
    """load_runtime_settings with REPROQ_RUNTIME = raw (defaults when None) and a given env."""
    with override_settings(REPROQ_RUNTIME=raw if raw is not None else {}):
        return load_runtime_settings(overrides, environ=environ or {})


def problem_for(problems, fragment):
    found = [p for p in problems if fragment in p.setting]
    assert len(found) == 1, problems
    return found[0]


def test_default_runtime_settings_are_valid():
    rs, problems = runtime()
    assert problems == []
    assert rs.concurrency == 10
    assert rs.heartbeat_seconds < rs.lease_seconds


def test_test_settings_are_valid():
    rs, problems = load_runtime_settings(environ={})
    assert problems == []
    assert rs.autostart is False
    assert rs.lease_seconds == 5
    assert rs.sources["lease_seconds"] == "settings.REPROQ_RUNTIME"


@pytest.mark.parametrize(
    ("raw", "key", "hint"),
    [
        ({"CONCURRENCY": 0}, "CONCURRENCY", "a whole number >= 1"),
        ({"CONCURRENCY": "10"}, "CONCURRENCY", "a whole number >= 1"),
        ({"CONCURRENCY": True}, "CONCURRENCY", "a whole number >= 1"),
        ({"QUEUES": "default"}, "QUEUES", 'a list of queue names, e.g. ["default", "emails"]'),
        ({"QUEUES": ["ok", "not ok"]}, "QUEUES", "a list of queue names"),
        ({"LEASE_SECONDS": 0}, "LEASE_SECONDS", "a number > 0"),
        ({"PRIORITY_AGING_FACTOR": -1}, "PRIORITY_AGING_FACTOR", "a number >= 0"),
        ({"AUTOSTART": "yes"}, "AUTOSTART", "True or False"),
        ({"WORKER_ID": 5}, "WORKER_ID", "a string"),
        ({"GC_FREEZE": "off"}, "GC_FREEZE", "True or False"),
        ({"FINISHED_RETENTION_SECONDS": -1}, "FINISHED_RETENTION_SECONDS", "a number >= 0"),
        ({"FINISHED_RETENTION_SECONDS": "14d"}, "FINISHED_RETENTION_SECONDS", "a number >= 0"),
    ],
    ids=repr,
)
def test_invalid_runtime_value_is_a_problem_with_a_hint(raw, key, hint):
    _, problems = runtime(raw)
    problem = problem_for(problems, f"['{key}']")
    assert "settings.REPROQ_RUNTIME" in problem.setting
    assert repr(raw[key]) in problem.message
    assert hint in problem.hint
    assert problem.hint.startswith("write ")


def test_unknown_runtime_key_is_a_problem():
    _, problems = runtime({"CONCURRENCYY": 4})
    problem = only(problems)
    assert "'CONCURRENCYY'" in problem.setting
    assert "is not a runtime setting" in problem.message
    assert "CONCURRENCY" in problem.hint
    assert "HEARTBEAT_SECONDS" in problem.hint


@pytest.mark.parametrize(("heartbeat", "lease"), [(60, 60), (90, 60), (10, 5)])
def test_heartbeat_must_be_below_lease(heartbeat, lease):
    _, problems = runtime({"HEARTBEAT_SECONDS": heartbeat, "LEASE_SECONDS": lease})
    problem = only(problems)
    assert "HEARTBEAT_SECONDS" in problem.setting
    assert "LEASE_SECONDS" in problem.message
    assert problem.hint


def test_heartbeat_from_env_is_compared_with_the_lease():
    _, problems = runtime({"LEASE_SECONDS": 30}, environ={"REPROQ_HEARTBEAT_SECONDS": "45"})
    assert "HEARTBEAT_SECONDS" in only(problems).setting


def test_runtime_backend_must_be_a_reproq_backend():
    _, problems = runtime({"BACKEND": "missing"})
    assert "'missing' is not in TASKS" in only(problems).message
    dummy = {**settings.TASKS, "dummy": {"BACKEND": "django.tasks.backends.dummy.DummyBackend"}}
    with override_settings(TASKS=dummy):
        _, problems = runtime({"BACKEND": "dummy"})
    problem = only(problems)
    assert "is not a reproq backend" in problem.message
    assert "reproq.backend.ReproqBackend" in problem.hint


def test_runtime_settings_that_are_not_a_dict_are_a_problem():
    _, problems = runtime(["CONCURRENCY", 4])
    problem = only(problems)
    assert problem.setting == "REPROQ_RUNTIME"
    assert "must be a dict" in problem.message


def test_every_runtime_problem_is_reported_at_once():
    _, problems = runtime({"CONCURRENCY": 0, "QUEUES": "default", "NOPE": 1,
                           "HEARTBEAT_SECONDS": 100})
    settings_named = " ".join(p.setting for p in problems)
    for key in ("CONCURRENCY", "QUEUES", "NOPE", "HEARTBEAT_SECONDS"):
        assert key in settings_named
    assert len(problems) == 4


# --------------------------------------------------------------------------- environment


def test_env_var_wins_over_settings():
    rs, problems = runtime({"CONCURRENCY": 3}, environ={"REPROQ_CONCURRENCY": "7"})
    assert problems == []
    assert rs.concurrency == 7
    assert rs.sources["concurrency"] == "env REPROQ_CONCURRENCY"
    assert ("CONCURRENCY", 7, "env REPROQ_CONCURRENCY") in explain_runtime(rs)


def test_command_line_overrides_win_over_env():
    rs, problems = runtime({"CONCURRENCY": 3}, environ={"REPROQ_CONCURRENCY": "7"},
                           overrides={"concurrency": 12, "queues": None})
    assert problems == []
    assert rs.concurrency == 12
    assert rs.sources["concurrency"] == "command line"
    assert rs.sources["queues"] == "default"


def test_bad_env_var_is_a_problem_naming_the_variable():
    rs, problems = runtime({"CONCURRENCY": 3}, environ={"REPROQ_CONCURRENCY": "many"})
    problem = only(problems)
    assert "REPROQ_CONCURRENCY" in problem.setting
    assert "'many'" in problem.message
    assert "a whole number >= 1" in problem.hint
    assert rs.concurrency == 10  # the invalid value is not used


@pytest.mark.parametrize(
    ("env", "attr", "value"),
    [
        ({"REPROQ_AUTOSTART": "1"}, "autostart", True),
        ({"REPROQ_AUTOSTART": "off"}, "autostart", False),
        ({"REPROQ_LISTEN": "No"}, "listen", False),
        ({"REPROQ_QUEUES": "default, emails ,"}, "queues", ("default", "emails")),
        ({"REPROQ_QUEUES": ""}, "queues", ()),
        ({"REPROQ_LEASE_SECONDS": "90.5"}, "lease_seconds", 90.5),
        ({"REPROQ_PRIORITY_AGING_FACTOR": "0"}, "priority_aging_factor", 0.0),
        ({"REPROQ_WORKER_ID": "web-1"}, "worker_id", "web-1"),
        ({"REPROQ_CONCURRENCY": " 4 "}, "concurrency", 4),
        ({"REPROQ_GC_FREEZE": "0"}, "gc_freeze", False),
        ({"REPROQ_FINISHED_RETENTION_SECONDS": "0"}, "finished_retention_seconds", 0.0),
    ],
    ids=repr,
)
def test_env_values_are_parsed(env, attr, value):
    rs, problems = runtime({}, environ=env)
    assert problems == []
    assert getattr(rs, attr) == value
    assert rs.sources[attr] == f"env {next(iter(env))}"


@pytest.mark.parametrize(
    "env",
    [{"REPROQ_AUTOSTART": "maybe"}, {"REPROQ_LEASE_SECONDS": "soon"},
     {"REPROQ_QUEUES": "ok,not ok"}, {"REPROQ_CONCURRENCY": "2.5"},
     {"REPROQ_CONCURRENCY": "0"}],
    ids=repr,
)
def test_bad_env_values_are_problems(env):
    _, problems = runtime({}, environ=env)
    assert next(iter(env)) in only(problems).setting


def test_unrelated_env_vars_are_ignored():
    rs, problems = runtime({}, environ={"REPROQ_TEST_DB_NAME": "x", "CONCURRENCY": "0"})
    assert problems == []
    assert rs.concurrency == 10


# --------------------------------------------------------------------------- manage.py check


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ({"CONCURRENCY": 0}, "CONCURRENCY"),
        ({"QUEUES": "default"}, "QUEUES"),
        ({"UNKNOWN_THING": 1}, "UNKNOWN_THING"),
        ({"HEARTBEAT_SECONDS": 60, "LEASE_SECONDS": 60}, "HEARTBEAT_SECONDS"),
    ],
    ids=repr,
)
def test_manage_py_check_fails_on_bad_runtime_settings(raw, fragment):
    with override_settings(REPROQ_RUNTIME=raw), pytest.raises(SystemCheckError) as exc:
        run_check()
    text = str(exc.value)
    assert "reproq.E010" in text
    assert fragment in text
    assert "HINT:" in text


def test_manage_py_check_reports_bad_env(monkeypatch):
    monkeypatch.setenv("REPROQ_CONCURRENCY", "many")
    with pytest.raises(SystemCheckError) as exc:
        run_check()
    assert "env REPROQ_CONCURRENCY" in str(exc.value)


def test_runtime_settings_cache_follows_setting_changes():
    with override_settings(REPROQ_RUNTIME={"PRIORITY_AGING_FACTOR": 5}):
        assert current_runtime_settings().priority_aging_factor == 5
    assert current_runtime_settings().priority_aging_factor == 0


# --------------------------------------------------------------------------- access settings


@pytest.mark.parametrize(("name", "value", "message"), [
    ("REPROQ_ALLOWED_CIDRS", ["10.0.0.0/8", "10.0.0.0/33"], "invalid network '10.0.0.0/33'"),
    ("REPROQ_ALLOWED_CIDRS", "10.0.0.0/8, nope", "invalid network 'nope'"),
    ("REPROQ_ALLOWED_CIDRS", 10, "must be a list of networks, got int"),
    ("REPROQ_TRUSTED_PROXIES", ["127.0.0.1", "localhost"], "invalid network 'localhost'"),
    ("REPROQ_AUTH_FAILURE_LIMIT", 0, "0 is not valid"),
    ("REPROQ_AUTH_FAILURE_WINDOW_SECONDS", "60", "'60' is not valid"),
    ("REPROQ_HEALTHZ_PUBLIC", "yes", "'yes' is not True or False"),
])
def test_invalid_access_settings_fail_the_system_check(name, value, message):
    with override_settings(**{name: value}):
        errors = [m for m in checks.run_checks() if m.id == "reproq.E030"]
        assert [e.msg for e in errors] == [f"{name}: {message}"], errors
        with pytest.raises(SystemCheckError, match=r"reproq\.E030"):
            run_check()


def test_access_settings_from_the_environment_are_checked_and_explained(monkeypatch):
    monkeypatch.setenv("REPROQ_TRUSTED_PROXIES", "10.0.0.0/8,unix,10.0.0.0/99")
    errors = [m for m in checks.run_checks() if m.id == "reproq.E030"]
    assert [e.msg for e in errors] == [
        "REPROQ_TRUSTED_PROXIES (from env REPROQ_TRUSTED_PROXIES): invalid network "
        "'10.0.0.0/99'"]
    monkeypatch.setenv("REPROQ_TRUSTED_PROXIES", "10.0.0.0/8,unix")
    monkeypatch.setenv("REPROQ_HEALTHZ_PUBLIC", "on")
    monkeypatch.setenv("REPROQ_API_TOKEN", "short")
    assert [m.id for m in checks.run_checks() if m.id.startswith("reproq.")] == ["reproq.W031"]
    out = StringIO()
    call_command("reproq", "config", "--explain", stdout=out)
    text = out.getvalue()
    assert "short" not in text  # the token is never printed
    lines = {line.split()[0]: line for line in text.splitlines()}
    assert "(set, 5 characters)" in lines["REPROQ_API_TOKEN"]
    assert "['10.0.0.0/8', 'unix']" in lines["REPROQ_TRUSTED_PROXIES"]
    assert "(env REPROQ_TRUSTED_PROXIES)" in lines["REPROQ_TRUSTED_PROXIES"]
    assert "True" in lines["REPROQ_HEALTHZ_PUBLIC"] and "(env " in lines["REPROQ_HEALTHZ_PUBLIC"]
    assert "(default)" in lines["REPROQ_ALLOWED_CIDRS"]
