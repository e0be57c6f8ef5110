"""``python -m longctx.convert --from-hf DIR --run-dir RUN | --to-hf RUN --out DIR``.

The name DESIGN.md documents for the checkpoint CLI, kept as the contract says; the
checkpoint CLI is ``python -m longctx.hf``, and both run :func:`longctx.hf.cli.main` (one
implementation).
"""

from longctx.hf.cli import main

if __name__ == "__main__":
    main(prog="python -m longctx.convert")
