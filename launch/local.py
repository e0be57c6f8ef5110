#!/usr/bin/env python3
"""N trainer processes on this machine (CPU), as one multi-controller JAX job.

    launch/local.sh -n 2 -d 4 -- --config experiments/configs/tiny.yaml train.steps=3

Starts ``python -m longctx.train ARGS`` N times with

    LONGCTX_COORDINATOR=localhost:<free port>  LONGCTX_NUM_PROCESSES=N  LONGCTX_PROCESS_ID=i
    XLA_FLAGS=--xla_force_host_platform_device_count=D  JAX_PLATFORMS=cpu

(other XLA flags already in XLA_FLAGS are kept), prefixes every output line of
process i with ``[pI]``, waits for all, and exits with the first failure's
status: when one process fails the others are stopped (SIGTERM, then SIGKILL
after --grace seconds) instead of waiting forever for their lost peer.
``--dry-run`` prints the N commands and starts nothing.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from launchlib import PREFIX, REPO_ROOT  # noqa: E402

_DEVCOUNT = re.compile(r"--xla_force_host_platform_device_count=\S*")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="launch/local.sh",
        usage="launch/local.sh [-n N] [-d D] [--port P] [--dry-run] -- TRAINER ARGS",
        description="Run N `python -m longctx.train` processes on this machine (CPU) as one "
                    "jax.distributed job.")
    p.add_argument("-n", "--num-processes", type=int, default=2, help="processes (default 2)")
    p.add_argument("-d", "--devices-per-process", type=int, default=4,
                   help="simulated CPU devices per process (default 4)")
    p.add_argument("--port", type=int, default=None, help="coordinator port (default: a free one)")
    p.add_argument("--grace", type=float, default=10.0,
                   help="seconds between SIGTERM and SIGKILL when stopping the others")
    p.add_argument("--python", default=sys.executable, help="interpreter for the trainers")
    p.add_argument("--dry-run", action="store_true", help="print the commands, start nothing")
    p.add_argument("trainer_args", nargs=argparse.REMAINDER,
                   help="after --: the arguments of python -m longctx.train")
    a = p.parse_args(argv)
    if a.trainer_args and a.trainer_args[0] == "--":
        a.trainer_args = a.trainer_args[1:]
    if a.num_processes < 1:
        p.error(f"-n {a.num_processes}: must be >= 1")
    if a.devices_per_process < 1:
        p.error(f"-d {a.devices_per_process}: must be >= 1")
    if a.port is not None and not 0 < a.port < 65536:
        p.error(f"--port {a.port}: not a TCP port")
    if "--config" not in a.trainer_args and not any(x.startswith("--config=")
                                                     for x in a.trainer_args):
        p.error("no trainer arguments: give them after --, e.g. "
                "-- --config experiments/configs/tiny.yaml train.steps=3")
    return a


def process_env(i: int, a, port: int, base=None) -> dict[str, str]:
    """The environment additions of process ``i``."""
    base = os.environ if base is None else base
    xla = _DEVCOUNT.sub("", base.get("XLA_FLAGS", "")).split()
    xla.append(f"--xla_force_host_platform_device_count={a.devices_per_process}")
    pypath = [REPO_ROOT] + [x for x in base.get("PYTHONPATH", "").split(os.pathsep) if x]
    return {
        "LONGCTX_COORDINATOR": f"localhost:{port}",
        "LONGCTX_NUM_PROCESSES": str(a.num_processes),
        "LONGCTX_PROCESS_ID": str(i),
        "XLA_FLAGS": " ".join(xla),
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": os.pathsep.join(pypath),  # this checkout, installed or not
        "PYTHONUNBUFFERED": "1",
        "TQDM_MININTERVAL": base.get("TQDM_MININTERVAL", "5"),  # a progress line each 5 s
    }


def command(a) -> list[str]:
    return [a.python, "-m", "longctx.train", *a.trainer_args]


def _pump(stream, tag: str, lock: threading.Lock) -> None:
    """Copy ``stream`` to stdout, ``tag`` before every line (\\r-separated progress
    bar refreshes count as lines)."""
    buf = b""
    while True:
        chunk = stream.read1(65536) if hasattr(stream, "read1") else stream.read(65536)
        if not chunk:
            break
        buf += chunk
        parts = re.split(rb"\r\n|\r|\n", buf)
        buf = parts.pop()
        _emit(parts, tag, lock)
    if buf:
        _emit([buf], tag, lock)


def _emit(lines, tag, lock) -> None:
    text = "".join(f"{tag} {ln.decode('utf-8', 'replace')}\n" for ln in lines if ln.strip())
    if text:
        with lock:
            sys.stdout.write(text)
            sys.stdout.flush()


def _stop(procs, grace: float) -> None:
    live = [p for p in procs if p.poll() is None]
    for p in live:
        p.send_signal(signal.SIGTERM)  # the trainer saves at a step boundary if it can
    deadline = time.monotonic() + grace
    for p in live:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def main(argv=None) -> int:
    a = parse_args(argv)
    port = a.port or free_port()
    cmd = command(a)
    if a.dry_run:
        print(f"# dry run: {a.num_processes} process(es) x {a.devices_per_process} CPU "
              "device(s), nothing is started")
        for i in range(a.num_processes):
            env = process_env(i, a, port)
            print(PREFIX + shlex.join(["env", *(f"{k}={v}" for k, v in env.items()), *cmd]))
        return 0

    lock = threading.Lock()
    procs, pumps = [], []
    print(f"[local] {a.num_processes} process(es) x {a.devices_per_process} CPU device(s), "
          f"coordinator localhost:{port}: {shlex.join(cmd)}", flush=True)
    try:
        for i in range(a.num_processes):
            p = subprocess.Popen(cmd, env={**os.environ, **process_env(i, a, port)},
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            procs.append(p)
            t = threading.Thread(target=_pump, args=(p.stdout, f"[p{i}]", lock), daemon=True)
            t.start()
            pumps.append(t)
        failed = None
        while True:
            codes = [p.poll() for p in procs]
            bad = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            if bad:
                failed = bad[0]
                print(f"[local] process {failed[0]} exited with {failed[1]}: stopping the others",
                      flush=True)
                _stop(procs, a.grace)
                break
            if all(c == 0 for c in codes):
                break
            time.sleep(0.2)
    except KeyboardInterrupt:
        print("[local] interrupted: stopping the processes", flush=True)
        _stop(procs, a.grace)
        return 130
    finally:
        for t in pumps:
            t.join(timeout=5)
    if failed is None:
        print(f"[local] all {a.num_processes} process(es) finished", flush=True)
        return 0
    rc = failed[1]
    return rc if rc > 0 else 128 - rc  # killed by signal -s: report 128 + s, as shells do


if __name__ == "__main__":
    sys.exit(main())
