"""Items of equal shape batched together, with a cap on how many wait for company."""

from collections.abc import Callable, Hashable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def batches_by_shape(items: Iterable[T], shape_of: Callable[[T], Hashable], batch_size: int,
                     max_pending: int | None = None) -> Iterator[list[T]]:
    """Batches of up to `batch_size` items of one shape, each in arrival order.

    A shape's batch is handed over as soon as it is full. With `max_pending`, once more than
    that many items wait in unfilled batches, the largest of them (the first of those tied) is
    handed over early, which bounds memory when shapes vary. What is left goes at the end, in
    the order the shapes were (re)opened. Items are read lazily: a batch is handed over before
    the next item is read, so the consumer's work on it happens in between.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    groups: dict[Hashable, list[T]] = {}
    pending = 0
    for item in items:
        shape = shape_of(item)
        group = groups.setdefault(shape, [])
        group.append(item)
        pending += 1
        if len(group) >= batch_size:
            pending -= len(group)
            yield groups.pop(shape)
        elif max_pending is not None and pending > max_pending:
            largest = max(groups, key=lambda key: len(groups[key]))
            pending -= len(groups[largest])
            yield groups.pop(largest)
    for shape in list(groups):
        yield groups.pop(shape)
