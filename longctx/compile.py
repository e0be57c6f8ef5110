"""Compile the trainer's step for a target ahead of time, from any machine.

    python -m longctx.compile --config experiments/configs/model_1b.yaml --target v5p-8 \\
        --mesh fsdp=4 --batch 4 [--seq-len 8192] [--num-slices 2] [--json out.json] \\
        [--save DIR] [key=value ...]

Builds the trainer's state and batch as abstract arrays with the trainer's exact
shardings (nothing is allocated), lowers and compiles the trainer's own step
(:func:`longctx.train.loop.jit_train_step`) for the target's devices -- compile-only
TPUs from libtpu, compile-only GPUs from the CUDA plugin (:mod:`longctx.gpu_targets`), or
this machine's CPU devices -- and reports, per device:

``argument_bytes, output_bytes, temp_bytes, alias_bytes`` (the compiled program's
``memory_analysis()``), ``device_bytes`` (argument + output + temp - alias),
``memory_bytes`` (the device's capacity, :data:`longctx.targets.CHIPS`), ``fits``,
``compile_s``, ``model_flops`` (one step, the model's own count: 6 N tokens plus the
mixers' FLOPs), ``roofline_step_s`` (those FLOPs at the devices' peak: a roofline, not a
measurement -- XLA's cost model counts loop bodies once and Pallas calls as zero),
``custom_calls`` (the kernels in the program, e.g. Mosaic ``tpu_custom_call``\\ s by kernel
name, ``__cudnn$fmha...``), and ``target, platform, device_kind, devices, mesh``.

Every automatic choice follows the target (:func:`longctx.targets.platform`), so the
program is the one the target would run. Exit status: 0 fits, 3 does not fit (the
compiler's refusal included, its figure in the message), 2 bad input.

``--save DIR`` writes the compiled step (:mod:`longctx.train.compiled`); the trainer
loads it with ``train.compiled_step=DIR`` on the devices it was compiled for.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import math
import os
import re
import sys
import time

from longctx.parallel.axes import MESH_AXES

KEYS = ("target", "platform", "device_kind", "devices", "mesh", "argument_bytes",
        "output_bytes", "temp_bytes", "alias_bytes", "device_bytes", "memory_bytes", "fits",
        "compile_s", "model_flops", "roofline_step_s", "custom_calls")

log = logging.getLogger(__name__)


class BadInput(ValueError):
    """Input that cannot describe a compile (exit status 2)."""


def parse_mesh(spec: str | None, *, allow_rest: bool = True) -> dict[str, int]:
    """``"fsdp=4"`` / ``"data=-1,tensor=2"`` -> ``{axis: size}`` (``{}`` for None);
    ``allow_rest``: one size may be -1 (the devices left over)."""
    out = {}
    for part in (spec or "").split(","):
        if not part.strip():
            continue
        axis, _, size = (x.strip() for x in part.partition("="))
        ok = re.fullmatch(r"-1|[1-9]\d*" if allow_rest else r"[1-9]\d*", size)
        if axis not in MESH_AXES or not ok:
            raise BadInput(f"--mesh {spec!r}: {part!r} is not AXIS=N with AXIS one of "
                           f"{MESH_AXES} and N >= 1" + (" (or -1: the devices left over)"
                                                        if allow_rest else ""))
        if axis in out:
            raise BadInput(f"--mesh {spec!r}: axis {axis!r} given twice")
        out[axis] = int(size)
    return out


_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def refused_bytes(message: str) -> int | None:
    """The bytes an out-of-memory compile error asks for ("HLO temporaries (196.46G)",
    "Used 64.88M of 63.94M"), else None."""
    m = re.search(r"(?:temporaries|[Uu]sed)\D*?(\d+(?:\.\d+)?)([KMGT]?)", message)
    return None if m is None else int(float(m.group(1)) * _UNITS[m.group(2)])


def is_oom(message: str) -> bool:
    return any(s in message for s in ("RESOURCE_EXHAUSTED", "Ran out of memory",
                                      "exceeds available", "OutOfMemory"))


def custom_calls(hlo_text: str) -> dict[str, int]:
    """``{kernel: count}`` of the custom calls in an HLO module's text. Mosaic TPU calls
    are named by their kernel (``tpu_custom_call:<name>``), other targets by themselves."""
    out = collections.Counter()
    for line in hlo_text.splitlines():
        m = re.search(r'custom_call_target="([^"]+)"', line)
        if not m:
            continue
        name = m.group(1)
        if name == "tpu_custom_call":  # Mosaic names the instruction after the kernel
            k = re.match(r"\s*(?:ROOT\s+)?%?([\w\-]+?)(?:\.\d+)*\s*=", line)
            name += ":" + (k.group(1) if k else "?")
        out[name] += 1
    return dict(sorted(out.items()))


def _host_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _per_device_bytes(tree) -> int:
    """Bytes of one device's shards of a tree of sharded abstract arrays."""
    import jax

    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) else x.shape
        total += math.prod(shape) * x.dtype.itemsize
    return total


def compile_step(cfg, target, *, save: str | None = None) -> dict:
    """Compile ``cfg``'s train step for ``target`` (:class:`longctx.targets.Target`);
    returns the report (:data:`KEYS`). Raises :class:`BadInput` for configs that cannot
    describe a compile on the target."""
    import jax
    from jax._src import config as jax_config

    from longctx import targets
    from longctx.parallel import sharding as shd
    from longctx.train import compiled as saved
    from longctx.train import metrics as M
    from longctx.train.loop import batch_spec, jit_train_step
    from longctx.train.state import TrainState

    if cfg.distill.enabled:
        raise BadInput(f"compile does not take a distillation parent (distill.alpha="
                       f"{cfg.distill.alpha} > 0); compile the child's config without it")
    devs = targets.devices(target)
    fixed = math.prod(n for n in {**cfg.mesh.ici}.values()) * math.prod(cfg.mesh.dcn.values())
    if target.platform == "cpu" and 0 < fixed < len(devs):  # this machine: the first ones
        devs = devs[:fixed]
    try:
        mesh = shd.make_mesh(cfg.mesh.ici, cfg.mesh.dcn, devices=devs)
    except (ValueError, NotImplementedError) as e:  # (the latter: no torus assignment)
        raise BadInput(f"mesh {dict(cfg.mesh.ici)} (dcn {dict(cfg.mesh.dcn)}) does not fit "
                       f"the {len(devs)} devices of {target.name!r}: {e}") from e
    rules = {**shd.DEFAULT_RULES, **cfg.mesh.rules}
    B, T = cfg.train.batch_size, cfg.data.seq_len
    batch_axes = [a for a in rules.get("batch", []) if mesh.shape.get(a, 1) > 1]
    if B % math.prod(mesh.shape[a] for a in batch_axes):
        raise BadInput(f"batch {B} does not divide over the batch mesh axes "
                       f"{ {a: mesh.shape[a] for a in batch_axes} }")
    ts = TrainState.create(cfg, mesh, rules, allocate=False)
    step = jit_train_step(cfg, ts, mesh, rules)
    args = (ts.state, batch_spec(cfg, mesh, rules))
    dev0 = devs[0]
    flops = M.train_flops_per_step(ts.abstract_model, ts.n_active, batch=B, seq_len=T)
    if target.chip is None:  # this machine: the host's measured rate, shared by its devices
        peak, n_peak, memory = M.peak_flops()[0], 1, _host_memory() // len(devs)
    else:  # a chip's figures over the devices it shows (v4 compile-only: 2 per chip)
        per_chip = mesh.size / target.chips
        peak, n_peak = target.chip.peak_flops / per_chip, mesh.size
        memory = int(target.chip.memory_bytes / per_chip)
    report = {"target": target.name, "platform": targets.GPU_PLATFORMS.get(
                  dev0.platform, dev0.platform),
              "device_kind": dev0.device_kind, "devices": mesh.size,
              "mesh": {a: int(n) for a, n in mesh.shape.items() if n > 1},
              "memory_bytes": int(memory), "model_flops": flops,
              "roofline_step_s": flops / (peak * n_peak)}
    t0 = time.perf_counter()
    # compile-only devices have no client to load a cached executable back: no cache for them
    with jax.set_mesh(mesh), shd.activation_rules(mesh, rules), \
            jax_config.enable_compilation_cache(target.platform == "cpu"):
        try:
            exe = step.lower(*args).compile()
        except Exception as e:  # noqa: BLE001 -- only the compiler's out-of-memory is a result
            if not is_oom(str(e)):
                raise
            temp = refused_bytes(str(e))
            arg = _per_device_bytes(args)
            report.update(argument_bytes=arg, output_bytes=None, temp_bytes=temp,
                          alias_bytes=None, device_bytes=None if temp is None else arg + temp,
                          fits=False, compile_s=time.perf_counter() - t0, custom_calls={},
                          refused=str(e).splitlines()[0][:400])
            return report
    report["compile_s"] = time.perf_counter() - t0
    ma = exe.memory_analysis()
    device_bytes = (ma.argument_size_in_bytes + ma.output_size_in_bytes
                    + ma.temp_size_in_bytes - ma.alias_size_in_bytes)
    report.update(argument_bytes=ma.argument_size_in_bytes, output_bytes=ma.output_size_in_bytes,
                  temp_bytes=ma.temp_size_in_bytes, alias_bytes=ma.alias_size_in_bytes,
                  device_bytes=device_bytes, fits=device_bytes <= memory,
                  custom_calls=custom_calls(exe.as_text()))
    if save:
        saved.save(exe, save, cfg, mesh, target=target.name)
    return report


def _gib(x):
    if x is None:
        return "-"
    return f"{x / 2**30:.2f} GiB" if x >= 2**30 else f"{x / 2**20:.1f} MiB"


def format_report(r: dict) -> str:
    lines = [f"target {r['target']} ({r['platform']}, {r['device_kind']}), {r['devices']} devices, "
             f"mesh {r['mesh'] or '{}'}"]
    if r.get("refused"):
        lines.append(f"the compiler refused the program: {r['refused']}")
    for k in ("argument_bytes", "output_bytes", "temp_bytes", "alias_bytes", "device_bytes",
              "memory_bytes"):
        lines.append(f"  {k:<16} {_gib(r[k])} per device")
    lines += [f"  fits             {r['fits']}",
              f"  compile_s        {r['compile_s']:.1f}",
              f"  model_flops      {r['model_flops']:.4g} per step",
              f"  roofline_step_s  {r['roofline_step_s']:.4g} (model FLOPs at peak: a roofline)",
              f"  custom_calls     {r['custom_calls'] or 'none'}"]
    return "\n".join(lines)


def build_config(config: str | None, overrides, *, mesh=None, batch=None, seq_len=None,
                 num_slices=1):
    """``config`` + ``overrides`` with the command line's ``--mesh / --batch / --seq-len /
    --num-slices`` applied (as overrides, last)."""
    from longctx.config import load_config

    extra = []
    if mesh:
        extra.append("mesh.ici={" + ", ".join(f"{a}: {n}" for a, n in mesh.items()) + "}")
    if num_slices > 1:
        extra.append(f"mesh.dcn={{data: {num_slices}}}")
    if batch is not None:
        extra.append(f"train.batch_size={batch}")
    if seq_len is not None:
        extra.append(f"data.seq_len={seq_len}")
    cfg = load_config(config, [*overrides, *extra])
    if seq_len is not None and cfg.model.max_seq_len < seq_len:
        cfg = load_config(config, [*overrides, *extra, f"model.max_seq_len={seq_len}"])
    return cfg


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m longctx.compile",
                                description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--target", required=True, help="v5p-8, v5e-16, v6e-8, h100x8, 2xh100x8, cpu ...")
    p.add_argument("--num-slices", type=int, default=1, help="slices joined over DCN (data axis)")
    p.add_argument("--mesh", default=None, metavar="AXIS=N[,AXIS=N]")
    p.add_argument("--batch", type=int, default=None, help="global batch (train.batch_size)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (data.seq_len)")
    p.add_argument("--json", default=None, metavar="PATH", help="write the report here")
    p.add_argument("--save", default=None, metavar="DIR", help="serialize the compiled step")
    p.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = p.parse_args(argv)
    from longctx import targets
    from longctx.config import ConfigError

    targets.compile_only()

    try:
        target = targets.parse(args.target, args.num_slices)
        mesh = parse_mesh(args.mesh)
        if target.platform == "cpu":  # simulated devices for a mesh, before JAX starts
            n = math.prod(v for v in mesh.values() if v > 0)
            if n > 1 and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
                os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                           + f" --xla_force_host_platform_device_count={n}")
        cfg = build_config(args.config, args.overrides, mesh=mesh, batch=args.batch,
                           seq_len=args.seq_len, num_slices=args.num_slices)
        report = compile_step(cfg, target, save=args.save)
    except (BadInput, ConfigError, ValueError, FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_report(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({k: report[k] for k in KEYS}, f, indent=1)
    if not report["fits"]:
        need = report["device_bytes"]
        print(f"does not fit: {_gib(need)} needed per device, {_gib(report['memory_bytes'])} "
              f"available", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
