"""Ray clusters for the commands that spread their work (`--ray`): joining or starting one,
and running a list of tasks on it, one per GPU when the cluster has GPUs, else a set number of
CPU workers side by side. A task whose worker dies is done again (Ray's `max_retries`).

Ray is an optional dependency (`elvis-cli[ray]`), imported only here and only when asked for.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from types import ModuleType
from typing import Any, TypeVar

from elvis_cli.util.download import reachable
from elvis_cli.util.errors import ElvisError, InputError

RETRIES = 3  # times a task whose worker died is done again before the run fails
LOCAL = "local"
T = TypeVar("T")


@dataclass(frozen=True)
class RayExecutor:
    """Run a command's tasks on Ray. `address`: `local` starts a cluster in this process
    (stopped afterwards), `auto` or host:port joins a running one (`ray start --head`).
    `workers`: CPU workers side by side when the cluster has no GPUs (None: one per CPU);
    with GPUs, one task per GPU."""

    address: str = LOCAL
    workers: int | None = None

    def __post_init__(self) -> None:
        if self.workers is not None and self.workers <= 0:
            raise InputError(f"--ray-workers must be at least 1, got {self.workers}")
        if not self.address:
            raise InputError("--ray takes local, auto or HOST:PORT")


def import_ray() -> ModuleType:
    """Ray, or the error that says how to install it."""
    try:
        import ray
    except ImportError:
        raise InputError("--ray needs Ray, which is not installed: pip install "
                         "'elvis-cli[ray]'") from None
    return ray


@contextmanager
def ray_cluster(executor: RayExecutor) -> Iterator[ModuleType]:
    """Ray, connected as `executor` says; a cluster started here is stopped on leaving, one
    this process had already joined is left as it was."""
    ray = import_ray()
    started_here = not ray.is_initialized()
    if started_here:
        _connect(ray, executor)
    try:
        yield ray
    finally:
        if started_here:
            ray.shutdown()


def check_cluster(executor: RayExecutor) -> None:
    """Refuse now, before any work is planned or written, a `--ray` that cannot run: Ray not
    installed, or a HOST:PORT where nothing answers (Ray itself would retry it for minutes)."""
    import_ray()
    _check_address(executor)


def _check_address(executor: RayExecutor) -> None:
    if executor.address not in (LOCAL, "auto") and not reachable(f"tcp://{executor.address}"):
        raise _no_cluster(executor, "nothing answers there")


def _no_cluster(executor: RayExecutor, reason: object) -> InputError:
    return InputError(f"--ray {executor.address}: no Ray cluster there ({reason}); start one "
                      "with `ray start --head`, or use --ray local")


def _connect(ray: ModuleType, executor: RayExecutor) -> None:
    options = {"include_dashboard": False, "log_to_driver": False}
    if executor.address == LOCAL:
        ray.init(num_cpus=executor.workers, **options)
        return
    _check_address(executor)  # again: it may have gone quiet since the command began
    try:
        ray.init(address=executor.address, **options)
    except ConnectionError as error:
        raise _no_cluster(executor, error) from None


def run_tasks(ray: ModuleType, executor: RayExecutor, function: Callable[..., Any],
              shared: Sequence[Any], items: Sequence[T], done: Callable[[T, Any], None]
              ) -> None:
    """`function(*shared, item)` for every item as Ray tasks, one per GPU or CPU worker at a
    time; `done(item, result)` hears each as it finishes, in the order they finish. `shared`
    goes into the object store once. An ElvisError raised by a task is raised here as it is."""
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    slots = gpus or executor.workers or int(resources.get("CPU", 1))
    task = ray.remote(function).options(num_cpus=1, num_gpus=1 if gpus else 0,
                                        max_retries=RETRIES)
    stored = [ray.put(value) for value in shared]
    waiting, running = list(items), {}
    while waiting or running:
        while waiting and len(running) < slots:
            item = waiting.pop(0)
            running[task.remote(*stored, item)] = item
        [finished], _ = ray.wait(list(running), num_returns=1)
        item = running.pop(finished)
        try:
            result = ray.get(finished)
        except ray.exceptions.RayTaskError as error:
            if isinstance(error.cause, ElvisError):
                raise error.cause from None
            raise
        done(item, result)
