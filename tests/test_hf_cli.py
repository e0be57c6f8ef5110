"""The checkpoint CLI's two names: ``python -m longctx.hf`` and ``python -m longctx.convert``
(the name DESIGN.md documents) run one implementation. Needs no torch; the round trip
against transformers is in tests/test_hf.py."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_both_names_run_one_main():
    import longctx.convert
    import longctx.hf.__main__ as hf_main
    from longctx.hf import cli

    assert longctx.convert.main is cli.main and hf_main.main is cli.main


def test_python_m_longctx_hf_parses_its_arguments():
    for mod in ("longctx.hf", "longctx.convert"):
        out = subprocess.run([sys.executable, "-m", mod, "--from-hf", "nowhere"], cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 2, out.stderr  # argparse's usage error, before any work
        assert f"python -m {mod}" in out.stderr and "--from-hf needs --run-dir" in out.stderr
