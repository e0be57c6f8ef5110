"""Two processes on localhost (jax.distributed, gloo) train together and agree with one."""

import json
import os
import socket
import subprocess
import sys

import numpy as np

from longctx.config import load_config
from longctx.train.loop import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "experiments/configs/tiny.yaml"
ARGS = ["train.steps=3", "train.batch_size=16", "train.log_every=1", "train.eval_every=0",
        "train.tensorboard=false", "checkpoint.async_save=false"]


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_agree_with_one(tmp_path):
    port = _free_port()
    procs = []
    for pid in range(2):
        env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
               "JAX_PLATFORMS": "cpu", "LONGCTX_COORDINATOR": f"localhost:{port}",
               "LONGCTX_NUM_PROCESSES": "2", "LONGCTX_PROCESS_ID": str(pid)}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "longctx.train", "--config", TINY, "--no-progress",
             f"train.run_dir={tmp_path / 'two'}", *ARGS],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    two = [json.loads(l) for l in open(tmp_path / "two" / "metrics.jsonl")]  # process 0 only
    assert [r["step"] for r in two if "loss" in r] == [1, 2, 3]

    # One process over the same 8 (simulated) devices.
    train(load_config(TINY, [f"train.run_dir={tmp_path / 'one'}", *ARGS]), progress=False)
    one = [json.loads(l) for l in open(tmp_path / "one" / "metrics.jsonl")]
    np.testing.assert_allclose([r["loss"] for r in two if "loss" in r],
                               [r["loss"] for r in one if "loss" in r], atol=1e-5)
    assert "process 1 of 2" in outs[1] or "process 1" in outs[1]
