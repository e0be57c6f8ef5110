"""Long-context evaluations on trainer checkpoints: ``python -m longctx.evals --run-dir DIR``."""

from longctx.evals.core import load_model, mqar_eval, passkey_eval, run

__all__ = ["load_model", "mqar_eval", "passkey_eval", "run"]
