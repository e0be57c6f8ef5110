"""Device mesh and logical-axis sharding (pjit semantics: one jit, GSPMD propagation).

Mesh axes, outermost first: ``data, fsdp, tensor, expert, sequence``. Their sizes
come from the config (``-1`` = the devices left over); a DCN shape (multi-slice:
several TPU slices or GPU nodes joined by the data-center network) multiplies
the ICI shape axis by axis, with the DCN part outermost so that only the
outer (data-parallel) collectives cross slices.

Parameters and activations carry *logical* axis names (``batch, length, embed,
heads, kv_heads, head_dim, mlp, vocab, expert``). A rules table maps each
logical name to zero or more mesh axes (MaxText's ``logical_axis_rules``). A
dimension is only split over the mesh axes that divide it; the rest are dropped
(replicated) and the drop is logged once, e.g. MQA's single kv head over
``tensor=2``.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from longctx.parallel.axes import DEFAULT_RULES, LOGICAL_AXES, MESH_AXES  # noqa: F401 (API)

log = logging.getLogger(__name__)

def resolve_mesh_shape(shape: Mapping[str, int], n_devices: int) -> dict[str, int]:
    """Fill a single ``-1`` with the devices left over; check the product."""
    sizes = {a: int(shape.get(a, 1)) for a in MESH_AXES}
    free = [a for a, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise ValueError(f"at most one mesh axis may be -1; got {free} in {sizes}")
    if any(s == 0 or s < -1 for s in sizes.values()):
        raise ValueError(f"mesh axis sizes must be >= 1 or -1; got {sizes}")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if n_devices % fixed:
            raise ValueError(f"{n_devices} devices cannot be split over the fixed mesh axes "
                             f"{ {a: s for a, s in sizes.items() if s != -1} } (product {fixed})")
        sizes[free[0]] = n_devices // fixed
    if math.prod(sizes.values()) != n_devices:
        raise ValueError(f"mesh {sizes} has {math.prod(sizes.values())} devices; "
                         f"{n_devices} are available")
    return sizes


def make_mesh(ici: Mapping[str, int], dcn: Mapping[str, int] | None = None,
              devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """The 5-axis mesh. ``dcn`` (multi-slice) sizes multiply the ICI sizes per axis."""
    devices = list(jax.devices() if devices is None else devices)
    dcn_sizes = {a: int((dcn or {}).get(a, 1)) for a in MESH_AXES}
    n_slices = math.prod(dcn_sizes.values())
    if len(devices) % n_slices:
        raise ValueError(f"{len(devices)} devices do not split into {n_slices} DCN slices")
    ici_sizes = resolve_mesh_shape(ici, len(devices) // n_slices)
    types = (AxisType.Auto,) * len(MESH_AXES)  # GSPMD propagation: pjit semantics
    if n_slices == 1:
        return jax.make_mesh(tuple(ici_sizes[a] for a in MESH_AXES), MESH_AXES,
                             axis_types=types, devices=devices)
    from jax.experimental import mesh_utils

    arr = mesh_utils.create_hybrid_device_mesh(
        [ici_sizes[a] for a in MESH_AXES], [dcn_sizes[a] for a in MESH_AXES], devices=devices)
    return jax.sharding.Mesh(arr, MESH_AXES, axis_types=types)


_warned: set = set()


def logical_to_spec(logical: Sequence[str | None], rules: Mapping[str, Sequence[str]],
                    mesh: jax.sharding.Mesh, shape: Sequence[int] | None = None) -> P:
    """Map logical axis names to a PartitionSpec, using each mesh axis at most once and
    only mesh axes (of size > 1) that divide the dimension."""
    used: set[str] = set()
    out = []
    for i, name in enumerate(logical):
        axes = []
        for ax in ([] if name is None else rules.get(name, [])):
            size = mesh.shape.get(ax, 1)  # an axis this mesh lacks: not split
            if ax in used or size == 1:
                continue
            dim = None if shape is None else shape[i]
            if dim is not None and dim % (math.prod(mesh.shape[a] for a in axes) * size):
                key = (name, ax, dim)
                if key not in _warned:
                    _warned.add(key)
                    log.info("logical axis %r (size %d) not split over mesh axis %r (size %d): "
                             "not divisible; replicated", name, dim, ax, size)
                continue
            axes.append(ax)
            used.add(ax)
        out.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    return P(*out)


def state_shardings(state, mesh: jax.sharding.Mesh, rules: Mapping[str, Sequence[str]]):
    """NamedSharding for every array of an ``nnx.State`` from its logical metadata.

    Variables without ``out_sharding`` metadata (optimizer step counts, RNG keys)
    are replicated. Optimizer moments inherit their parameter's metadata (nnx
    copies it), so they are sharded like the parameter (ZeRO).
    """

    def one(x):
        if isinstance(x, nnx.Variable):
            logical = x.get_metadata().get("out_sharding")
            value = x.get_value()
            spec = P() if not logical or value.ndim != len(logical) else \
                logical_to_spec(logical, rules, mesh, value.shape)
            return x.replace(NamedSharding(mesh, spec))
        return NamedSharding(mesh, P())

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


# ----------------------------------------------------------------------------
# Activation constraints: a no-op unless a trainer installed rules and a mesh.
# ----------------------------------------------------------------------------

_ACTIVE: dict = {}


@contextlib.contextmanager
def activation_rules(mesh: jax.sharding.Mesh, rules: Mapping[str, Sequence[str]]):
    """While active, :func:`constrain` places activations by logical names."""
    prev = dict(_ACTIVE)
    _ACTIVE.update(mesh=mesh, rules=rules)
    try:
        yield
    finally:
        _ACTIVE.clear()
        _ACTIVE.update(prev)


def active_rules() -> Mapping[str, Sequence[str]]:
    """The logical-axis rules a trainer installed (:func:`activation_rules`), else the
    defaults: what kernels wrapped in ``shard_map`` split their inputs by."""
    return _ACTIVE.get("rules", DEFAULT_RULES)


def constrain(x, logical: Sequence[str | None]):
    """``with_sharding_constraint`` by logical axis names (block boundaries)."""
    if not _ACTIVE:
        return x
    spec = logical_to_spec(logical, _ACTIVE["rules"], _ACTIVE["mesh"], x.shape)
    return jax.lax.with_sharding_constraint(x, NamedSharding(_ACTIVE["mesh"], spec))


def batch_sharding(mesh, rules, ndim: int = 2) -> NamedSharding:
    """Sharding of a ``[batch, length, ...]`` input array."""
    logical = ("batch", "length") + (None,) * (ndim - 2)
    return NamedSharding(mesh, logical_to_spec(logical[:ndim], rules, mesh))


def describe(state) -> dict[str, str]:
    """``{param path: spec}`` for logs and tests."""
    flat = nnx.to_flat_state(state)
    return {"/".join(map(str, k)): str(v[...].sharding.spec) if hasattr(v[...], "sharding")
            else "?" for k, v in flat}


def host_local_batch(global_batch_size: int) -> int:
    if global_batch_size % jax.process_count():
        raise ValueError(f"global batch {global_batch_size} not divisible by "
                         f"{jax.process_count()} processes")
    return global_batch_size // jax.process_count()


def to_global(batch: dict[str, np.ndarray], mesh, rules) -> dict[str, jax.Array]:
    """This process's rows of the global batch -> global sharded arrays."""
    return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, rules, v.ndim), v)
            for k, v in batch.items()}
