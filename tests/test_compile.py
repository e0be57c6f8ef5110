"""Ahead-of-time compiles for a target (``python -m longctx.compile``): the target decides.

The TPU cases compile for compile-only TPU devices (libtpu, the ``tpu`` extra) on this
CPU machine; they skip where libtpu is not installed. The GPU case needs the CUDA plugin
(the ``gpu`` extra) and skips without it.
"""

import importlib.util
import json

import jax
import numpy as np
import pytest

from longctx import targets
from longctx.backends.linear import forms
from longctx.backends.linear.ops import segment_form
from longctx.compile import build_config, compile_step, custom_calls, main, refused_bytes
from longctx.config import ConfigError
from longctx.kernels import linear_attention as pallas_linear
from longctx.kernels import splash_attention as splash
from longctx.parallel import sharding as shd

TINY = "experiments/configs/tiny.yaml"
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu not installed (pip install -e '.[tpu]')")
needs_cuda = pytest.mark.skipif(importlib.util.find_spec("jax_cuda12_plugin") is None,
                                reason="CUDA plugin not installed (pip install -e '.[gpu]')")

BACKENDS = {
    "full": [],
    "gated_deltanet": ["model.attention.backend=linear",
                       "model.attention.linear.variant=gated_deltanet"],
    "hybrid": ["model.attention.pattern=[linear, full]",
               "model.attention.linear.variant=gated_deltanet"],
    "recurrent": ["model.attention.backend=recurrent", "model.segment_len=128"],
    "moe": ["model.moe.num_experts=4"],
}


def _compile(backend, target, num_slices=1, mesh=None, extra=(), batch=4):
    cfg = build_config(TINY, [*BACKENDS[backend], *extra], mesh=mesh or {"data": 4}, batch=batch,
                       seq_len=256, num_slices=num_slices)
    return compile_step(cfg, targets.parse(target, num_slices))


def _kernels(report):
    return {k for k in report["custom_calls"] if k.startswith("tpu_custom_call:")
            or "ragged" in k or "cudnn" in k}


# -- target names -------------------------------------------------------------------------


@pytest.mark.parametrize("name,platform,topology,devices", [
    ("v5p-8", "tpu", "v5p:2x2x1", 4), ("v5e-16", "tpu", "v5e:4x4", 16),
    ("v6e-8", "tpu", "v6e:2x4", 8), ("v4-8", "tpu", "v4:2x2x1", 8),
    ("v5p-1024", "tpu", "v5p:8x8x8", 512), ("v5litepod-4", "tpu", "v5e:2x2", 4),
    ("h100x8", "gpu", "1x1x8", 8), ("2xh100x8", "gpu", "1x2x8", 16), ("h200", "gpu", "1x1x1", 1),
    ("cpu", "cpu", "", None)])
def test_target_names(name, platform, topology, devices):
    t = targets.parse(name)
    assert (t.platform, t.topology, t.devices_expected) == (platform, topology, devices)


@pytest.mark.parametrize("bad", ["v5p-6", "v7-8", "h100x3", "tpu", ""])
def test_unknown_target_lists_the_known_ones(bad):
    with pytest.raises(ValueError, match=r"known targets: cpu, .*v5p-8"):
        targets.parse(bad)


def test_refused_bytes_reads_the_compilers_figure():
    msg = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
           "temporaries (196.46G) exceeds available HBM (95.74G).")
    assert refused_bytes(msg) == int(196.46 * 2**30)


def test_custom_calls_name_mosaic_kernels():
    hlo = ('  %splash_mqa_fwd.3 = f32[2] custom-call(%a), custom_call_target="tpu_custom_call"\n'
           '  ROOT %x = f32[2] custom-call(%b), custom_call_target="__cudnn$fmhaSoftmax"\n')
    assert custom_calls(hlo) == {"__cudnn$fmhaSoftmax": 1, "tpu_custom_call:splash_mqa_fwd": 1}


# -- the target decides -------------------------------------------------------------------


@needs_libtpu
def test_choices_follow_the_mesh_devices_not_the_host():
    tpu = shd.make_mesh({"data": 4}, devices=targets.devices(targets.parse("v5e-4")))
    cpu = shd.make_mesh({"data": 4}, devices=jax.devices()[:4])
    assert jax.default_backend() == "cpu"
    with jax.set_mesh(tpu):
        assert targets.platform() == "tpu" and targets.device_kind().startswith("TPU v5 lite")
        assert splash.available() and pallas_linear.available()
        assert segment_form("auto") == "chunk"
        assert forms.CHUNKS_PER_STEP.get(targets.platform()) == forms.CHUNKS_PER_STEP["tpu"]
    with jax.set_mesh(cpu):
        assert targets.platform() == "cpu"
        assert not splash.available() and segment_form("auto") == "chunk_scan"
    assert targets.platform() == "cpu"


@needs_libtpu
def test_one_step_for_cpu_and_for_tpu_finds_the_right_kernels():
    """The same train step compiled for this CPU and for a v5e-4: splash (forward, dq, dkv)
    in the TPU program, no Pallas kernel in the CPU one."""
    cpu, tpu = _compile("full", "cpu"), _compile("full", "v5e-4")
    assert _kernels(cpu) == set()
    assert {"tpu_custom_call:splash_mqa_fwd_residuals", "tpu_custom_call:splash_mqa_dq_no_residuals",
            "tpu_custom_call:splash_mqa_dkv_no_residuals"} <= _kernels(tpu)
    for r, kind in ((cpu, "cpu"), (tpu, "TPU v5 lite")):
        assert r["fits"] and r["device_kind"].lower().startswith(kind.lower())
        assert r["device_bytes"] == (r["argument_bytes"] + r["output_bytes"] + r["temp_bytes"]
                                     - r["alias_bytes"]) > 0
        assert r["model_flops"] > 0 and r["roofline_step_s"] > 0
    assert tpu["platform"] == "tpu" and tpu["memory_bytes"] == targets.CHIPS["v5e"].memory_bytes


@pytest.mark.slow
@needs_libtpu
def test_two_slices():
    r = _compile("full", "v5e-4", num_slices=2, batch=8)
    assert r["devices"] == 8 and r["mesh"] == {"data": 8} and r["fits"]
    assert "tpu_custom_call:splash_mqa_fwd_residuals" in r["custom_calls"]


@pytest.mark.slow
@needs_libtpu
@pytest.mark.parametrize("backend", ["gated_deltanet", "hybrid", "recurrent", "moe"])
def test_backends_compile_for_tpu(backend):
    r = _compile(backend, "v5e-4")
    # (a tiny model's temporaries can live in VMEM: 0 bytes of HBM)
    assert r["fits"] and r["device_bytes"] >= r["argument_bytes"] > 0
    kernels = _kernels(r)
    assert any("splash" in k for k in kernels) == (backend in ("hybrid", "moe"))
    # dropless MoE: auto picks ragged_dot on TPU (Mosaic's ragged-dot kernels)
    assert any("ragged-dot" in k for k in kernels) == (backend == "moe")


@pytest.mark.slow
def test_moe_on_cpu_picks_blocks():
    r = _compile("moe", "cpu")
    assert r["fits"] and not any("ragged" in k for k in r["custom_calls"])


@needs_cuda
def test_gpu_target_picks_cudnn():
    r = _compile("full", "h100x8", mesh={"data": 8}, extra=["model.dtype=bfloat16"], batch=8)
    assert r["platform"] == "gpu" and r["devices"] == 8
    assert any(k.startswith("__cudnn$fmha") for k in r["custom_calls"])


# -- the command line ---------------------------------------------------------------------


@pytest.mark.slow
@needs_libtpu
def test_exit_statuses(tmp_path, capsys):
    base = ["--config", TINY, "--batch", "4", "--seq-len", "256"]
    out = tmp_path / "r.json"
    assert main([*base, "--target", "v5e-4", "--mesh", "data=4", "--json", str(out)]) == 0
    assert set(json.loads(out.read_text())) == set(__import__("longctx.compile").compile.KEYS)
    # exact attention over 64K tokens materialises [T, T] scores: the compiler refuses it
    assert main([*base[:4], "--seq-len", "65536", "--target", "v5e-4", "--mesh", "data=4",
                 "model.attention.impl=xla"]) == 3
    assert "does not fit" in capsys.readouterr().err
    assert main([*base, "--target", "v5p-7"]) == 2
    assert "known targets" in capsys.readouterr().err
    assert main([*base, "--target", "v5e-4", "--mesh", "data=3"]) == 2
    assert "does not fit the 4 devices" in capsys.readouterr().err


# -- save / train.compiled_step -----------------------------------------------------------


@pytest.mark.slow
def test_saved_step_trains_exactly_as_a_compiled_one(tmp_path):
    """Compile for `cpu` with --save, then train with train.compiled_step: the same losses
    and parameters as a run that compiles its own step; a mismatched run is refused."""
    from longctx.config import load_config
    from longctx.train import train

    common = ["train.steps=3", "train.log_every=1", "train.eval_every=0", "train.tensorboard=false",
              "checkpoint.async_save=false", "mesh.ici={data: 8}", "train.batch_size=8",
              "data.seq_len=32"]
    step_dir = tmp_path / "step"
    assert main(["--config", TINY, "--target", "cpu", "--save", str(step_dir), *common]) == 0
    assert sorted(p.name for p in step_dir.iterdir()) == ["executable.bin", "meta.json"]

    def run(name, extra=()):
        cfg = load_config(TINY, [*common, f"train.run_dir={tmp_path / name}", *extra])
        return train(cfg, progress=False, return_state=True)

    ref, ref_state = run("compiled")
    got, got_state = run("loaded", [f"train.compiled_step={step_dir}"])
    assert got["loss"] == ref["loss"] and got["grad_norm"] == ref["grad_norm"]
    jax.tree.map(np.testing.assert_array_equal, got_state, ref_state)
    with pytest.raises(ConfigError, match="another config"):
        run("other", [f"train.compiled_step={step_dir}", "optim.lr=1e-2"])
    with pytest.raises(ConfigError, match="another topology"):
        run("mesh", [f"train.compiled_step={step_dir}", "mesh.ici={data: 4, fsdp: 2}"])
    with pytest.raises(ConfigError, match="expected a directory"):
        run("missing", [f"train.compiled_step={tmp_path / 'nothing'}"])


# -- remat policies (model.remat) ---------------------------------------------------------


@pytest.mark.slow
def test_remat_policies_keep_what_they_say():
    """Compiled scratch of one train step: full (block inputs only) < minimal (+ the mixer's
    and MLP's outputs) < dots (+ every matmul output) < none (everything)."""
    temp = {}
    for policy in ("none", "full", "minimal", "dots"):
        cfg = build_config(TINY, [f"model.remat={policy}"], mesh={"data": 1}, batch=2,
                           seq_len=1024)
        temp[policy] = compile_step(cfg, targets.parse("cpu"))["temp_bytes"]
    assert temp["full"] < temp["minimal"] < temp["dots"] < temp["none"], temp


@pytest.mark.slow
@needs_libtpu
def test_offloading_remat_compiles_for_tpu_and_is_an_error_on_cpu():
    cfg = build_config(TINY, ["model.remat=offload_dots"], mesh={"data": 4}, batch=4, seq_len=256)
    assert compile_step(cfg, targets.parse("v5e-4"))["fits"]
    with pytest.raises(ValueError, match="target platform 'cpu' does not have"):
        compile_step(cfg, targets.parse("cpu"))
