"""Multi-controller start-up: ``jax.distributed.initialize`` when launched as several processes.

Where the coordinator comes from, in order:

1. ``LONGCTX_COORDINATOR`` (``host:port``), ``LONGCTX_NUM_PROCESSES``,
   ``LONGCTX_PROCESS_ID``: explicit, used by ``launch/local.sh`` and tests;
2. SLURM (``SLURM_NTASKS > 1``): JAX reads the node list and task ids itself;
3. ``LONGCTX_DISTRIBUTED=1`` (set by ``launch/tpu_pod.py`` on every worker) or a
   Cloud TPU environment that names several workers (``TPU_WORKER_HOSTNAMES``
   with commas, as on GKE, or a multi-slice ``MEGASCALE_COORDINATOR_ADDRESS``):
   ``jax.distributed.initialize()`` with no arguments, which finds the
   coordinator through the cluster's own discovery (the TPU metadata server on
   TPU VMs, which do not export those variables themselves).

Otherwise this is a single process and nothing is initialised. On CPU the
cross-process collectives use gloo.
"""

from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger(__name__)

_initialized = False


def maybe_initialize() -> None:
    """Initialise the distributed runtime once, if the environment describes several processes."""
    global _initialized
    if _initialized:
        return
    env = os.environ
    kwargs = None
    if "LONGCTX_COORDINATOR" in env:
        try:
            kwargs = dict(coordinator_address=env["LONGCTX_COORDINATOR"],
                          num_processes=int(env["LONGCTX_NUM_PROCESSES"]),
                          process_id=int(env["LONGCTX_PROCESS_ID"]))
        except KeyError as e:
            raise ValueError(f"LONGCTX_COORDINATOR is set but {e.args[0]} is not; set "
                             "LONGCTX_NUM_PROCESSES and LONGCTX_PROCESS_ID too") from None
    elif int(env.get("SLURM_NTASKS", "1")) > 1:
        kwargs = {}
    elif (env.get("LONGCTX_DISTRIBUTED") == "1" or "," in env.get("TPU_WORKER_HOSTNAMES", "")
          or "MEGASCALE_COORDINATOR_ADDRESS" in env):
        kwargs = {}
    if kwargs is None:
        _initialized = True
        return
    if env.get("JAX_PLATFORMS", "") == "cpu" or kwargs.get("coordinator_address"):
        # CPU processes need a collectives backend for cross-process all-reduce.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)
    _initialized = True
    log.info("jax.distributed: process %d of %d, %d local / %d global devices",
             jax.process_index(), jax.process_count(), jax.local_device_count(),
             jax.device_count())
