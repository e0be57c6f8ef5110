"""Mixture-of-Experts feed-forward: ``config.py`` (section), ``ops.py`` (routing, dispatch, losses,
reference), ``layer.py`` (the Flax module)."""
