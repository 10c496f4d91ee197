"""Where the nodes of a several-machine training meet: torchrun's c10d rendezvous, checked without
importing torch or Prefect, so that a malformed endpoint is refused in a moment.

The node that runs ``gptflow pretrain`` (the head) runs every stage, logs to MLflow and writes the
artifacts; every other node runs ``gptflow train-node`` with the same rendezvous, whose ranks take
the training job from the head through the rendezvous store (``tasks.stages.training_job``). c10d numbers
nodes by host name, not by arrival; the ranks renumber themselves so that the head's first rank
is global rank 0, the one that reports and writes.

The command line turns ``--nnodes N --nproc-per-node M --rdzv-endpoint HOST:PORT`` into a
``Rendezvous`` (``from_flags``: the flags fit together, the host resolves) and sets
``train.nproc`` to N x M: the world size, which fixes the global batch, is part of the training's
key, where its ranks run is not. Every wait is bounded by ``--rdzv-timeout`` (torchrun's
``join_timeout`` and ``read_timeout``): a node that never joins ends torchrun with
``RendezvousTimeoutError``, an endpoint nothing answers with ``RendezvousConnectionError``, and
``failure`` turns either into a one-line ``RendezvousError`` naming the endpoint and the fix. A
rerun whose training is cached never starts the rendezvous, so ``train-node`` on the other nodes
waits out its timeout and says so. The Slurm and Kubernetes examples under ``examples/`` start the
head and the other nodes together (``tests/flows/test_cluster_examples.py`` parses their commands).
"""

from __future__ import annotations

import socket
import sys
from dataclasses import dataclass

from gptflow.data.errors import UserError

RENDEZVOUS_ID = "gptflow"
"""One training per rendezvous endpoint: the nodes of a run agree on it without being told."""
DEFAULT_TIMEOUT_S = 900.0
"""How long a node waits for the others to join, and for the rendezvous store to answer."""


class RendezvousError(UserError):
    """Flags of a several-machine training that cannot work together, or nodes that never met."""


@dataclass(frozen=True)
class Rendezvous:
    endpoint: str
    """``HOST:PORT`` of the c10d rendezvous store; ``HOST`` is one of the nodes (the head, by
    convention), which serves the store on ``PORT``."""
    nnodes: int
    nproc_per_node: int
    timeout_s: float = DEFAULT_TIMEOUT_S

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node

    @classmethod
    def from_flags(
        cls, nnodes: int | None, nproc_per_node: int | None, endpoint: str | None, timeout_s: float | None
    ) -> Rendezvous | None:
        """The rendezvous the command-line flags describe; None for a one-machine run (no
        ``--nnodes``, or 1); ``RendezvousError`` for flags that do not fit together."""
        if nnodes is None:
            if endpoint is not None:
                raise RendezvousError(f"--rdzv-endpoint {endpoint} joins several machines: give --nnodes N too, "
                                      "the number of machines.")
            return None
        if nnodes < 1:
            raise RendezvousError(f"--nnodes must be at least 1, got {nnodes}.")
        if endpoint is None:
            raise RendezvousError(f"--nnodes {nnodes} needs --rdzv-endpoint HOST:PORT, where the machines meet: a "
                                  "port of the head node that every node reaches, e.g. --rdzv-endpoint node0:29500.")
        if nproc_per_node is not None and nproc_per_node < 1:
            raise RendezvousError(f"--nproc-per-node must be at least 1, got {nproc_per_node}.")
        if nnodes == 1:
            return None
        timeout_s = DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s
        if timeout_s <= 0:
            raise RendezvousError(f"--rdzv-timeout must be a positive number of seconds, got {timeout_s:g}.")
        _check_endpoint(endpoint)
        return cls(endpoint, nnodes, nproc_per_node or 1, timeout_s)

    def torchrun_command(self) -> list[str]:
        """``python -m torch.distributed.run`` joining this rendezvous; the entry point follows."""
        # read_timeout bounds each wait on the store, so a node whose endpoint nothing answers
        # fails within the timeout too, instead of retrying forever.
        seconds = int(self.timeout_s)
        return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={self.nnodes}",
                f"--nproc-per-node={self.nproc_per_node}", "--rdzv-backend=c10d", f"--rdzv-endpoint={self.endpoint}",
                f"--rdzv-id={RENDEZVOUS_ID}", f"--rdzv-conf=join_timeout={seconds},read_timeout={seconds}",
                "--max-restarts=0"]

    def failure(self, output: str, exit_code: int) -> RendezvousError | None:
        """The one-line error for a torchrun whose nodes never met (its ``output``), else None."""
        if "RendezvousTimeoutError" in output:
            return RendezvousError(
                f"the {self.nnodes} nodes did not all join the rendezvous at {self.endpoint} within "
                f"{self.timeout_s:g} s (torchrun exit code {exit_code}): start `gptflow train-node` with the same "
                "--nnodes, --nproc-per-node and --rdzv-endpoint on each other node, or raise --rdzv-timeout.")
        if "RendezvousConnectionError" in output or "RendezvousStoreError" in output:
            return RendezvousError(
                f"nothing answered at the rendezvous endpoint {self.endpoint} within {self.timeout_s:g} s (torchrun "
                f"exit code {exit_code}): start `gptflow pretrain ... --rdzv-endpoint {self.endpoint}` on the head "
                "node (a head whose training is cached starts none), check that this node reaches that host and port, "
                "or raise --rdzv-timeout.")
        return None


def _check_endpoint(endpoint: str) -> None:
    host, _, port = endpoint.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise RendezvousError(f"--rdzv-endpoint {endpoint}: expected HOST:PORT, e.g. node0:29500.")
    try:
        socket.getaddrinfo(host, int(port))
    except OSError:
        raise RendezvousError(f"--rdzv-endpoint {endpoint}: the host {host} has no address this machine can "
                              "resolve; correct the name or give its IP address.") from None
