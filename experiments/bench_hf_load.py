"""Benchmark: peak host memory of ``longctx.hf.load`` on a ~1 GB checkpoint.

    python -m experiments.bench_hf_load                  # ~1.07 GB float32 Llama, 2 shards
    python -m experiments.bench_hf_load --layers 4       # smaller (~0.4 GB)
    python -m experiments.bench_hf_load --mesh 8         # onto 8 simulated CPU devices (fsdp)

Writes a random Llama-shaped checkpoint (config.json + sharded safetensors with
an index, via the safetensors numpy API) into a temporary directory, then loads
it in a fresh process and reads that process's peak resident set size
(``VmHWM``) against its RSS just before the load. Printed: checkpoint bytes,
baseline and peak RSS, and ratio = (peak - baseline) / checkpoint size. The
loaded parameters themselves are one copy (1.0); the target is <= 1.3 (one
tensor in flight at a time, file mappings dropped after each read).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

CHILD = r"""
import os, sys, json, time
if int(sys.argv[2]) > 1:
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={sys.argv[2]}"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
import jax
from longctx import hf
from longctx.parallel import sharding as shd

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
mesh = shd.make_mesh({"fsdp": -1}) if int(sys.argv[2]) > 1 else None
base = status("VmRSS")
t = time.perf_counter()
model, cfg = hf.load(sys.argv[1], mesh=mesh)
jax.block_until_ready(jax.tree.leaves(__import__("flax").nnx.state(model)))
dt = time.perf_counter() - t
print(json.dumps({"baseline": base, "peak": status("VmHWM"), "seconds": dt}))
"""


def write_checkpoint(path: str, *, layers: int, d: int, mlp: int, vocab: int,
                     max_shard: int = 600 * 2**20) -> int:
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    shapes = {"model.embed_tokens.weight": (vocab, d), "model.norm.weight": (d,),
              "lm_head.weight": (vocab, d)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (d,),
                       p + "post_attention_layernorm.weight": (d,),
                       **{p + f"self_attn.{n}_proj.weight": (d, d) for n in "qkvo"},
                       p + "mlp.gate_proj.weight": (mlp, d), p + "mlp.up_proj.weight": (mlp, d),
                       p + "mlp.down_proj.weight": (d, mlp)})
    shards, cur, used = [], {}, 0
    for name, shape in shapes.items():
        n = int(np.prod(shape)) * 4
        if cur and used + n > max_shard:
            shards.append(cur)
            cur, used = {}, 0
        cur[name] = shape
        used += n
    shards.append(cur)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {k: (0.02 * rng.standard_normal(s, dtype=np.float32)) for k, s in shard.items()}
        save_file(tensors, os.path.join(path, fname), metadata={"format": "pt"})
        total += sum(t.nbytes for t in tensors.values())
        weight_map.update({k: fname for k in shard})
        del tensors
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                   "vocab_size": vocab, "hidden_size": d, "intermediate_size": mlp,
                   "num_hidden_layers": layers, "num_attention_heads": d // 64,
                   "num_key_value_heads": d // 64, "rms_norm_eps": 1e-5,
                   "max_position_embeddings": 4096, "tie_word_embeddings": False,
                   "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}, f)
    return total


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--mlp", type=int, default=2816)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--mesh", type=int, default=1, help="simulated CPU devices (fsdp axis)")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_hf_load-") as tmp:
        size = write_checkpoint(tmp, layers=a.layers, d=a.d_model, mlp=a.mlp, vocab=a.vocab)
        out = subprocess.run([sys.executable, "-c", CHILD, tmp, str(a.mesh)], check=True,
                             capture_output=True, text=True, env={**os.environ})
        r = json.loads(out.stdout.strip().splitlines()[-1])
    ratio = (r["peak"] - r["baseline"]) / size
    mib = 2**20
    print(f"checkpoint {size / mib:.0f} MiB ({a.layers} layers, d_model {a.d_model}), "
          f"devices {a.mesh}: RSS before load {r['baseline'] / mib:.0f} MiB, peak "
          f"{r['peak'] / mib:.0f} MiB, load {r['seconds']:.1f} s")
    print(f"ratio (peak - baseline) / size = {ratio:.3f}  (target <= 1.3)")


if __name__ == "__main__":
    main()
