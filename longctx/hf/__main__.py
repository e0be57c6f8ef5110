"""``python -m longctx.hf --from-hf DIR --run-dir RUN | --to-hf RUN --out DIR``: see
:mod:`longctx.hf.cli`."""

from longctx.hf.cli import main

if __name__ == "__main__":
    main()
