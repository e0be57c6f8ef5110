"""python -m longctx.train --config PATH [key=value ...]"""

import argparse
import logging
import sys

from longctx.config import ConfigError, load_config
from longctx.train.loop import train


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m longctx.train",
                                description="Train a longctx model from a YAML config.")
    p.add_argument("--config", required=True, help="YAML config (overlays the defaults)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    final = train(cfg, progress=not args.no_progress)
    print({k: round(v, 4) if isinstance(v, float) else v for k, v in final.items()})


if __name__ == "__main__":
    main()
