"""Progress as events: long library calls report how far they are, and only the CLI draws it.

A call that takes a `progress` callback announces each task once with `done` 0, then reports
every unit finished; no callback (None) means silence. The library never prints a bar itself,
so notebooks, scripts and tests get no terminal output they did not ask for.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class TaskProgress:
    """`done` of `total` units of one task (images extracted, views rendered, steps taken)."""

    task: str  # a short label, e.g. "extracting" or "round 1 steps"
    done: int
    total: int  # 0: not known in advance
    detail: str = ""  # what the task is doing now, e.g. the stage of an evaluation
    # measured by the task itself where its units differ in cost (re-ranking: queries of
    # other shortlist lengths, blocks kept from an earlier run); None: not measured
    pairs_per_second: float | None = None
    eta_seconds: float | None = None  # time left at that rate


ProgressCallback = Callable[[TaskProgress], None]


def track(progress: ProgressCallback | None, task: str, total: int, detail: str = ""
          ) -> Callable[[], None]:
    """Announce `task` (0 of `total` done) and return the call that reports one more unit.

    A falsy `progress` (None, or False as older callers pass it) reports nothing.
    """
    if not progress:
        return lambda: None
    report = progress
    report(TaskProgress(task, 0, total, detail))
    done = 0

    def advance() -> None:
        nonlocal done
        done += 1
        report(TaskProgress(task, done, total, detail))

    return advance


def with_detail(progress: ProgressCallback | None, detail: str) -> ProgressCallback | None:
    """`progress` with `detail` set on each task's events: a caller names what a library call
    it makes is working on (which dataset's images an extraction reads) without that call
    knowing."""
    if not progress:
        return None
    report = progress
    return lambda event: report(replace(event, detail=detail)
                                if isinstance(event, TaskProgress) else event)
