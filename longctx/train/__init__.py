"""Training: the sharded loop, its optimizer, loss and steps, train state, checkpoints, metrics.

``python -m longctx.train --config PATH [key=value ...]``
"""

from longctx.train.loop import train
from longctx.train.optimizer import make_optimizer
from longctx.train.state import TrainState
from longctx.train.step import loss_fn, make_eval_step, make_train_step, segment_value_and_grad

__all__ = ["TrainState", "loss_fn", "make_eval_step", "make_optimizer", "make_train_step",
           "segment_value_and_grad", "train"]
