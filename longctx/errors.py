"""The config error and its check, shared by the schema and every backend's config section.

Jax-free (imported by ``longctx.config`` and the ``config.py`` of each backend).
"""


class ConfigError(ValueError):
    """A config that cannot work; the message names the key and the values."""


def require(ok: bool, msg: str) -> None:
    """Raise :class:`ConfigError` with ``msg`` unless ``ok``."""
    if not ok:
        raise ConfigError(msg)
