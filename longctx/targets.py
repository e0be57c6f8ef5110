"""The hardware a computation is compiled for: its platform, and the chips longctx targets.

**The target decides** (DESIGN.md, "Targets"). Every automatic choice in longctx (the
attention kernel, the linear-attention form and its chunks per step, the MoE dispatch,
whether a Pallas kernel can compile) asks :func:`platform`: the platform of the devices
the computation is being compiled for, i.e. the current mesh's devices (``jax.set_mesh``;
inside ``jit`` through the abstract mesh, which carries its devices' platform and kind),
else JAX's default backend. A compile for a TPU made on a CPU machine (compile-only
devices from libtpu) therefore makes exactly the choices a TPU run makes, and
``jax.default_backend()`` of the host never leaks into a program for another chip.

The second half is the table of chips (:data:`CHIPS`) and the names people type for
them (:func:`parse`: Cloud TPU accelerator types ``v5p-8``, GPU hosts ``h100x8``,
``cpu``), used by ``python -m longctx.compile`` and ``experiments.context_sweep
--target``. Each chip's peak and memory come with their source.

This module imports only jax: kernels, backends and the trainer all read it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

import jax

from longctx import gpu_targets

GPU_PLATFORMS = {"cuda": "gpu", "rocm": "gpu", "gpu": "gpu"}


def platform() -> str:
    """``"cpu" | "gpu" | "tpu"``: the platform of the devices being compiled for.

    The current mesh (``jax.set_mesh``) decides when it names devices; otherwise the
    default backend. Safe to call while tracing (it reads the abstract mesh).
    """
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    p = device.platform if device is not None else jax.default_backend()
    return GPU_PLATFORMS.get(p, p)


def device_kind() -> str:
    """``device_kind`` of the devices being compiled for (e.g. ``"TPU v5"``), as :func:`platform`."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    return device.device_kind if device is not None else jax.devices()[0].device_kind


# ----------------------------------------------------------------------------
# Chips
# ----------------------------------------------------------------------------

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator generation, per chip (one JAX device on real hardware)."""

    name: str  # the name in target strings: v5p, h100, ...
    platform: str  # tpu | gpu
    device_kind: str  # as JAX reports it (prefix)
    memory_bytes: int  # per chip, usable by XLA
    peak_flops: float  # dense bf16 FLOP/s per chip
    source: str  # where the two figures come from


# TPU memory: the HBM the compiler reports as available ("exceeds available HBM (95.74G)",
# libtpu 0.0.42.1, compile-only devices); peaks: Google Cloud's TPU system architecture
# pages (bf16 per chip). v4's compile-only topology exposes one device per TensorCore (8
# for v4-8, 15.25 GiB each) where a v4 host shows one per chip (megacore): compiles divide
# a chip's figures over the devices it shows (:attr:`Target.chips`).
# GPU memory: the card's total as CUDA reports it; peaks: NVIDIA's datasheets (dense
# bf16, SXM). JAX preallocates 75% of it unless XLA_PYTHON_CLIENT_MEM_FRACTION is raised
# (launch/slurm.py sets 0.95); `fits` compares with the whole card.
CHIPS: dict[str, Chip] = {c.name: c for c in [
    Chip("v4", "tpu", "TPU v4", int(2 * 15.25 * GiB), 275e12,
         "HBM: libtpu compiler (15.25 GiB per TensorCore); peak: Cloud TPU v4 page"),
    Chip("v5e", "tpu", "TPU v5 lite", int(15.75 * GiB), 197e12,
         "HBM: libtpu compiler; peak: Cloud TPU v5e page"),
    Chip("v5p", "tpu", "TPU v5", int(95.74 * GiB), 459e12,
         "HBM: libtpu compiler; peak: Cloud TPU v5p page"),
    Chip("v6e", "tpu", "TPU v6 lite", int(31.25 * GiB), 918e12,
         "HBM: libtpu compiler; peak: Cloud TPU v6e (Trillium) page"),
    Chip("h100", "gpu", "NVIDIA H100", 81559 * 2**20, 989e12,
         "memory: 81559 MiB (H100 SXM5 80GB); peak: NVIDIA H100 datasheet, dense bf16"),
    Chip("h200", "gpu", "NVIDIA H200", 143771 * 2**20, 989e12,
         "memory: 143771 MiB (H200 SXM 141GB); peak: NVIDIA H200 datasheet, dense bf16"),
    Chip("a100", "gpu", "NVIDIA A100", 81920 * 2**20, 312e12,
         "memory: 81920 MiB (A100 SXM4 80GB); peak: NVIDIA A100 datasheet, dense bf16"),
]}

# Chips per device-slice shape: Cloud TPU's topologies (2D tori for v5e / v6e, 3D for
# v4 / v5p). Accelerator type `vXp-N` counts TensorCores (2 per chip) for v4 / v5p and
# chips for v5e / v6e.
_TOPO_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
            256: "16x16"}
_TOPO_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
            256: "4x8x8", 512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16"}
_TPU_CORES_PER_CHIP = {"v4": 2, "v5p": 2, "v5e": 1, "v6e": 1}
_TPU_ALIASES = {"v5litepod": "v5e"}
_TPU_NAMES = sorted({f"{g}-{n * _TPU_CORES_PER_CHIP[g]}"
                     for g in _TPU_CORES_PER_CHIP
                     for n in (_TOPO_3D if _TPU_CORES_PER_CHIP[g] == 2 else _TOPO_2D)
                     }, key=lambda s: (s.split("-")[0], int(s.split("-")[1])))


@dataclasses.dataclass(frozen=True)
class Target:
    """A parsed target: what to compile for."""

    name: str  # as typed (normalised)
    platform: str  # cpu | tpu | gpu
    chip: Chip | None  # None for cpu
    topology: str  # libtpu topology name (v5p:2x2x1) / GPU "slices x hosts x devices" / ""
    num_slices: int = 1
    hosts: int = 1

    @property
    def devices_expected(self) -> int | None:
        return None if self.chip is None else _expected_devices(self)

    @property
    def chips(self) -> int | None:
        """Chips (GPUs) in the target: what :class:`Chip`'s figures are per."""
        if self.chip is None:
            return None
        per_chip = 2 if self.chip.name == "v4" else 1
        return self.devices_expected // per_chip


def _expected_devices(t: Target) -> int:
    if t.platform == "gpu":
        return math.prod(int(x) for x in t.topology.split("x"))
    return math.prod(int(x) for x in t.topology.split(":")[1].split("x")) * t.num_slices * (
        2 if t.chip.name == "v4" else 1)


def chip_of_kind(kind: str) -> Chip | None:
    """The :class:`Chip` whose JAX ``device_kind`` ``kind`` starts with (None: not a listed
    accelerator). Longest prefix first: ``TPU v5 lite`` is v5e, ``TPU v5`` v5p."""
    for c in sorted(CHIPS.values(), key=lambda c: -len(c.device_kind)):
        if kind.startswith(c.device_kind):
            return c
    return None


def known_targets() -> list[str]:
    """The target names :func:`parse` accepts (GPU host counts: any ``NxGPUx8``)."""
    gpus = [f"{g}{s}" for g in ("h100", "h200", "a100") for s in ("", "x8")]
    return ["cpu", *_TPU_NAMES, *gpus, "2xh100x8 (N hosts x 8 GPUs)"]


def parse(name: str, num_slices: int = 1) -> Target:
    """``"v5p-8"``, ``"v5e-16"``, ``"h100x8"``, ``"2xh100x8"``, ``"cpu"`` -> :class:`Target`.

    Raises ``ValueError`` naming the value and the known targets.
    """
    s = name.strip().lower()
    if num_slices < 1:
        raise ValueError(f"num_slices={num_slices} must be >= 1")
    if s == "cpu":
        if num_slices != 1:
            raise ValueError(f"target 'cpu' has one slice; got {num_slices=}")
        return Target("cpu", "cpu", None, "")
    m = re.fullmatch(r"(v4|v5e|v5p|v6e|v5litepod)-(\d+)", s)
    if m:
        gen = _TPU_ALIASES.get(m.group(1), m.group(1))
        n = int(m.group(2))
        cores = _TPU_CORES_PER_CHIP[gen]
        table = _TOPO_3D if cores == 2 else _TOPO_2D
        chips = n // cores
        if n % cores or chips not in table:
            raise ValueError(f"unknown TPU target {name!r}: {gen}-N takes N in "
                             f"{sorted(c * cores for c in table if c > 1)}; known targets: "
                             f"{', '.join(known_targets())}")
        return Target(f"{gen}-{n}", "tpu", CHIPS[gen], f"{gen}:{table[chips]}", num_slices)
    m = re.fullmatch(r"(?:(\d+)x)?(h100|h200|a100)(?:x(\d+))?", s)
    if m:
        hosts, gpu, per_host = int(m.group(1) or 1), m.group(2), int(m.group(3) or 1)
        if hosts < 1 or per_host not in (1, 2, 4, 8):
            raise ValueError(f"unknown GPU target {name!r}: [HOSTSx]GPU[xN] with N in 1, 2, 4, "
                             f"8; known targets: {', '.join(known_targets())}")
        return Target(s, "gpu", CHIPS[gpu], f"{num_slices}x{hosts}x{per_host}", num_slices,
                      hosts)
    raise ValueError(f"unknown target {name!r}; known targets: {', '.join(known_targets())}")


# ----------------------------------------------------------------------------
# Compile-only devices
# ----------------------------------------------------------------------------


def compile_only() -> None:
    """Claim no accelerator in this process (an ahead-of-time compile needs none; libtpu or the
    CUDA plugin installed on a CPU host would otherwise try to start their devices). Sets
    JAX's ``jax_platforms`` to ``cpu`` unless the user chose (``JAX_PLATFORMS``); JAX reads
    the variable when it is imported, so setting the variable here would come too late."""
    if "JAX_PLATFORMS" not in os.environ:
        jax.config.update("jax_platforms", "cpu")


def _tpu_env():
    """libtpu's compile-only mode needs an accelerator type (any valid one) and, when
    several processes load it (pytest-xdist, subprocesses), no lockfile."""
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")


def devices(target: Target) -> list:
    """The devices to compile ``target`` for: this machine's for ``cpu``, else compile-only
    devices (libtpu for TPUs, the CUDA plugin with :mod:`longctx.gpu_targets` for GPUs)."""
    from jax.experimental import topologies

    if target.platform == "cpu":
        return list(jax.devices("cpu"))
    if target.platform == "tpu":
        _tpu_env()
        extra, kw = "tpu", dict(platform="tpu", topology_name=target.topology,
                                num_slices=target.num_slices)
    else:
        extra, kw = "gpu", dict(platform="cuda", topology_name=target.chip.name,
                                target_config=gpu_targets.target_config(target.chip.name),
                                topology=target.topology)
    try:
        return list(topologies.get_topology_desc(**kw).devices)
    except Exception as e:  # noqa: BLE001 -- re-raised with what to do
        raise RuntimeError(
            f"cannot make compile-only {target.platform.upper()} devices for {target.name!r} "
            f"({target.topology}): {type(e).__name__}: {str(e).splitlines()[0][:300]}. "
            f"Install the compiler with pip install -e '.[{extra}]' (of the pinned jax)") from e
