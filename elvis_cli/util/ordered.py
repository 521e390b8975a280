"""Work run ahead in a pool while its results are consumed in order, with bounded memory."""

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future
from typing import TypeVar

T = TypeVar("T")


def in_order(tasks: Iterable[Callable[[], T]], pool: Executor, window: int) -> Iterator[T]:
    """The results of `tasks` in order, each run in `pool` as soon as fewer than `window`
    results (the one being consumed included) are held, so that at most `window` exist."""
    pending: deque[Future[T]] = deque()
    for task in tasks:
        pending.append(pool.submit(task))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()
