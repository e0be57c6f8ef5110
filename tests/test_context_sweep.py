"""experiments.context_sweep: outputs, resume, budget skipping."""

import json
import os

import pytest

from experiments import context_sweep

SMALL = ["model.d_model=32", "model.mlp_dim=32", "model.n_layers=1", "model.n_heads=2",
         "model.n_kv_heads=2", "data.num_kv_pairs=2"]


def _rows(out):
    return [json.loads(l) for l in open(os.path.join(out, "results.jsonl"))]


@pytest.mark.slow
def test_two_lengths_write_every_output(tmp_path):
    out = str(tmp_path / "sweep")
    # xla runs in the resume / budget tests below; here flash, then flash on a mesh
    context_sweep.main(["--backends", "flash", "--lengths", "64", "128", "--out", out,
                        "--repeats", "1", *SMALL])
    rows = _rows(out)
    assert {(r["backend"], r["length"]) for r in rows} == {("flash", 64), ("flash", 128)}
    for r in rows:
        assert set(r) == set(context_sweep.FIELDS)
        assert r["status"] == "ok", r
        assert r["step_s"] > 0 and r["scratch_bytes"] > 0 and r["tokens_per_s"] > 0
        assert r["jax_version"] and r["device_kind"]
    with open(os.path.join(out, "frontier.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "| flash | 1 | 64 | ok |" in open(os.path.join(out, "results.md")).read()
    # the same out dir, the sequence split over 2 devices, compiled only: rows of both
    # meshes side by side
    context_sweep.main(["--backends", "flash", "--lengths", "64", "--out", out, "--repeats", "1",
                        "--mesh", "sequence=2", "--compile-only", *SMALL])
    rows = _rows(out)
    assert len(rows) == 3
    sharded, single = rows[-1], rows[0]
    assert (sharded["mesh"], sharded["devices"], sharded["status"]) == ("sequence=2", 2,
                                                                        "compiled")
    assert sharded["step_s"] is None
    assert (single["mesh"], single["devices"]) == (None, 1)
    assert 0 < sharded["scratch_bytes"] < single["scratch_bytes"]  # per device: half the tokens
    assert any("mesh.ici={sequence: 2}" == o for o in sharded["overrides"])
    assert "| flash | 2 (sequence=2) | 64 | compiled |" in open(os.path.join(out, "results.md")).read()


def test_mesh_argument_is_checked():
    assert context_sweep.parse_mesh("data=2, sequence=4") == {"data": 2, "sequence": 4}
    assert context_sweep._mesh_devices(["--lengths", "64", "--mesh", "data=2,sequence=4"]) == 8
    for bad in ("sequence", "rows=2", "sequence=0", "sequence=2,sequence=2"):
        with pytest.raises(ValueError, match="--mesh"):
            context_sweep.parse_mesh(bad)
    with pytest.raises(SystemExit):  # more devices than JAX has (8 simulated in the tests)
        context_sweep.main(["--mesh", "sequence=16", "--out", "/nonexistent/never-written"])


def test_existing_results_are_resumed_not_recomputed(tmp_path):
    out = str(tmp_path / "sweep")
    os.makedirs(out)
    fake = {k: None for k in context_sweep.FIELDS}
    fake.update(backend="xla", length=64, status="ok", step_s=123.0, scratch_bytes=1,
                tokens_per_s=1.0)
    with open(os.path.join(out, "results.jsonl"), "w") as f:
        f.write(json.dumps(fake) + "\n")
    context_sweep.main(["--backends", "xla", "--lengths", "64", "128", "--out", out,
                        "--repeats", "1", *SMALL])
    rows = _rows(out)
    assert [(r["backend"], r["length"]) for r in rows] == [("xla", 64), ("xla", 128)]
    assert rows[0]["step_s"] == 123.0  # untouched


def test_over_budget_is_skipped_not_run(tmp_path, monkeypatch):
    out = str(tmp_path / "sweep")
    # A budget below what the shortest length compiles to: `oom` without running,
    # and every longer length is skipped from then on.
    context_sweep.main(["--backends", "xla", "--lengths", "64", "256", "--out", out,
                        "--repeats", "1", "--budget-gb", "1e-6", *SMALL])
    rows = {r["length"]: r for r in _rows(out)}
    assert rows[64]["status"] == "oom" and rows[64]["step_s"] is None
    assert rows[256]["status"] == "oom" and "shorter length" in rows[256]["message"]
    # Prediction from two measured lengths (scratch ~T^2, as xla's): a stand-in measure,
    # the real one runs above and in the other tests
    calls = []

    def fake_measure(cfg, **kw):
        calls.append(cfg.data.seq_len)
        return {"status": "ok", "step_s": 0.01, "scratch_bytes": cfg.data.seq_len ** 2,
                "compile_s": 0.0}

    monkeypatch.setattr(context_sweep, "measure", fake_measure)
    out2 = str(tmp_path / "sweep2")
    budget_gb = 128 ** 2 * 3 / 2**30  # 128 fits; 1024 predicted far above
    context_sweep.main(["--backends", "xla", "--lengths", "64", "128", "1024", "--out", out2,
                        "--repeats", "1", "--budget-gb", str(budget_gb), *SMALL])
    rows = {r["length"]: r for r in _rows(out2)}
    assert calls == [64, 128]
    assert rows[1024]["status"] == "oom-predicted" and rows[1024]["compile_s"] is None


@pytest.mark.slow
def test_quality_axis_trains_once_at_the_short_length_and_evaluates_every_length(
        tmp_path, monkeypatch):
    # speed / memory are tested above; here only the quality axis runs for real
    monkeypatch.setattr(context_sweep, "measure", lambda cfg, **kw: {
        "status": "ok", "step_s": 1.0, "scratch_bytes": 1, "compile_s": 0.0})
    out = str(tmp_path / "sweep")
    context_sweep.main(["--backends", "flash", "--lengths", "32", "64", "--out", out,
                        "--repeats", "1", "--task", "niah_single", "--train-steps", "2",
                        "--eval-examples", "2", *SMALL, "train.batch_size=8"])
    rows = _rows(out)
    assert [(r["length"], r["train_len"], r["task"]) for r in rows] == [
        (32, 32, "niah_single"), (64, 32, "niah_single")]
    for r in rows:
        assert 0 <= r["exact_match"] <= r["accuracy"] + 1e-9 <= 1 + 1e-9
        assert r["answer_logprob"] <= 0
    assert os.listdir(os.path.join(out, "runs")) == ["flash-train32"]  # one training run
    # --run-dir: evaluate that run instead of training a new one
    out2 = str(tmp_path / "sweep2")
    run = os.path.join(out, "runs", "flash-train32")
    context_sweep.main(["--backends", "flash", "--lengths", "32", "--out", out2, "--repeats", "1",
                        "--task", "niah_single", "--eval-examples", "2", "--run-dir",
                        f"flash={run}", *SMALL])
    again = _rows(out2)
    assert not os.path.exists(os.path.join(out2, "runs"))
    assert again[0]["accuracy"] == rows[0]["accuracy"]  # same model, same held-out examples
    assert again[0]["exact_match"] == rows[0]["exact_match"]
