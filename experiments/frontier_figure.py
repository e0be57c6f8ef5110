"""Draw the recorded context-sweep frontier (docs/results/context_sweep.md) as a figure.

    python -m experiments.frontier_figure          # -> docs/results/img/context_sweep_frontier.png

The rows are those of the page's table (default sweep, 2-core CPU, 2026-12-03; the 8-device
flash row compiled only), drawn with the sweep's own :func:`experiments.context_sweep.plot`,
so the figure is what ``python -m experiments.context_sweep`` writes as ``frontier.png``.
"""

from __future__ import annotations

import os

from experiments.context_sweep import plot

OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs",
                   "results", "img", "context_sweep_frontier.png")
LENGTHS = [1024, 4096, 16384, 65536, 262144, 1048576]
# backend -> (step seconds, compiled scratch MiB) per length; None: predicted over a budget.
ROWS = {
    "flash": [(0.037, 19), (0.27, 70), (3.0, 278), (51.2, 1110), None, None],
    "xla": [(0.15, 67), (2.4, 1190), None, None, None, None],
    "linear": [(0.027, 26), (0.13, 103), (0.58, 410), (2.5, 442), (9.8, 442), (36.1, 439)],
    "recurrent": [(0.057, 13.4), (0.22, 13.4), (0.92, 13.4), (3.6, 13.4), (15.2, 13.4),
                  (60.7, 13.5)],
}
FLASH_8_DEVICES_MIB = [2.4, 12.4, 35.3, 138.9, 555.2, 2220]  # --mesh sequence=8 --compile-only


def rows() -> list[dict]:
    out = []
    for backend, cells in ROWS.items():
        for length, cell in zip(LENGTHS, cells):
            if cell:
                out.append(dict(backend=backend, length=length, status="ok", step_s=cell[0],
                                scratch_bytes=cell[1] * 2**20))
    for length, mib in zip(LENGTHS, FLASH_8_DEVICES_MIB):
        out.append(dict(backend="flash", mesh="sequence=8", devices=8, length=length,
                        status="compiled", scratch_bytes=mib * 2**20))
    return out


if __name__ == "__main__":
    plot(rows(), OUT, budget_bytes=8 * 2**30)
    print(f"wrote {OUT}")
