"""The Ray cluster a run's data units go to (``--ray``), checked without importing Ray or Prefect,
so that a wrong address is refused in a moment, before anything starts."""

from __future__ import annotations

import importlib.util
import os
import socket
from pathlib import Path

from gptflow.data.errors import UserError

RAY_ADDRESS_ENV = "GPTFLOW_RAY_ADDRESS"
RAY_CONNECT_TIMEOUT_S = 5.0
RAY_CURRENT_CLUSTER = Path("/tmp/ray/ray_current_cluster")
"""Where ``ray start`` notes the cluster this machine belongs to (what ``auto`` joins)."""


class RayAddressError(UserError):
    """``--ray`` names no Ray cluster that answers, or Ray is not installed."""


def resolve_ray_address(setting: str | None) -> str | None:
    """``setting``, else ``$GPTFLOW_RAY_ADDRESS``, else None (no Ray); ``RayAddressError`` unless
    it is ``auto`` on a machine of a cluster, or ``HOST:PORT`` / ``ray://HOST:PORT`` that answers."""
    address = setting or os.environ.get(RAY_ADDRESS_ENV) or None
    if address is None:
        return None
    if importlib.util.find_spec("prefect_ray") is None:
        raise RayAddressError("--ray needs Ray and prefect-ray: pip install 'gptflow[ray]'.")
    if address == "auto":
        if not RAY_CURRENT_CLUSTER.exists():
            raise RayAddressError("--ray auto: this machine belongs to no Ray cluster. Start one (`ray start --head`) "
                                  "or join one (`ray start --address HOST:PORT`), or pass --ray HOST:PORT.")
        return address
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise RayAddressError(f"--ray {address}: expected auto, HOST:PORT (the head node's port, 6379 by default) or "
                              "ray://HOST:PORT (Ray Client, 10001 by default).")
    try:
        socket.create_connection((host, int(port)), timeout=RAY_CONNECT_TIMEOUT_S).close()
    except OSError as error:
        raise RayAddressError(f"--ray {address}: nothing answers there ({error.strerror or error}). Start the cluster "
                              "(`ray start --head` on its head node) or correct the address.") from None
    return address
