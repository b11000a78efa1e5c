"""Connecting to Ray: the cluster named by RAY_ADDRESS (as under `ray job submit`), else a fresh local one."""

from __future__ import annotations

import os

import ray


def connect_ray() -> None:
    """Join the cluster in ``RAY_ADDRESS`` or start a local one; do nothing when Ray is already connected.

    Ray's own default (``ray.init()`` with no address) also tries the last cluster started on this
    machine, recorded in ``/tmp/ray/ray_current_cluster``; when that cluster has since stopped, the
    call hangs for minutes on a dead address. Being explicit avoids it: ``ray job submit`` and
    ``ray start`` users set ``RAY_ADDRESS`` (``auto`` joins a running local ``ray start``).
    """
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or "local")
