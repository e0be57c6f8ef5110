"""Long-context evaluations on trainer checkpoints: ``python -m longctx.evals --run-dir DIR``;
scaling-curve fits (``longctx.evals.scaling.fit``)."""

from longctx.evals import scaling
from longctx.evals.core import load_model, mqar_eval, passkey_eval, run
from longctx.evals.perplexity import perplexity_eval
from longctx.evals.ruler import ruler_eval

__all__ = ["load_model", "mqar_eval", "passkey_eval", "perplexity_eval", "ruler_eval", "run", "scaling"]
