"""Segment attention with long-term memory: ``config.py``, ``memory.py`` (the memories' math),
``mixer.py``, ``memory_tokens.py`` (the Recurrent Memory Transformer wrapper around the stack)."""
