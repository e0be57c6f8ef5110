"""Linear attention family: ``config.py``, ``ops.py`` (parallel / recurrent / chunk forms), ``mixer.py``."""
