"""The trainer (python -m longctx.train) on 8 simulated CPU devices: a short run learns and
writes its run directory, CLI errors, sharding = single device, gradient accumulation,
resume, re-shard on restore, corrupt checkpoints, SIGTERM, bad data, packed documents."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from flax import nnx
from jax.sharding import PartitionSpec as P

import longctx
from longctx.config import load_config
from longctx.data.pipeline import build_source, make_dataset
from longctx.model import layout
from longctx.train import make_optimizer, make_train_step, train

TINY = "experiments/configs/tiny.yaml"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(run_dir, *extra):
    return load_config(TINY, [f"train.run_dir={run_dir}", "train.batch_size=16",
                              "train.log_every=1", "train.eval_every=0", "train.eval_batches=1",
                              "train.tensorboard=false", "optim.warmup_steps=2",
                              "checkpoint.async_save=false", *extra])


def _flat(pure):
    return {"/".join(map(str, k)): v for k, v in jax.tree_util.tree_flatten_with_path(pure)[0]}


@pytest.mark.slow
@pytest.mark.parametrize("extra", [
    (),
    # hybrids, trained in segments (the windowed path) on the mesh
    ("model.attention.pattern=[linear, full]", "model.segment_len=16", "model.bptt_segments=2"),
    ("model.attention.pattern=[recurrent, linear]", "model.segment_len=16",
     "model.attention.recurrent.compressive=delta"),
], ids=["full", "linear-full", "recurrent-linear"])
def test_sharded_step_equals_single_device_and_params_follow_the_rules(tmp_path, extra):
    mesh = ["mesh.ici={data: 2, fsdp: 2, tensor: 2}"]
    cfg = _cfg(tmp_path / "sharded", "train.steps=1", *mesh, *extra)
    final, state = train(cfg, progress=False, return_state=True)

    # Single-device reference: the same step function, no mesh, one device.
    model = longctx.build_model(cfg.model, rngs=nnx.Rngs(cfg.train.seed))
    opt = nnx.Optimizer(model, make_optimizer(cfg.optim, cfg.train.steps), wrt=nnx.Param)
    graphdef, ref_state = nnx.split((model, opt))
    source = build_source("synthetic", seq_len=cfg.data.seq_len, vocab_size=256, task="mqar",
                          seed=cfg.data.seed, num_kv_pairs=4)
    batch = next(iter(make_dataset(source, global_batch_size=16, seed=cfg.data.seed)))
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    ref_state, ref_metrics = jax.jit(make_train_step(graphdef, 1))(ref_state, batch)
    assert abs(final["loss"] - float(ref_metrics["loss"])) < 1e-5

    ours, ref = _flat(state), _flat(nnx.to_pure_dict(ref_state))
    for k in ref:
        np.testing.assert_allclose(ours[k], ref[k], atol=1e-5, err_msg=k)
    # Parameters are laid out as the default rules say; the stacked `layers` axis of
    # model.scan_layers (the default; 2 layers of one kind, not the 2-layer hybrids) is never
    # split.
    assert cfg.model.scan_layers
    scanned = layout.stages(cfg.model)[0].scanned
    assert scanned == (extra == ())
    lead = (None,) if scanned else ()
    wq = state[0]["stages"][0]["blocks"][0]["mixer"]["wq"]
    assert wq.sharding.spec == P(*lead, "fsdp", "tensor", None)
    assert state[0]["embed"]["embedding"].sharding.spec == P("tensor", "fsdp")
    mu = state[1]["opt_state"][1][0]["mu"]["stages"][0]["blocks"][0]["mlp"]["w_down"]  # ZeRO
    assert mu.sharding.spec == P(*lead, "tensor", "fsdp")


@pytest.mark.slow
def test_gradient_accumulation_equals_the_full_batch(tmp_path):
    _, a = train(_cfg(tmp_path / "a", "train.steps=2"), progress=False, return_state=True)
    _, b = train(_cfg(tmp_path / "b", "train.steps=2", "train.grad_accum_steps=2"),
                 progress=False, return_state=True)
    fa, fb = _flat(a), _flat(b)
    for k in fa:
        np.testing.assert_allclose(fa[k], fb[k], atol=2e-6, err_msg=k)


@pytest.mark.slow
def test_resume_is_bitwise_and_restores_onto_another_mesh(tmp_path):
    whole, s_whole = train(_cfg(tmp_path / "whole", "train.steps=6"), progress=False,
                           return_state=True)
    # Stop after step 3 (a checkpoint is written), then resume to step 6.
    part = _cfg(tmp_path / "part", "train.steps=6")
    first = train(part, progress=False, stop_at_step=3)
    assert first["status"] == "stopped"
    resumed, s_resumed = train(part, progress=False, return_state=True)
    for k, v in _flat(s_whole).items():
        np.testing.assert_array_equal(np.asarray(v), np.asarray(_flat(s_resumed)[k]), err_msg=k)
    rows = [json.loads(l) for l in open(tmp_path / "part" / "metrics.jsonl")]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]

    # A checkpoint written on one mesh shape restores onto another and continues.
    train(_cfg(tmp_path / "other", "train.steps=6"), progress=False, stop_at_step=3)
    other = _cfg(tmp_path / "other", "train.steps=6", "mesh.ici={data: 2, fsdp: 4}")
    _, s_other = train(other, progress=False, return_state=True)
    for k, v in _flat(s_whole).items():
        np.testing.assert_allclose(np.asarray(v), np.asarray(_flat(s_other)[k]), atol=1e-5,
                                   err_msg=k)
    assert s_other[0]["stages"][0]["blocks"][0]["mixer"]["wq"].sharding.spec == P(
        None, "fsdp", None, None)  # 2 layers stacked (model.scan_layers, the default)


@pytest.mark.slow
def test_corrupt_latest_checkpoint_is_skipped(tmp_path, caplog):
    cfg = _cfg(tmp_path, "train.steps=4", "checkpoint.every_steps=2")
    train(cfg, progress=False)
    ckpt_dir = tmp_path / "checkpoints"
    assert sorted(os.listdir(ckpt_dir)) == ["2", "4"]
    # Truncate every array file of step 4.
    for root, _, files in os.walk(ckpt_dir / "4" / "state"):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "r+b") as fh:
                fh.truncate(max(os.path.getsize(p) // 3, 1) if os.path.getsize(p) > 1 else 0)
    caplog.set_level("WARNING")
    final = train(_cfg(tmp_path, "train.steps=5", "checkpoint.every_steps=2"), progress=False)
    assert "checkpoint step 4" in caplog.text and "unreadable" in caplog.text
    rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows if "loss" in r][-3:] == [3, 4, 5]  # resumed from step 2
    assert final["status"] == "done"


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits(tmp_path):
    cmd = [sys.executable, "-m", "longctx.train", "--config", TINY, "--no-progress",
           f"train.run_dir={tmp_path}", "train.steps=100000", "train.log_every=1",
           "train.eval_every=0", "train.batch_size=8", "train.tensorboard=false",
           "checkpoint.every_steps=0"]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75, out  # EX_TEMPFAIL: launchers retry and resume
    assert "'status': 'preempted'" in out
    steps = os.listdir(tmp_path / "checkpoints")
    assert len(steps) == 1 and int(steps[0]) >= 2


def test_corrupt_data_file_and_out_of_vocab_tokens_fail_clearly(tmp_path):
    bad = tmp_path / "odd.bin"
    bad.write_bytes(b"\x01\x00\x02")  # 3 bytes: not a whole number of uint16 tokens
    with pytest.raises(ValueError, match="corrupt token file.*3 bytes"):
        train(_cfg(tmp_path / "r1", "data.source=tokens", f"data.path={bad}"), progress=False)
    big = tmp_path / "big.bin"
    np.array([1, 2, 300, 4] * 64, np.uint16).tofile(big)
    with pytest.raises(ValueError, match=r"token id 300 .*vocab_size=256"):
        train(_cfg(tmp_path / "r2", "data.source=tokens", f"data.path={big}",
                   "data.seq_len=32", "train.steps=1"), progress=False)
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        train(_cfg(tmp_path / "r3", "data.source=tokens", f"data.path={tmp_path}/nope.bin"),
              progress=False)


@pytest.mark.slow
def test_training_on_packed_text_files(tmp_path):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("\n".join(json.dumps({"text": "hello world " * (i + 1)}) for i in range(40)))
    final = train(_cfg(tmp_path / "run", "data.source=jsonl", f"data.path={docs}",
                       "data.seq_len=32", "train.steps=3", "train.batch_size=8"), progress=False)
    assert np.isfinite(final["loss"]) and final["status"] == "done"


@pytest.mark.parametrize("impl", ["flash", "xla"])
def test_packed_documents_never_attend_to_each_other(impl):
    cfg = load_config(TINY, [f"model.attention.impl={impl}", "model.attention.block_q=16",
                             "model.attention.block_k=16"])
    model = longctx.build_model(cfg.model, rngs=nnx.Rngs(0))
    tok = jax.random.randint(jax.random.PRNGKey(0), (2, 48), 0, 256)
    seg = jnp.asarray([[1] * 20 + [2] * 28, [1] * 5 + [2] * 30 + [3] * 13], jnp.int32)
    a, _ = model(tok, segment_ids=seg)
    # Change every token of the first document: later documents must not notice.
    changed = jnp.where(seg == 1, (tok + 1) % 256, tok)
    b, _ = model(changed, segment_ids=seg)
    later = np.asarray(seg) > 1
    np.testing.assert_allclose(np.asarray(a)[later], np.asarray(b)[later], atol=1e-5)
    assert not np.allclose(np.asarray(a)[~later], np.asarray(b)[~later])


# -- a run from the command line ------------------------------------------------------


@pytest.mark.slow
def test_short_run_learns_and_writes_the_run_dir(tmp_path):
    cfg = load_config(TINY, [f"train.run_dir={tmp_path}", "train.steps=60", "train.batch_size=16",
                             "train.log_every=10", "train.eval_every=0", "train.eval_batches=1",
                             "optim.warmup_steps=10", "data.task=copy", "data.seq_len=32"])
    final = train(cfg, progress=False)
    rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [10, 20, 30, 40, 50, 60]
    assert train_rows[-1]["loss"] < train_rows[0]["loss"] - 0.3  # the loss goes down
    for key in ("accuracy", "grad_norm", "lr", "tokens_per_s", "step_time_s"):
        assert np.isfinite(train_rows[-1][key]), key
    assert "eval_accuracy" in final and 0.0 <= final["eval_accuracy"] <= 1.0
    saved = yaml.safe_load(open(tmp_path / "config.yaml"))
    assert saved["train"]["steps"] == 60 and saved["data"]["task"] == "copy"


@pytest.mark.slow
def test_cli_reports_config_errors():
    r = subprocess.run([sys.executable, "-m", "longctx.train", "--config", TINY,
                        "model.n_kv_heads=3"], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode != 0
    assert "model.n_heads=4 must be divisible by model.n_kv_heads=3" in r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("missing", ["no_such.yaml"])
def test_cli_missing_config(missing):
    r = subprocess.run([sys.executable, "-m", "longctx.train", "--config", missing],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "config file not found" in r.stderr
