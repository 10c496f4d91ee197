"""How the GPUs of a machine or a Ray cluster go to the K points of a sweep training at once,
checked before anything starts (no torch, Prefect or Ray imported but to count the GPUs).

K dividing the G GPUs gives each point G/K of them; G dividing K puts K/G points on each GPU; any
other K is refused in one line, since some GPUs would then train more points than others.
``$GPTFLOW_SWEEP_GPUS`` lists the GPU ids a sweep's worker processes share instead of those torch
sees: it keeps a sweep off some GPUs, and lets a machine without any show how they would be handed
out (the tests do).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from gptflow.data.errors import UserError

GPUS_VARIABLE = "GPTFLOW_SWEEP_GPUS"
"""GPU ids (as ``CUDA_VISIBLE_DEVICES`` names them) that a sweep's worker processes share."""


class GpuShareError(UserError):
    """``--max-parallel`` neither divides the GPUs nor is a multiple of them."""


@dataclass(frozen=True)
class GpuShare:
    """How ``max_parallel`` points share ``gpus``."""

    gpus: list[str]
    max_parallel: int

    @property
    def per_point(self) -> float:
        """GPUs each point trains on: a fraction where points share one (Ray's ``num_gpus``)."""
        return len(self.gpus) / self.max_parallel

    def worker_devices(self) -> list[str | None]:
        """Each worker's ``CUDA_VISIBLE_DEVICES``; None for every worker without GPUs."""
        count, workers = len(self.gpus), self.max_parallel
        if count == 0:
            return [None] * workers
        if workers <= count:
            each = count // workers
            return [",".join(self.gpus[slot * each:(slot + 1) * each]) for slot in range(workers)]
        return [self.gpus[slot % count] for slot in range(workers)]

    def describe(self) -> str:
        """The share, as the sweep's log line ends: empty without GPUs."""
        count, workers = len(self.gpus), self.max_parallel
        if count == 0:
            return ""
        if workers == count:
            return f", each on one of the {count} GPUs"
        if workers < count:
            each = count // workers
            return f", each on {each} of the {count} GPUs (train.nproc={each} trains a point on all {each})"
        return f", {workers // count} sharing " + ("the GPU" if count == 1 else f"each of the {count} GPUs")


def share_gpus(gpus: list[str], max_parallel: int, where: str) -> GpuShare:
    """The share of ``gpus`` (those of ``where``) among ``max_parallel`` points; ``GpuShareError``
    when neither count divides the other, since some GPUs would then train more points than others."""
    count = len(gpus)
    if count and count % max_parallel and max_parallel % count:
        divisors = [str(k) for k in range(1, count + 1) if count % k == 0]
        listed = ", ".join(divisors[:-1]) + f" or {divisors[-1]}" if len(divisors) > 1 else divisors[0]
        raise GpuShareError(f"--max-parallel {max_parallel} does not divide the {count} GPUs of {where}: use "
                            f"{listed} (each point then trains on {count}/K of them) or a multiple of {count} "
                            f"(K/{count} points then share each GPU)")
    return GpuShare(list(gpus), max_parallel)


def share_machine_gpus(max_parallel: int) -> GpuShare:
    """The share of this machine's GPUs among worker processes training ``max_parallel`` points."""
    return share_gpus(machine_gpus(), max_parallel, "this machine")


def machine_gpus() -> list[str]:
    """The GPUs of this machine that a sweep hands out: ``$GPTFLOW_SWEEP_GPUS``, else those torch
    sees, by the names ``CUDA_VISIBLE_DEVICES`` gives them where it is set."""
    listed = os.environ.get(GPUS_VARIABLE)
    if listed is not None:
        return [gpu.strip() for gpu in listed.split(",") if gpu.strip()]
    import torch

    count = torch.cuda.device_count()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    names = [gpu.strip() for gpu in visible.split(",")] if visible else [str(index) for index in range(count)]
    return names[:count]


