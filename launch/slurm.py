#!/usr/bin/env python3
"""Render launch/slurm.sbatch for a number of nodes and GPUs and submit it with sbatch.

    python launch/slurm.py --nodes 2 --gpus-per-node 8 --config experiments/configs/base.yaml \\
        --partition gpu --time 48:00:00 -- train.run_dir=/shared/runs/base train.steps=20000

The job script is launch/slurm.sbatch with its ``#SBATCH`` block replaced by the
directives for these arguments (one task per GPU: ntasks-per-node = GPUs per node);
it is written to ``--script`` (default ``./<job-name>.sbatch``) and submitted as
``sbatch SCRIPT CONFIG [key=value ...]``. ``--dry-run`` prints the script and the
sbatch command and writes / submits nothing (no SLURM needed).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from launchlib import (check_overrides, find_override, fmt, repo_config_path,  # noqa: E402
                    validate_config)

TEMPLATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "slurm.sbatch")
_TIME = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$")
_WORD = re.compile(r"^[A-Za-z0-9_.,:@%\-]+$")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="launch/slurm.py",
        description="Render and submit the longctx SLURM job (one process per GPU).")
    p.add_argument("--config", required=True, help="YAML config inside this repository")
    p.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=8,
                   help="GPUs per node = tasks per node (default 8)")
    p.add_argument("--cpus-per-task", type=int, default=8, help="CPU cores per task (default 8)")
    p.add_argument("--time", default="24:00:00", help="time limit (default 24:00:00)")
    p.add_argument("--job-name", default="longctx")
    p.add_argument("--partition", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--qos", default=None)
    p.add_argument("--gres", action="store_true",
                   help="ask for GPUs as --gres=gpu:N (older clusters) instead of --gpus-per-node")
    p.add_argument("--signal-lead", type=int, default=300,
                   help="seconds before the time limit to checkpoint and requeue (default 300)")
    p.add_argument("--output", default="slurm-%x-%j.out", help="log file pattern")
    p.add_argument("--script", default=None,
                   help="where to write the rendered job script (default ./JOB_NAME.sbatch)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the job script and the sbatch command; write and submit nothing")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="trainer config overrides")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    a = p.parse_args(argv)
    for name in ("nodes", "gpus_per_node", "cpus_per_task", "signal_lead"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} {getattr(a, name)}: must be >= 1")
    if not _TIME.match(a.time):
        p.error(f"--time {a.time!r}: expected [D-]HH:MM:SS, MM:SS or minutes")
    for name in ("job_name", "partition", "account", "qos"):
        v = getattr(a, name)
        if v is not None and not _WORD.match(v):
            p.error(f"--{name.replace('_', '-')} {v!r}: unexpected characters")
    a.overrides = check_overrides(a.overrides, p.error)
    a.config_rel = repo_config_path(a.config, p.error)
    cfg = validate_config(a.config_rel, a.overrides, p.error)
    run_dir = find_override(a.overrides, "train.run_dir")
    a.notes = []
    if run_dir is None:
        a.notes.append("# note: train.run_dir comes from the config"
                       + (f" ({cfg.train.run_dir})" if cfg is not None else "")
                       + ", relative to the submit directory; it must be on a filesystem "
                         "every node shares (requeued runs resume from it)")
    a.script = a.script or f"{a.job_name}.sbatch"
    return a


def directives(a) -> list[str]:
    gpus = f"--gres=gpu:{a.gpus_per_node}" if a.gres else f"--gpus-per-node={a.gpus_per_node}"
    d = [f"--job-name={a.job_name}", f"--nodes={a.nodes}",
         f"--ntasks-per-node={a.gpus_per_node}", gpus, f"--cpus-per-task={a.cpus_per_task}",
         f"--time={a.time}"]
    d += [f"--{k}={v}" for k, v in (("partition", a.partition), ("account", a.account),
                                     ("qos", a.qos)) if v]
    d += ["--requeue", f"--signal=B:USR1@{a.signal_lead}", "--open-mode=append",
          f"--output={a.output}"]
    return [f"#SBATCH {x}" for x in d]


def render(a) -> str:
    """The template with its #SBATCH block replaced by this job's directives."""
    lines = open(TEMPLATE).read().splitlines()
    idx = [i for i, line in enumerate(lines) if line.startswith("#SBATCH")]
    if not idx:
        raise RuntimeError(f"{TEMPLATE} has no #SBATCH block")
    rest = [x for x in lines[idx[0]:] if not x.startswith("#SBATCH")]
    out = lines[:idx[0]] + directives(a) + rest
    return "\n".join(out) + "\n"


def sbatch_cmd(a) -> list[str]:
    return ["sbatch", a.script, a.config_rel, *a.overrides]


def main(argv=None) -> int:
    a = parse_args(argv)
    text = render(a)
    if a.dry_run:
        print("# dry run: nothing is written or submitted")
        for n in a.notes:
            print(n)
        print(f"# ---- job script (would be written to {a.script}) ----")
        print(text, end="")
        print("# ---- end of job script ----")
        print(fmt(sbatch_cmd(a)))
        return 0
    for n in a.notes:
        print(n, file=sys.stderr)
    with open(a.script, "w") as f:
        f.write(text)
    os.chmod(a.script, 0o755)
    print(f"# job script written to {a.script}")
    print(fmt(sbatch_cmd(a)), flush=True)
    try:
        return subprocess.run(sbatch_cmd(a)).returncode
    except FileNotFoundError:
        print("slurm.py: error: sbatch not found (not on a SLURM login node?); the job "
              f"script is in {a.script}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
