"""Compile-only NVIDIA GPUs: XLA's ``GpuTargetConfigProto`` for each GPU longctx targets.

XLA compiles for a GPU it cannot see when given that GPU's description (a
``GpuTargetConfigProto`` in protobuf text form; :func:`longctx.targets.devices` passes it) through
``jax.experimental.topologies.get_topology_desc(platform="cuda", target_config=TEXT,
topology="SLICESxHOSTSxGPUS")``; it needs the CUDA plugin (``pip install -e '.[gpu]'``,
``jax[cuda12]`` of the pinned jax) but no GPU. Triton / Pallas kernels are compiled
to real ``sm_90a`` code and ``memory_analysis()`` is the GPU's.

The descriptions below are written from the devices' published properties (NVIDIA's
CUDA C++ Programming Guide, "Compute capabilities" table, and each GPU's datasheet):
SM count, shared memory per SM / per block (opt-in), registers, L2, memory size and
bandwidth, clocks. Fields XLA uses only for its cost model get their published value;
the jax 0.10 proto has no ``collective_memory_granularity`` field.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class GpuSpec:
    name: str  # device_description_str: what CUDA calls the card
    major: int  # compute capability
    minor: int
    sms: int
    memory_bytes: int
    memory_bandwidth: float  # bytes/s
    l2_bytes: int
    clock_ghz: float  # boost clock
    shared_per_sm: int  # bytes
    shared_per_block_optin: int


# Hopper (sm_90): 228 KB shared memory per SM, 227 KB per block opt-in (CUDA guide, table
# "Technical specifications per compute capability"); Ampere sm_80: 164 KB / 163 KB.
SPECS = {
    "h100": GpuSpec("NVIDIA H100 80GB HBM3", 9, 0, 132, 81559 * 2**20, 3.35e12, 50 * 2**20,
                    1.98, 228 * 1024, 227 * 1024),
    "h200": GpuSpec("NVIDIA H200", 9, 0, 132, 143771 * 2**20, 4.8e12, 50 * 2**20,
                    1.98, 228 * 1024, 227 * 1024),
    "a100": GpuSpec("NVIDIA A100-SXM4-80GB", 8, 0, 108, 81920 * 2**20, 2.04e12, 40 * 2**20,
                    1.41, 164 * 1024, 163 * 1024),
}


def target_config(chip: str) -> str:
    """``GpuTargetConfigProto`` text of ``chip`` (``h100``, ``h200``, ``a100``)."""
    s = SPECS[chip]
    fields = {
        "threads_per_block_limit": 1024, "threads_per_warp": 32,
        "shared_memory_per_block": 48 * 1024, "shared_memory_per_core": s.shared_per_sm,
        "threads_per_core_limit": 2048, "core_count": s.sms, "fpus_per_core": 128,
        "block_dim_limit_x": 2**31 - 1, "block_dim_limit_y": 65535, "block_dim_limit_z": 65535,
        "memory_bandwidth": int(s.memory_bandwidth), "l2_cache_size": s.l2_bytes,
        "clock_rate_ghz": s.clock_ghz, "device_memory_size": s.memory_bytes,
        "shared_memory_per_block_optin": s.shared_per_block_optin,
        "registers_per_core_limit": 65536, "registers_per_block_limit": 65536,
    }
    info = "\n".join(f"  {k}: {v}" for k, v in fields.items())
    cc = f"  cuda_compute_capability {{\n    major: {s.major}\n    minor: {s.minor}\n  }}"
    return (f"gpu_device_info {{\n{info}\n{cc}\n  name: \"{s.name}\"\n}}\n"
            f"platform_name: \"CUDA\"\n"
            f"dnn_version_info {{\n  major: 9\n  minor: 8\n  patch: 0\n}}\n"
            f"device_description_str: \"{s.name}\"\n")
