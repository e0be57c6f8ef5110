"""python -m longctx.inherit: a run directory the trainer resumes (with distillation from
the parent), a Hugging Face parent, and the refusals (vocabulary, a bad Hugging Face
directory, distillation from one, a non-empty output)."""

import json
import os

import numpy as np
import pytest
from flax import nnx

import longctx
from longctx import hf
from longctx.evals.core import load_model
from longctx.inherit.__main__ import main, write_run
from longctx.train.loop import train

TINY = "experiments/configs/tiny.yaml"
SMALL = ["model.d_model=32", "model.n_heads=4", "model.n_kv_heads=2", "model.mlp_dim=64",
         "model.n_layers=1", "model.vocab_size=64", "data.seq_len=16", "train.batch_size=8",
         "train.tensorboard=false", "train.eval_batches=1", "train.log_every=1"]


@pytest.fixture(scope="module")
def parent_run(tmp_path_factory):
    """A parent run directory: a random model written in the trainer's format."""
    path = tmp_path_factory.mktemp("inherit") / "parent"
    pcfg = longctx.load_config(TINY, SMALL)
    parent = longctx.build_model(pcfg.model, rngs=nnx.Rngs(5))
    write_run(parent, pcfg, str(path), ratio=1.0, method="interpolate")
    return path, parent


@pytest.mark.slow
def test_cli_writes_a_run_the_trainer_resumes_and_distils(tmp_path, parent_run):
    ppath, parent = parent_run
    child_yaml = tmp_path / "child.yaml"
    child_yaml.write_text(f"base: {os.path.abspath(TINY)}\n")
    out = tmp_path / "child"
    main(["--parent", str(ppath), "--config", str(child_yaml), "--ratio", "1",
          "--distill-alpha", "0.5", "--run-dir", str(out), *SMALL,
          "model.attention.pattern=[linear]", "optim.lr=1e-12", "optim.warmup_steps=0",
          "train.steps=1"])
    info = json.loads((out / "inheritance.json").read_text())
    assert info["mapped"]["repeat_kv"] == 4 and info["mapped"]["liger"] == 1  # wk wv conv_k/v
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]  # renamed when complete
    cfg, child, step = load_model(str(out))
    assert step == 0 and cfg.distill.alpha == 0.5
    np.testing.assert_array_equal(child.embed.embedding[...], parent.embed.embedding[...])
    final, state = train(cfg, progress=False, return_state=True)
    # resumed from the inherited step 0 (lr ~ 0: the weights stay the parent's), and the
    # distillation term is there (a linear child of a full parent: KL > 0)
    got = np.asarray(state[0]["embed"]["embedding"])
    np.testing.assert_allclose(got, parent.embed.embedding[...], atol=1e-6)
    assert final["kl"] > 0 and final["distill_alpha"] == 0.5
    assert final["loss"] == pytest.approx(0.5 * final["ce"] + 0.5 * final["kl"], rel=1e-4)


def test_cli_refusals(tmp_path, parent_run):
    args = ["--parent", str(parent_run[0]), "--config", TINY, "--ratio", "0.5",
            "--run-dir", str(tmp_path / "out"), *SMALL]
    with pytest.raises(SystemExit, match="parent's vocab_size=64 differs from the child's "
                                         "model.vocab_size=128"):
        main(args + ["model.vocab_size=128"])
    hf_dir = tmp_path / "hf"  # a Hugging Face parent: the same weights, through longctx.hf
    hcfg = longctx.load_config(TINY, SMALL + ["model.attention.conv_size=0"])  # Llama-shaped
    hparent = longctx.build_model(hcfg.model, rngs=nnx.Rngs(7))
    hf.save(hparent, hcfg, str(hf_dir))
    main(["--parent", str(hf_dir), "--config", TINY, "--ratio", "0.5",
          "--run-dir", str(tmp_path / "c"), *SMALL])
    ccfg, child, _ = load_model(str(tmp_path / "c"))
    fresh = longctx.build_model(ccfg.model, rngs=nnx.Rngs(ccfg.train.seed))
    np.testing.assert_allclose(child.embed.embedding[...],
                               0.5 * hparent.embed.embedding[...]
                               + 0.5 * fresh.embed.embedding[...], atol=1e-6)
    with pytest.raises(SystemExit, match="distillation needs a longctx run directory"):
        main(["--parent", str(hf_dir)] + args[2:] + ["--distill-alpha", "0.5"])
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{}")
    with pytest.raises(SystemExit, match=r"architectures=\[\]: expected one of"):
        main(["--parent", str(bad)] + args[2:])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("")
    with pytest.raises(SystemExit, match="exists and is not empty"):
        main(args)
