"""Training: the sharded loop, optimizer, loss, checkpoints, metrics.

``python -m longctx.train --config PATH [key=value ...]``
"""

from longctx.train.loop import loss_fn, make_optimizer, train

__all__ = ["loss_fn", "make_optimizer", "train"]
