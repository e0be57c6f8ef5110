"""python -m experiments.scaling end to end on a tiny model (2 training steps)."""

import json
import os

import pytest

from experiments import scaling as exp

SMALL = ["model.d_model=32", "model.mlp_dim=32", "model.n_layers=1", "model.n_heads=2",
         "model.n_kv_heads=2", "train.batch_size=8"]


@pytest.mark.slow
def test_length_knob_trains_once_evaluates_every_length_fits_and_plots(tmp_path):
    out = str(tmp_path / "scaling")
    rows, fit_rows = exp.main(["--knob", "length", "--values", "32", "48", "64", "--seeds", "1",
                               "--task", "niah_single", "--backends", "flash",
                               "--config", "experiments/configs/tiny.yaml", "--train-len", "32",
                               "--train-steps", "2", "--examples", "2", "--n-boot", "5",
                               "--out", out, *SMALL])
    assert [(r["backend"], r["value"], r["length"]) for r in rows] == [
        ("flash", 32.0, 32), ("flash", 48.0, 48), ("flash", 64.0, 64)]
    assert os.listdir(os.path.join(out, "runs")) == ["flash-s0"]  # trained once
    for r in rows:
        assert 0 <= r["exact_match"] <= r["accuracy"] + 1e-9 <= 1 + 1e-9
        assert r["answer_logprob"] <= 0
    saved = [json.loads(l) for l in open(os.path.join(out, "scaling.jsonl"))]
    assert [r["kind"] for r in saved] == ["point"] * 3 + ["fit"] * 3
    assert {r["metric"] for r in saved if r["kind"] == "fit"} == set(exp.METRICS)
    assert all(r["best"] in exp.scaling.CURVES for r in saved if r["kind"] == "fit")
    assert "| flash | exact_match |" in open(os.path.join(out, "scaling.md")).read()
    with open(os.path.join(out, "scaling.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # --refit: the same points fitted again from the file (no training), same fits
    rows2, fit_rows2 = exp.main(["--refit", os.path.join(out, "scaling.jsonl"), "--n-boot", "5",
                                 "--no-plot", "--out", str(tmp_path / "refit")])
    assert rows2 == rows and fit_rows2 == fit_rows
    md = open(tmp_path / "refit" / "scaling.md").read()
    em = [r["exact_match"] for r in rows if r["value"] == 48.0][0]
    assert f"| flash | 48 | 1 | {em:.3f} [{em:.3f}, {em:.3f}]" in md  # the points table
    assert not os.path.exists(tmp_path / "refit" / "scaling.png")


def test_bad_knob_or_task_fails_before_training(tmp_path):
    with pytest.raises(Exception, match="no_such_key"):
        exp.main(["--knob", "model.no_such_key", "--values", "1", "2", "3", "--task", "mqar",
                  "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        exp.main(["--knob", "length", "--values", "1", "--task", "nope", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):  # --task missing (and not --refit)
        exp.main(["--knob", "length", "--values", "1", "--out", str(tmp_path)])
