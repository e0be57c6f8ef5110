"""python -m longctx.evals on a trainer checkpoint."""

import json

import numpy as np
import pytest

from longctx.config import load_config
from longctx.evals import core
from longctx.train import train


@pytest.mark.slow
def test_evaluates_a_checkpoint_at_longer_lengths(tmp_path):
    run_dir = tmp_path / "run"
    train(load_config("experiments/configs/tiny.yaml", [
        f"train.run_dir={run_dir}", "train.steps=2", "train.batch_size=8", "train.eval_every=0",
        "train.tensorboard=false", "checkpoint.async_save=false"]), progress=False)
    rows = core.run(str(run_dir), task="passkey", lengths=[64, 160], depths=[0.0, 1.0],
                    examples=3)
    assert [(r["length"], r["depth"]) for r in rows] == [(64, 0.0), (64, 1.0), (160, 0.0),
                                                         (160, 1.0)]
    for r in rows:
        assert 0.0 <= r["exact_match"] <= r["accuracy"] + 1e-9 <= 1.0 + 1e-9
        assert r["step"] == 2 and r["trained_seq_len"] == 64
    mq = core.run(str(run_dir), task="mqar", lengths=[64], examples=4)
    assert 0.0 <= mq[0]["accuracy"] <= 1.0
    saved = [json.loads(l) for l in open(run_dir / "eval_passkey.jsonl")]
    assert len(saved) == 4

    # The restored model is the trained one: its logits match a fresh restore.
    cfg, model, step = core.load_model(str(run_dir))
    _, model2, _ = core.load_model(str(run_dir))
    tok = np.zeros((1, 8), np.int32)
    np.testing.assert_array_equal(model(tok)[0], model2(tok)[0])


def test_missing_run_dir_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.yaml"):
        core.run(str(tmp_path), task="mqar", lengths=[64])


def test_eval_beyond_the_trained_kv_cache_restores_the_trained_weights_and_sees_every_key(
        tmp_path, monkeypatch):
    """`full` scanned in segments carries a KV cache of model.max_seq_len slots. Evaluating
    at a longer length must build the model with a cache that long *before* restoring;
    built first and resized after (the old behaviour), the model silently becomes a
    sliding window of the trained cache. Also: the restored weights are the trained ones."""
    import dataclasses

    import jax
    from flax import nnx

    import longctx

    run_dir = tmp_path / "run"
    _, state = train(load_config("experiments/configs/tiny.yaml", [
        f"train.run_dir={run_dir}", "train.steps=2", "train.batch_size=8", "train.eval_every=0",
        "train.tensorboard=false", "checkpoint.async_save=false", "model.segment_len=16",
        "model.max_seq_len=64", "data.seq_len=64"]), progress=False, return_state=True)
    seen = []
    predict = core._predict
    monkeypatch.setattr(core, "_predict", lambda m, t: (seen.append(m), predict(m, t))[1])
    core.run(str(run_dir), task="mqar", lengths=[160], examples=1)
    model = seen[0]

    def flat(tree):
        return {jax.tree_util.keystr(p): np.asarray(v)
                for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}

    restored, trained = flat(nnx.to_pure_dict(nnx.state(model))), flat(state[0])
    assert restored.keys() == trained.keys()
    for k in trained:
        np.testing.assert_array_equal(restored[k], trained[k], err_msg=k)

    one_pass = longctx.build_model(dataclasses.replace(model.cfg, segment_len=0),
                                   rngs=nnx.Rngs(1))
    nnx.update(one_pass, nnx.state(model))
    tok = np.random.default_rng(0).integers(0, 256, (1, 160)).astype(np.int32)
    np.testing.assert_allclose(model(tok)[0], one_pass(tok)[0], atol=3e-5)
