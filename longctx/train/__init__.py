"""Training: the loop, optimizer and loss. ``python -m longctx.train --config PATH [k=v ...]``."""

from longctx.train.loop import evaluate, loss_fn, make_optimizer, train

__all__ = ["evaluate", "loss_fn", "make_optimizer", "train"]
