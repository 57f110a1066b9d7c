"""Fuzz: every ``manage.py reproq <subcommand>`` argument parser, in-process. Arbitrary argv
gives a clean usage error (CommandError, or SystemExit 0/2 from --help or argparse) or a normal
result, never a traceback - first the parsers alone (every subcommand), then whole commands on
the test database (every subcommand that ends by itself)."""

from __future__ import annotations

import argparse
import contextlib
import io
from typing import Any

import pytest
from django.core.management import CommandError, call_command
from hypothesis import event, given, settings
from hypothesis import strategies as st

from reproq.cli import SUBCOMMANDS, argtypes
from reproq.management.commands.reproq import Command
from tests.fuzz.strategies import batches, bounded, integers_text, text

# Lone surrogates reach sys.argv from bytes that are not UTF-8 (surrogateescape).
ARGV_TEXT = st.one_of(text(max_size=30), st.sampled_from(["\udcff", "a\udc80b", "\udce9t\udce9"]))
DURATIONS = st.one_of(
    st.builds(lambda n, u: f"{n}{u}", st.one_of(st.integers(min_value=-5, max_value=10**6),
                                                st.floats(allow_nan=True, allow_infinity=True),
                                                st.sampled_from(["1e300", "1e308", "9" * 400,
                                                                 "0x1", "1_0", "\u0661"])),
              st.sampled_from(["", "s", "m", "h", "d", "w", "S", "W", "y", " d", "ms"])),
    integers_text())
RUN_IDS = st.one_of(st.integers(min_value=1, max_value=2**63).map(str), integers_text())
NESTED = {"limit": ["set", "ls", "rm"]}


def parser() -> argparse.ArgumentParser:
    """``manage.py reproq`` as call_command builds it (errors raise CommandError)."""
    return Command().create_parser("manage.py", "reproq")


def subparsers(root: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in root._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("no subcommands")


def value_for(action: argparse.Action) -> Any:
    if action.choices:
        return st.one_of(st.sampled_from(sorted(map(str, action.choices))), ARGV_TEXT)
    kind = action.type
    if kind in (argtypes.positive_int,) or getattr(kind, "__name__", "") in {"_port"}:
        return integers_text()
    if kind is argtypes.run_id:
        return RUN_IDS
    if kind is argtypes.duration_seconds:
        return DURATIONS
    if kind is argtypes.queue_name or action.dest in {"queues", "queue", "process_queues"}:
        return st.one_of(st.sampled_from(["default", "emails", "default,emails", ",", "a" * 65]),
                         ARGV_TEXT)
    if getattr(kind, "__name__", "") == "_positive_float":
        return st.one_of(integers_text(), DURATIONS)
    return st.one_of(ARGV_TEXT, integers_text(), st.sampled_from(["/tmp/x", "/", "x:y", "a.b"]))


def options(sub: argparse.ArgumentParser) -> tuple[list[str], list[tuple[str, Any]], list[Any]]:
    """(flags, (option, value strategy), positional value strategies) of one parser, nested
    subcommands (limit set/ls/rm) included."""
    flags: list[str] = []
    valued: list[tuple[str, Any]] = []
    positional: list[Any] = []
    for action in sub._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                f, v, p = options(child)
                flags += f
                valued += v
                positional += p
            continue
        if not action.option_strings:
            positional.append(value_for(action))
        elif action.nargs == 0:
            flags += action.option_strings
        else:
            valued += [(opt, value_for(action)) for opt in action.option_strings]
    return flags, valued, positional


def argv_for(name: str, sub: argparse.ArgumentParser) -> Any:
    flags, valued, positional = options(sub)
    token = st.one_of(
        st.sampled_from(flags or ["--no-such-flag"]).map(lambda f: [f]),
        st.sampled_from(valued).flatmap(lambda ov: ov[1].map(lambda v: [ov[0], v]))
        if valued else st.just([]),
        st.sampled_from(valued).flatmap(lambda ov: ov[1].map(lambda v: [f"{ov[0]}={v}"]))
        if valued else st.just([]),
        st.one_of(*positional).map(lambda v: [v]) if positional else st.just([]),
        st.sampled_from(NESTED.get(name, ["--"])).map(lambda v: [v]),
        ARGV_TEXT.map(lambda v: [v]),
        st.sampled_from(["--", "-", "-h", "--help", "--verbosity", "-v", "3", "--settings=x",
                         "--traceback", "--no-color", "--force-color"]).map(lambda v: [v]),
    )
    lead = st.sampled_from(NESTED[name]).map(lambda v: [v]) if name in NESTED else st.just([])
    return st.tuples(lead, st.lists(token, max_size=6)).map(
        lambda parts: [name, *parts[0], *[t for tok in parts[1] for t in tok]])


VALID = {
    "int": ["1", "2", "5", "20", "100", "10000", "65535"],
    "run_id": ["1", "2", "3", "4", "5", "6", "999999"],
    "duration": ["0", "30", "90s", "15m", "12h", "7d", "2w", "1e9"],
    "queue": ["default", "emails", "reports", "other", "default,emails"],
    "text": ["x", "tests.testapp.tasks.add", "global", "queue:default",
             "task:tests.testapp.tasks.add", "/tmp", "127.0.0.1", "myproj.asgi:application",
             "default"],
}


def plausible(action: argparse.Action) -> Any:
    """Mostly valid values for one option, sometimes any value of its kind."""
    if action.choices:
        valid = sorted(map(str, action.choices))
    elif action.type in (argtypes.positive_int,) or getattr(action.type, "__name__", "") in {
            "_port", "_positive_float"}:
        valid = VALID["int"]
    elif action.type is argtypes.run_id:
        valid = VALID["run_id"]
    elif action.type is argtypes.duration_seconds:
        valid = VALID["duration"]
    elif action.type is argtypes.queue_name or action.dest in {"queues", "queue",
                                                               "process_queues"}:
        valid = VALID["queue"]
    elif action.dest == "database":
        valid = ["default"]
    else:
        valid = VALID["text"]
    return st.integers(min_value=0, max_value=5).flatmap(
        lambda i: st.sampled_from(valid) if i else value_for(action))


@st.composite
def wellformed(draw: Any, sub: argparse.ArgumentParser) -> list[str]:
    """An argv a careful operator could type: each option at most once, required ones always,
    values mostly of the right kind."""
    argv: list[str] = []
    for action in sub._actions:
        if isinstance(action, argparse._HelpAction | argparse._VersionAction) or action.dest in {
                "settings", "pythonpath", "force_color"}:
            continue
        if isinstance(action, argparse._SubParsersAction):
            name = draw(st.sampled_from(sorted(action.choices)))
            return [*argv, name, *draw(wellformed(action.choices[name]))]
        if not action.option_strings:
            argv.append(draw(plausible(action)))
        elif action.required or draw(st.booleans()):
            opt = draw(st.sampled_from(action.option_strings))
            argv += [opt] if action.nargs == 0 else [opt, draw(plausible(action))]
    return argv


def any_argv(name: str, careful: int = 1) -> Any:
    """Any argv of subcommand `name`; `careful`: weight of the well-formed ones."""
    good = wellformed(SUBS[name]).map(lambda argv: [name, *argv])
    junk = argv_for(name, SUBS[name])
    return st.integers(min_value=0, max_value=careful).flatmap(lambda i: good if i else junk)


SUBS = subparsers(parser())


def usage_error(exc: BaseException) -> bool:
    if isinstance(exc, CommandError):
        return bool(str(exc))
    return isinstance(exc, SystemExit) and exc.code in (0, 2)


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_every_parser_gives_a_usage_error_or_options_for_any_argv(name):
    root = parser()

    @settings(max_examples=max(100, settings.default.max_examples // 4))
    @given(any_argv(name))
    def check(argv):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                namespace = root.parse_args(argv)
            except (CommandError, SystemExit) as exc:
                assert usage_error(exc), repr(exc)
                return
        assert namespace.subcommand == name

    check()


# Subcommands that run until signalled are parsed above, not run here.
LONG_RUNNING = {"worker", "beat"}
RUNNABLE = sorted(set(SUBCOMMANDS) - LONG_RUNNING)


@pytest.fixture
def seeded(tmp_path: Any) -> Any:
    from tests.dashboard_helpers import make_run

    for status in ("READY", "RUNNING", "SUCCESSFUL", "FAILED", "CANCELLED", "EXPIRED"):
        make_run(status)
    return tmp_path


@pytest.mark.django_db(transaction=True)
@settings(max_examples=batches(1))
@given(st.sampled_from(RUNNABLE).flatmap(lambda name: any_argv(name, careful=3)))
def test_every_command_ends_in_a_result_or_a_clean_error_for_any_argv(seeded, argv):
    """The whole command: parser, value types and handler, on the test database (files only
    under a temporary directory)."""
    argv = [seeded.as_posix() if prev == "--output-dir" else a
            for prev, a in zip(["", *argv[:-1]], argv, strict=True)]
    argv = [a for a in argv if not a.startswith("--output-dir=")]
    out, err = io.StringIO(), io.StringIO()
    with bounded(30, f"reproq {argv!r}"), contextlib.redirect_stdout(out), \
            contextlib.redirect_stderr(err):
        try:
            call_command("reproq", *argv, stdout=out, stderr=err)
        except (CommandError, SystemExit) as exc:
            assert usage_error(exc), repr(exc)
            event(f"{argv[0]}: {type(exc).__name__} {str(exc)[:40]!a}")
        else:
            event(f"{argv[0]}: ran")
