"""Workflows: chains, groups and chords of tasks, kept by PostgreSQL.

    from reproq.workflows import chain, chord, group, step

    chain(step(fetch, url), step(parse), step(store)).enqueue()    # parse(<fetch's result>)
    group(step(resize, 1), step(resize, 2)).enqueue()               # side by side
    chord(group(step(resize, 1), step(resize, 2)), step(notify)).enqueue()  # notify([r1, r2])
    chain(step(a), group(step(b), chain(step(c), step(d))), step(e)).enqueue()  # e([b, d])

Every run of a workflow is written in one transaction (the caller's, when there is one): the
first steps READY, the others WAITING with ``pending_deps`` upstream runs to wait for
(``run_after`` 9999-12-31 until then), and the edges between them (``reproq_run_edges``).
From then on PostgreSQL does the rest: when an upstream run succeeds, a trigger counts it down
on its dependents and makes each one READY once all its upstreams succeeded, putting their
return values first in its arguments (a chain step receives the previous step's value; a
chord's callback receives the list of its group's values, in group order). When an upstream
run ends otherwise (failed after its retries, cancelled, expired, deleted), its waiting
dependents are cancelled, and theirs in turn. Retries of a step happen before that: a step
that fails and is retried keeps its dependents waiting.

Steps skip dedup (each is its own run) and must not carry ``run_after`` except the first ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from django.db import connections, transaction
from django.tasks import Task, task_backends

from .exceptions import InvalidEnqueue
from .results import ReproqTaskResult

MAX_STEPS = 10_000
MAX_EDGES = 100_000
# run_after of a step waiting for its upstream runs: never due by time (the promoter leaves it
# alone), and still a datetime Python can read. The release sets it to the release time.
UNTIL_RELEASED = "9999-12-31 00:00:00+00"


@dataclass(frozen=True)
class Step:
    """One call of a task in a workflow: the task and the arguments it is given (a dependent
    step receives its upstream results before these)."""

    task: Task
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)


def step(task: Task, *args: Any, **kwargs: Any) -> Step:
    if not isinstance(task, Task):
        raise InvalidEnqueue(f"a workflow step needs a @task, got {type(task).__name__}")
    return Step(task, args, kwargs)


def _as_step(value: Any, where: str) -> Step:
    if isinstance(value, Step):
        return value
    if isinstance(value, Task):
        return Step(value)
    raise InvalidEnqueue(f"{where}: expected step(task, ...) or a @task, got "
                         f"{type(value).__name__}")


@dataclass
class WorkflowResult:
    """The runs of an enqueued workflow, in the order its steps were given."""

    results: list[ReproqTaskResult]

    @property
    def ids(self) -> list[str]:
        return [r.id for r in self.results]

    @property
    def last(self) -> ReproqTaskResult:
        """The last step given (a chain's last step, a chord's callback)."""
        return self.results[-1]

    def refresh(self) -> list[ReproqTaskResult]:
        """Read every run again."""
        self.results = [r.task.get_backend().get_result(r.id) for r in self.results]
        return self.results


@dataclass
class Graph:
    """A workflow flattened: its steps, the steps that start it (entries) and end it (exits),
    the edges (upstream, downstream, position) and what each dependent step receives."""

    steps: list[Step]
    entries: list[int]
    exits: list[int]
    edges: list[tuple[int, int, int]] = field(default_factory=list)
    receives: dict[int, str] = field(default_factory=dict)

    def shifted(self, offset: int) -> Graph:
        return Graph(self.steps, [i + offset for i in self.entries],
                     [i + offset for i in self.exits],
                     [(u + offset, d + offset, p) for u, d, p in self.edges],
                     {i + offset: r for i, r in self.receives.items()})


def _graph_of(value: Any, where: str) -> Graph:
    if isinstance(value, _Workflow):
        return value.graph()
    return Graph([_as_step(value, where)], [0], [0])


class _Workflow:
    def graph(self) -> Graph:
        raise NotImplementedError

    @property
    def steps(self) -> list[Step]:
        return self.graph().steps

    def enqueue(self) -> WorkflowResult:
        g = self.graph()
        if len(g.edges) > MAX_EDGES:
            raise InvalidEnqueue(f"a workflow has at most {MAX_EDGES} dependencies, got "
                                 f"{len(g.edges)}")
        return _enqueue(g.steps, g.entries, g.edges, g.receives)

    async def aenqueue(self) -> WorkflowResult:
        """`enqueue` from async code (through Django's connection, in its sync thread)."""
        from asgiref.sync import sync_to_async

        return await sync_to_async(self.enqueue, thread_sensitive=True)()


class chain(_Workflow):
    """Parts one after another (steps, groups, chains). A step after a single step receives its
    return value first; a step after a group receives the list of the group's values."""

    def __init__(self, *parts: Any, pass_results: bool = True) -> None:
        if len(parts) < 1:
            raise InvalidEnqueue("chain() needs at least one step")
        self.parts = [_graph_of(p, f"chain step {i + 1}") for i, p in enumerate(parts)]
        self.pass_results = bool(pass_results)

    def graph(self) -> Graph:
        out = self.parts[0].shifted(0)
        out.steps = list(out.steps)
        for part in self.parts[1:]:
            nxt = part.shifted(len(out.steps))
            what = "result" if len(out.exits) == 1 else "results"
            for entry in nxt.entries:
                out.edges += [(up, entry, pos) for pos, up in enumerate(out.exits)]
                if self.pass_results:
                    out.receives[entry] = what
            out.steps += nxt.steps
            out.edges += nxt.edges
            out.receives.update(nxt.receives)
            out.exits = nxt.exits
        return out


class group(_Workflow):
    """Parts side by side (steps or chains), all started at once."""

    def __init__(self, *parts: Any) -> None:
        if len(parts) < 1:
            raise InvalidEnqueue("group() needs at least one step")
        self.parts = [_graph_of(p, f"group step {i + 1}") for i, p in enumerate(parts)]

    def graph(self) -> Graph:
        out = Graph([], [], [])
        for part in self.parts:
            nxt = part.shifted(len(out.steps))
            out.steps += nxt.steps
            out.entries += nxt.entries
            out.exits += nxt.exits
            out.edges += nxt.edges
            out.receives.update(nxt.receives)
        return out


class chord(chain):
    """A group, then a callback (a step or a chain) once every part of the group succeeded; the
    callback receives the list of their return values (group order) first."""

    def __init__(self, header: group, callback: Any, *, pass_results: bool = True) -> None:
        if not isinstance(header, group):
            raise InvalidEnqueue(f"chord() takes a group() first, got {type(header).__name__}")
        _graph_of(callback, "chord callback")  # the error names the callback
        super().__init__(header, callback, pass_results=pass_results)
        if len(self.parts[0].exits) == 1:
            # A group of one still hands on a list, as every chord does.
            entries = self.parts[1].entries
            self._one_member_entries = [e + len(self.parts[0].steps) for e in entries]
        else:
            self._one_member_entries = []

    def graph(self) -> Graph:
        out = super().graph()
        if self.pass_results:
            for entry in self._one_member_entries:
                out.receives[entry] = "results"
        return out


# One statement after the runs are inserted (same transaction, so no worker saw them yet):
# the edges, and for every run its workflow id, whether it has dependents, and — for dependent
# steps — WAITING with run_after far away (UNTIL_RELEASED), its number of upstream runs, what
# it receives, and its sort key turned into the priority offset the release adds its time to.
SETUP = """
WITH input AS (
    SELECT * FROM unnest(%(ids)s::bigint[], %(n)s::int[], %(receives)s::text[],
                         %(upstream)s::bool[]) AS u(id, n, receives, upstream)
), edges AS (
    INSERT INTO reproq_run_edges (upstream_id, downstream_id, position)
    SELECT * FROM unnest(%(e_up)s::bigint[], %(e_down)s::bigint[], %(e_pos)s::int[])
    RETURNING 1
), runs AS (
    UPDATE reproq_task_runs t SET
        workflow_id = %(workflow)s,
        has_dependents = u.upstream,
        pending_deps = u.n,
        receives = u.receives,
        status = CASE WHEN u.n > 0 THEN 'WAITING' ELSE t.status END,
        sort_key = CASE WHEN u.n > 0
                        THEN t.sort_key - (extract(epoch FROM t.run_after) * 1000000)::bigint
                        ELSE t.sort_key END,
        run_after = CASE WHEN u.n > 0 THEN %(never)s::timestamptz ELSE t.run_after END,
        status_reason = CASE WHEN u.n > 0 THEN 'waiting for ' || u.n || ' upstream run(s)'
                             ELSE t.status_reason END
    FROM input u
    WHERE t.id = u.id AND t.status IN ('READY', 'WAITING')
    RETURNING t.id
)
SELECT (SELECT count(*) FROM runs) AS runs, (SELECT count(*) FROM edges) AS edges
"""


def _enqueue(steps: Sequence[Step], heads: list[int], edges: list[tuple[int, int, int]],
             receives: dict[int, str]) -> WorkflowResult:
    if len(steps) > MAX_STEPS:
        raise InvalidEnqueue(f"a workflow has at most {MAX_STEPS} steps, got {len(steps)}")
    aliases = {s.task.backend for s in steps}
    if len(aliases) != 1:
        raise InvalidEnqueue(f"all steps of a workflow use one backend, got {sorted(aliases)}")
    backend = task_backends[aliases.pop()]
    if not hasattr(backend, "prepare_all"):
        raise InvalidEnqueue(f"workflows need reproq's backend, not {type(backend).__name__}")
    calls = [(s.task, s.args, dict(s.kwargs)) for s in steps]
    specs = [replace(spec, spec_hash=None) for spec in backend.prepare_all(calls)]  # no dedup
    head_set = set(heads)
    late = [i + 1 for i, spec in enumerate(specs)
            if i not in head_set and (spec.run_after is not None or spec.delay is not None)]
    if late:
        raise InvalidEnqueue(f"run_after applies to the first steps of a workflow only (steps "
                             f"{', '.join(map(str, late))} start when their upstream succeed)")
    n_up: dict[int, int] = {}
    for _, down, _ in edges:
        n_up[down] = n_up.get(down, 0) + 1
    upstream = {u for u, _, _ in edges}
    with transaction.atomic(using=backend.database):
        results = backend._enqueue_batch_sync(specs)
        ids = [int(r.id) for r in results]
        params = {
            "ids": ids, "n": [n_up.get(i, 0) for i in range(len(ids))],
            "receives": [receives.get(i, "") for i in range(len(ids))],
            "upstream": [i in upstream for i in range(len(ids))],
            "e_up": [ids[u] for u, _, _ in edges], "e_down": [ids[d] for _, d, _ in edges],
            "e_pos": [p for _, _, p in edges], "workflow": ids[0], "never": UNTIL_RELEASED,
        }
        with connections[backend.database].cursor() as cursor:
            cursor.execute(SETUP, params)
            runs, linked = cursor.fetchone()
        if runs != len(ids) or linked != len(edges):
            raise RuntimeError(f"workflow setup wrote {runs} of {len(ids)} runs and {linked} "
                               f"of {len(edges)} edges")
    downs = n_up
    fresh = [backend.get_result(str(i)) for i in ids] if downs else results
    return WorkflowResult(list(fresh))
