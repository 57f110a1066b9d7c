"""Markdown output: one table per workload, then the targets with met / missed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bench.common import Stat, fmt


def cell(stat: Stat, digits: int = 0, unit: str = "") -> str:
    """``median (min-max)`` of the repetitions; one value when there is one repetition."""
    if not stat.values:
        return "n/a"
    med = fmt(stat.median, digits)
    if len(stat.values) == 1 or stat.min != stat.min:
        return f"{med}{unit}"
    return f"{med}{unit} ({fmt(stat.min, digits)}-{fmt(stat.max, digits)})"


@dataclass
class Section:
    title: str
    header: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, *values: Any) -> None:
        self.rows.append([str(v) for v in values])

    def markdown(self) -> str:
        out = [f"### {self.title}", "", "| " + " | ".join(self.header) + " |",
               "|" + "---|" * len(self.header)]
        out += ["| " + " | ".join(r) + " |" for r in self.rows]
        if self.notes:
            out.append("")
            out += [f"- {n}" for n in self.notes]
        return "\n".join(out) + "\n"


@dataclass
class Target:
    workload: str
    target: str
    measured: str
    met: bool | None  # None: could not be judged (missing data)

    @property
    def verdict(self) -> str:
        return {True: "**met**", False: "**missed**", None: "not judged"}[self.met]


def targets_section(targets: list[Target]) -> Section:
    sec = Section("Targets (same machine, same run)", ["workload", "target", "measured",
                                                       "result"])
    for t in targets:
        sec.add(t.workload, t.target, t.measured, t.verdict)
    return sec
