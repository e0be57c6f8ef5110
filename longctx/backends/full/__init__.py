"""Exact softmax attention: ``config.py`` (section), ``ops.py`` (reference, flash, cuDNN), ``mixer.py``."""
