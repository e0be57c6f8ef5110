"""python -m longctx.train --config PATH [key=value ...]

Exit status: 0 when training finished, 75 (EX_TEMPFAIL) when it stopped on
SIGTERM after saving a checkpoint, so that launchers retry and resume.
"""

import argparse
import logging
import sys

from longctx.config import ConfigError, load_config
from longctx.train.loop import train

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: try again (the run resumes from its checkpoint)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m longctx.train",
                                description="Train a longctx model from a YAML config.")
    p.add_argument("--config", required=True, help="YAML config (overlays the defaults)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        force=True)  # imported libraries may have configured logging already
    for noisy in ("absl", "orbax"):  # their INFO lines narrate every checkpoint write
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    final = train(cfg, progress=not args.no_progress)
    print({k: round(v, 4) if isinstance(v, float) else v for k, v in final.items()})
    if final.get("status") == "preempted":
        sys.exit(PREEMPTED_EXIT_CODE)


if __name__ == "__main__":
    main()
