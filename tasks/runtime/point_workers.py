"""Where a sweep's points train: worker processes of this machine, or tasks on a Ray cluster, each
point on GPUs of its own, and none of them outliving the sweep.

GPUs (shared as ``tasks.runtime.gpu_share`` says): a worker process gets its share as
``CUDA_VISIBLE_DEVICES``, set as each point starts, over the sweep's environment that Prefect
gives every task; a Ray task asks for ``num_gpus`` and Ray sets ``CUDA_VISIBLE_DEVICES``.

Stopping: SIGTERM or Ctrl-C in the sweep (raised in its main thread) stops every point at once: a
worker process gets SIGTERM, a Ray task is cancelled (a KeyboardInterrupt in it); either way the
point's flow ends its runs KILLED. What still runs ``STOP_GRACE_S`` later is killed. Workers sit in a
process group of their own, so a terminal's Ctrl-C reaches the sweep alone, which stops them in
that order. A sweep killed outright (SIGKILL) takes its workers along: the kernel sends each one
SIGTERM when the sweep's process ends (``PR_SET_PDEATHSIG``, Linux), and a thread of each worker
that sees it re-parented ends the process ``STOP_GRACE_S`` later, so no worker keeps training or
waits forever on the sweep's pipe holding the workspace open. Ray ends the tasks of a driver that
died itself; their runs are marked KILLED by the next run on that machine
(``tasks.tracking.killed_runs``).
"""

from __future__ import annotations

import abc
import contextlib
import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

from prefect.futures import PrefectFuture
from prefect.settings import PREFECT_API_URL, get_current_settings
from prefect.task_runners import ProcessPoolTaskRunner

from gptflow.tasks.runtime.gpu_share import GpuShare, share_gpus

GPUS_TAG = "gptflow.cuda_visible_devices"
"""The tag of a run's ``CUDA_VISIBLE_DEVICES``: the GPUs that trained it (each sweep point its own)."""
STOP_GRACE_S = 20.0
"""How long a stopped point has to end its runs before its process is killed."""
PARENT_POLL_S = 0.5
PR_SET_PDEATHSIG = 1
"""prctl(2)'s option: the signal a process gets when the thread that started it ends."""


class PointRunner(abc.ABC):
    """The task runner the points run on, the torch threads each takes (None: Ray's share), where
    that is (for the log), and how to stop every point."""

    def __init__(self, runner: Any, torch_threads: int | None, where: str):
        self.runner, self.torch_threads, self.where = runner, torch_threads, where

    def submit(self, task: Any, parameters: dict[str, Any]) -> PrefectFuture:
        return self.runner.submit(task, parameters)

    @abc.abstractmethod
    def stop(self) -> None:
        """End every point now: each ends its runs KILLED, or is killed ``STOP_GRACE_S`` later."""


class _WorkerProcesses(PointRunner):
    def __init__(self, runner: ProcessPoolTaskRunner, torch_threads: int, where: str, pids: Any):
        super().__init__(runner, torch_threads, where)
        self.pids = pids
        """The workers' process ids, each written by the worker as it starts (0: not started)."""

    def stop(self) -> None:
        """SIGTERM to every worker; SIGKILL to those alive ``STOP_GRACE_S`` later."""
        # A worker may end in the middle of a write to the queue that forwards its logs here: Prefect
        # sends its SIGTERM again, to the default handler, once the point's flow has ended, and a
        # SIGKILL lands anywhere. The queue's lock then stays held, and this process, which joins its
        # own writer to that queue as it exits, would wait forever: it no longer waits for that writer.
        forwarded_messages = getattr(self.runner, "_subprocess_message_queue", None)
        if forwarded_messages is not None:
            forwarded_messages.cancel_join_thread()
        workers = {pid for pid in self.pids if pid}
        _signal(workers, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        while (alive := _living_children(workers)) and time.monotonic() < deadline:
            time.sleep(0.1)
        _signal(alive, signal.SIGKILL)


class _RayTasks(PointRunner):
    def __init__(self, runner: Any, where: str):
        super().__init__(runner, None, where)
        self.submitted: list[PrefectFuture] = []

    def submit(self, task: Any, parameters: dict[str, Any]) -> PrefectFuture:
        future = super().submit(task, parameters)
        self.submitted.append(future)
        return future

    def stop(self) -> None:
        """Cancel every point's task (a KeyboardInterrupt in it); force those still running
        ``STOP_GRACE_S`` later (Ray kills their worker)."""
        import ray

        references = [future.wrapped_future for future in self.submitted]
        if not references:
            return
        _, running = ray.wait(references, num_returns=len(references), timeout=0)
        for reference in running:
            ray.cancel(reference)
        _, running = ray.wait(running, num_returns=len(running), timeout=STOP_GRACE_S)
        for reference in running:
            ray.cancel(reference, force=True)


@contextlib.contextmanager
def point_runner(max_parallel: int, ray_address: str | None, machine_share: GpuShare | None) -> Iterator[PointRunner]:
    """Run points, ``max_parallel`` at once, in worker processes here, sharing GPUs as
    ``machine_share`` says, or on the Ray cluster at ``ray_address`` (``GpuShareError`` if
    ``max_parallel`` does not fit its GPUs); whatever leaves the block early (SIGTERM, Ctrl-C, an
    error) stops every point first."""
    with _started_runner(max_parallel, ray_address, machine_share) as points:
        try:
            yield points
        except BaseException:
            points.stop()
            raise


@contextlib.contextmanager
def _started_runner(max_parallel: int, ray_address: str | None, share: GpuShare | None) -> Iterator[PointRunner]:
    if ray_address is None:
        context = multiprocessing.get_context("spawn")  # Prefect's workers are spawned
        next_slot, pids = context.Value("i", 0), context.Array("i", max_parallel)
        initargs = (os.getpid(), next_slot, pids, share.worker_devices())
        with ProcessPoolTaskRunner(max_workers=max_parallel, initializer=start_worker, initargs=initargs) as runner:
            torch_threads = max(1, (os.cpu_count() or 1) // max_parallel)
            yield _WorkerProcesses(runner, torch_threads, "in worker processes here" + share.describe(), pids)
        return
    import ray
    from prefect_ray import RayTaskRunner  # an optional extra: imported only when asked for
    from prefect_ray.context import remote_options

    # Ray's workers were not started from this process: they get the Prefect API and the MLflow
    # settings in their environment (a run's threads outside Prefect's context read only that).
    variables = {name: value for name, value in os.environ.items() if name.startswith("MLFLOW_")}
    variables[PREFECT_API_URL.name] = get_current_settings().api.url
    on_sigterm = signal.getsignal(signal.SIGTERM)
    with RayTaskRunner(address=ray_address, init_kwargs={"runtime_env": {"env_vars": variables}}) as runner:
        if threading.current_thread() is threading.main_thread():
            # ray.init's handler exits the process (SystemExit): the flow's own says it was SIGTERM.
            signal.signal(signal.SIGTERM, on_sigterm)
        gpus = int(ray.cluster_resources().get("GPU", 0))
        share = share_gpus([str(index) for index in range(gpus)], max_parallel, f"the Ray cluster at {ray_address}")
        with remote_options(num_gpus=share.per_point) if gpus else contextlib.nullcontext():
            yield _RayTasks(runner, f"on the Ray cluster at {ray_address}" + share.describe())


def _signal(workers: set[int], signal_number: int) -> None:
    """Signal each worker's process group: the worker and what it started (torchrun and its ranks)."""
    for pid in workers:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal_number)


def _living_children(pids: set[int]) -> set[int]:
    """Those of ``pids`` still running (``active_children`` also reaps the ones that ended)."""
    return pids & {child.pid for child in multiprocessing.active_children()}


_worker_devices: str | None = None
"""In a worker process: its ``CUDA_VISIBLE_DEVICES`` (None: left as it is)."""


def start_worker(sweep_pid: int, next_slot: Any, pids: Any, devices: list[str | None]) -> None:
    """A worker process's initializer: it takes the next slot (its GPUs), notes its process id for
    the sweep, leaves the terminal's process group, and ends when the sweep does."""
    global _worker_devices
    os.setpgid(0, 0)
    with next_slot.get_lock():
        slot = next_slot.value
        next_slot.value += 1
    pids[slot] = os.getpid()
    _worker_devices = devices[slot]
    kernel_signals = _sigterm_on_parent_death()
    if os.getppid() != sweep_pid:  # the sweep ended before the kernel was asked
        os.kill(os.getpid(), signal.SIGTERM)
    threading.Thread(target=_end_after_sweep, args=(sweep_pid, kernel_signals), daemon=True,
                     name="gptflow-sweep-watchdog").start()


def use_worker_devices() -> None:
    """At the start of each point in a worker process: its GPUs, over the sweep's environment that
    Prefect gave the task."""
    if _worker_devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = _worker_devices


def _sigterm_on_parent_death() -> bool:
    """Ask Linux for SIGTERM when the sweep's process ends; False where it cannot be asked. (Linux
    signals when the thread that started the worker ends: one of the task runner's submitting
    threads, which live as long as the runner.)"""
    if not sys.platform.startswith("linux"):
        return False
    return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM) == 0


def _end_after_sweep(sweep_pid: int, kernel_signals: bool) -> None:
    """Once this worker is re-parented (the sweep is gone): stop its point, as the kernel does
    where it was asked, then end the process, whatever it is doing (the sweep's pipe never answers)."""
    while os.getppid() == sweep_pid:
        time.sleep(PARENT_POLL_S)
    if not kernel_signals:
        os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(STOP_GRACE_S)
    os._exit(1)
