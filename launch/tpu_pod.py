#!/usr/bin/env python3
"""Train on Cloud TPU VM slices (one, or several: multi-slice) with gcloud.

    python launch/tpu_pod.py --name my-v5p --zone us-east5-a --accelerator-type v5p-32 \\
        --config experiments/configs/base.yaml --run-dir gs://my-bucket/runs/base \\
        -- train.steps=20000 optim.lr=3e-4

What it does, each step one gcloud command printed as ``+ <command>``:

1. **Slice**: ``describe``; create it if missing (``tpu-vm create``, or ``queued-resources
   create`` with ``--queued`` / ``--num-slices``), reuse it if READY / ACTIVE, delete and
   recreate it if PREEMPTED / TERMINATED (queued: SUSPENDED / FAILED), wait while it is
   being created or queued.
2. **Code**: a tarball of the local git working tree (tracked and untracked files that git
   does not ignore: what you run locally is what runs there), ``scp`` to every worker
   (``--worker=all``), unpacked into ``~/longctx`` (replacing the previous copy).
3. **Install**: ``pip install -e '.[tpu]'`` on every worker.
4. **Train**: ``python -m longctx.train --config C [overrides] train.run_dir=gs://...`` on
   every worker at once; the same command and so the same run directory everywhere
   (orbax writes the checkpoints there; process 0 the metrics). With ``--num-slices N``
   also ``mesh.dcn={data: N}``: the slices form the outer ``data`` axis over DCN.
5. **Retry**: if the training command fails (or the slice is gone afterwards), check the
   state, recreate the slice if it was preempted (then 2-4 again) or stop leftover trainer
   processes if it is still READY, and rerun the same command, up to ``--max-retries``
   times. The trainer resumes from the last checkpoint in the run directory by itself.

0. **Preflight** (``--preflight``): before the slice is created or used, compile the job
   for the slice's topology here (``python -m longctx.compile --target ACCELERATOR
   --num-slices N``: compile-only TPU devices from libtpu, the trainer's own step and
   shardings) and stop with the compiler's figures (exit 3) when it does not fit HBM.

``--dry-run`` prints the whole plan (including the retry branch) and runs nothing.
Bad arguments stop before any command with an argparse error that names the value.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from launchlib import (REPO_ROOT, check_overrides, find_override, fmt,  # noqa: E402
                    repo_config_path, validate_config)

# Default runtime (software) version per TPU family: the documented names when this was
# written. Check `gcloud compute tpus tpu-vm versions list --zone=ZONE` and pass --version.
RUNTIME_VERSIONS = {
    "v5litepod": "v2-alpha-tpuv5-lite",  # v5e
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",  # Trillium
    "v4": "tpu-ubuntu2204-base",
    "v3": "tpu-ubuntu2204-base",
    "v2": "tpu-ubuntu2204-base",
}
# In these families the number in the accelerator type counts TensorCores (2 per chip,
# 4 chips = 8 cores per host); in the others (v5litepod, v6e) it counts chips (one host
# holds up to 8 chips alone, 4 chips per host in multi-host slices).
CORE_COUNTED = {"v2", "v3", "v4", "v5p"}

READY = {"READY", "ACTIVE"}  # tpu-vm node / queued resource
GONE = {"PREEMPTED", "TERMINATED", "SUSPENDED", "SUSPENDING", "FAILED"}  # delete + recreate
NOT_FOUND = "NOT_FOUND"

PID_FILE = "$HOME/longctx-train.pid"
TARBALL = "longctx-code.tar.gz"  # in the remote home directory

_ACCEL = re.compile(r"^(v\d+[a-z]*)-(\d+)$")
_NAME = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
_ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
_REMOTE_DIR = re.compile(r"^[A-Za-z0-9_.][A-Za-z0-9_.\-/]*$")


def parse_accelerator(accel: str) -> tuple[str, int, int]:
    """``"v5p-32"`` -> (family, number, hosts per slice). ValueError if malformed."""
    m = _ACCEL.match(accel)
    if not m or int(m.group(2)) < 1:
        raise ValueError(accel)
    family, n = m.group(1), int(m.group(2))
    if family in CORE_COUNTED:
        hosts = max(1, n // 8)
    else:
        hosts = 1 if n <= 8 else n // 4
    return family, n, hosts


class LaunchError(RuntimeError):
    pass


@dataclasses.dataclass
class Result:
    rc: int
    out: str = ""
    err: str = ""


class Shell:
    """Runs a command for real, echoing it first (``+ ...``); ``capture`` keeps its output."""

    def __call__(self, argv, *, capture: bool = False) -> Result:
        print(fmt(argv), flush=True)
        try:
            p = subprocess.run(argv, text=True, capture_output=capture)
        except FileNotFoundError as e:
            raise LaunchError(f"{argv[0]}: command not found ({e})") from None
        return Result(p.returncode, p.stdout or "", p.stderr or "")


# ----------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="launch/tpu_pod.py",
        description="Create or reuse a Cloud TPU slice, sync this repository, install it, and "
                    "run `python -m longctx.train` on every worker; retry after preemption.",
        epilog="Overrides (key=value) come last, after `--` if you like. See launch/README.md.")
    g = p.add_argument_group("slice")
    g.add_argument("--name", required=True, help="TPU VM (or queued resource) name")
    g.add_argument("--zone", required=True, help="e.g. us-east5-a (where the type is offered)")
    g.add_argument("--accelerator-type", required=True,
                   help="e.g. v5litepod-16, v5p-32, v6e-16, v4-32")
    g.add_argument("--version", default=None,
                   help="TPU runtime version (default by family: "
                        + ", ".join(f"{k}: {v}" for k, v in RUNTIME_VERSIONS.items()) + ")")
    g.add_argument("--project", default=None, help="GCP project (default: gcloud's)")
    g.add_argument("--queued", action="store_true",
                   help="create through queued resources (waits in the queue for capacity)")
    g.add_argument("--num-slices", type=int, default=1,
                   help="multi-slice: N slices over DCN (queued resources, mesh.dcn={data: N})")
    g.add_argument("--spot", action="store_true", help="Spot capacity (preemptible; cheaper)")
    g.add_argument("--delete-when-done", action="store_true",
                   help="delete the slice after training finished successfully")
    r = p.add_argument_group("run")
    r.add_argument("--config", required=True, help="YAML config inside this repository")
    r.add_argument("--run-dir", default=None,
                   help="gs://BUCKET/PATH: the one run directory of every worker (checkpoints, "
                        "metrics; the trainer resumes from it)")
    r.add_argument("--max-retries", type=int, default=3,
                   help="rerun the training command up to N times after a failure or "
                        "preemption (default 3)")
    r.add_argument("--python", default="python3",
                   help="Python on the workers (a shell word, e.g. ~/.venv/bin/python)")
    r.add_argument("--setup", default=None,
                   help="shell command run on every worker before the install "
                        "(e.g. to create a Python >= 3.11 environment)")
    r.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable for the trainer (repeatable)")
    r.add_argument("--remote-dir", default="longctx",
                   help="where the code goes on the workers, relative to $HOME")
    r.add_argument("--poll-interval", type=float, default=30.0,
                   help="seconds between state checks while waiting")
    r.add_argument("--wait-timeout", type=float, default=0.0,
                   help="give up waiting for the slice after this many seconds (0: never)")
    r.add_argument("--tmp-dir", default=tempfile.gettempdir(),
                   help="where the local tarball is written")
    p.add_argument("--preflight", action="store_true",
                   help="compile the job for the slice's topology here first (libtpu, "
                        "python -m longctx.compile) and stop if it does not fit HBM")
    p.add_argument("--dry-run", action="store_true",
                   help="print every command (one per line, `+ ` prefix) and run nothing")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="trainer config overrides")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """Parse and check everything that can be checked before a command runs."""
    p = build_parser()
    a = p.parse_args(argv)
    if not _NAME.match(a.name):
        p.error(f"--name {a.name!r}: lower-case letters, digits and '-', starting with a "
                "letter, at most 63 characters")
    if not a.zone.strip():
        p.error("--zone is empty: give the zone of the slice, e.g. us-east5-a")
    try:
        a.family, _, a.hosts = parse_accelerator(a.accelerator_type)
    except ValueError:
        p.error(f"--accelerator-type {a.accelerator_type!r} is not a TPU type like "
                "v5litepod-16, v5p-32, v6e-16 or v4-8")
    if a.version is None:
        a.version = RUNTIME_VERSIONS.get(a.family)
        if a.version is None:
            p.error(f"no default runtime version for {a.family!r} ({a.accelerator_type}): "
                    "pass --version (see `gcloud compute tpus tpu-vm versions list --zone=ZONE`)")
    if a.num_slices < 1:
        p.error(f"--num-slices {a.num_slices}: must be >= 1")
    if a.max_retries < 0:
        p.error(f"--max-retries {a.max_retries}: must be >= 0")
    if a.poll_interval <= 0:
        p.error(f"--poll-interval {a.poll_interval}: must be > 0")
    a.queued = a.queued or a.num_slices > 1
    for e in a.env:
        if not _ENV.match(e):
            p.error(f"--env {e!r} is not KEY=VALUE")
    if not _REMOTE_DIR.match(a.remote_dir) or ".." in a.remote_dir.split("/"):
        p.error(f"--remote-dir {a.remote_dir!r}: a plain path relative to $HOME")

    # overrides: key=value; the run directory from --run-dir (or one train.run_dir=...)
    ov = check_overrides(a.overrides, p.error)
    in_ov = find_override(ov, "train.run_dir")
    if a.run_dir and in_ov is not None and in_ov != a.run_dir:
        p.error(f"--run-dir {a.run_dir!r} and train.run_dir={in_ov} disagree: give one")
    a.run_dir = a.run_dir or in_ov
    if not a.run_dir:
        p.error("--run-dir is required: gs://BUCKET/PATH, the one run directory that every "
                "worker writes and that a retry resumes from")
    ov = [o for o in ov if o.partition("=")[0].strip() != "train.run_dir"]
    multi_host = a.hosts > 1 or a.num_slices > 1
    if not a.run_dir.startswith("gs://"):
        if multi_host:
            p.error(f"run dir {a.run_dir!r} is not on GCS: a multi-host run "
                    f"({a.accelerator_type} = {a.hosts} hosts x {a.num_slices} slice(s)) needs "
                    "one shared run directory, gs://BUCKET/PATH")
        a.warnings = [f"# warning: run dir {a.run_dir!r} is local to the TPU VM: a recreated "
                      "VM starts empty, so a retry after preemption restarts from step 0 "
                      "(use gs://BUCKET/PATH)"]
    else:
        a.warnings = []

    # multi-slice: the slices are the outer data axis over DCN
    dcn = find_override(ov, "mesh.dcn")
    if dcn is not None:
        n = _dcn_slices(dcn, p.error)
        if n != a.num_slices:
            p.error(f"mesh.dcn={dcn} describes {n} slice(s) but --num-slices is "
                    f"{a.num_slices}: drop the override (the launcher sets "
                    "mesh.dcn={data: N}) or make them agree")
    elif a.num_slices > 1:
        ov.append(f"mesh.dcn={{data: {a.num_slices}}}")
    ov.append(f"train.run_dir={a.run_dir}")
    a.train_overrides = ov

    a.config_rel = repo_config_path(a.config, p.error)
    validate_config(a.config_rel, ov, p.error)
    return a


def _dcn_slices(raw: str, error) -> int:
    try:
        import yaml

        d = yaml.safe_load(raw)
        return math.prod(int(v) for v in (d or {}).values())
    except Exception:  # noqa: BLE001
        error(f"mesh.dcn={raw}: expected a mapping like {{data: 2}}")
    return 0


# ----------------------------------------------------------------------------
# The launcher
# ----------------------------------------------------------------------------


class TpuPod:
    """Builds the gcloud commands and runs the create / sync / install / train / retry loop.

    ``runner(argv, capture=False) -> Result`` runs one command (tests pass a fake);
    ``sleep`` waits between state checks.
    """

    def __init__(self, args, runner=None, sleep=time.sleep, clock=time.monotonic, log=None):
        self.a = args
        self.run_cmd = runner or Shell()
        self.sleep, self.clock = sleep, clock
        self.log = log or (lambda msg: print(msg, flush=True))
        self.creations = 0
        self.tarball = os.path.join(args.tmp_dir, f"longctx-{args.name}.tar.gz")
        self.filelist = os.path.join(args.tmp_dir, f"longctx-{args.name}.files")
        self._tar_done = False

    # -- gcloud commands ------------------------------------------------------------------

    @property
    def group(self) -> list[str]:
        return ["gcloud", "compute", "tpus", "queued-resources" if self.a.queued else "tpu-vm"]

    def _where(self) -> list[str]:
        w = [f"--zone={self.a.zone}"]
        if self.a.project:
            w.append(f"--project={self.a.project}")
        return w

    def _all_workers(self) -> list[str]:
        return ["--worker=all", "--node=all"] if self.a.queued else ["--worker=all"]

    def describe_cmd(self) -> list[str]:
        fmt_ = "value(state.state)" if self.a.queued else "value(state)"
        return [*self.group, "describe", self.a.name, *self._where(), "--format", fmt_]

    def create_cmd(self) -> list[str]:
        a = self.a
        cmd = [*self.group, "create", a.name, *self._where(),
               f"--accelerator-type={a.accelerator_type}"]
        if a.queued:
            cmd.append(f"--runtime-version={a.version}")
            if a.num_slices > 1:
                cmd += [f"--node-count={a.num_slices}", f"--node-prefix={a.name}"]
            else:
                cmd.append(f"--node-id={a.name}")
        else:
            cmd.append(f"--version={a.version}")
        if a.spot:
            cmd.append("--spot")
        return [*cmd, "--quiet"]

    def delete_cmd(self) -> list[str]:
        extra = ["--force"] if self.a.queued else []  # queued: delete its nodes too
        return [*self.group, "delete", self.a.name, *self._where(), *extra, "--quiet"]

    def start_cmd(self) -> list[str]:
        return [*self.group, "start", self.a.name, *self._where(), "--quiet"]

    def scp_cmd(self, local: str, remote: str) -> list[str]:
        return [*self.group, "scp", local, f"{self.a.name}:{remote}", *self._where(),
                *self._all_workers(), "--quiet"]

    def ssh_cmd(self, command: str) -> list[str]:
        return [*self.group, "ssh", self.a.name, *self._where(), *self._all_workers(),
                "--quiet", "--command", command]

    # -- local tarball of the git tree ------------------------------------------------------

    def ls_files_cmd(self) -> list[str]:
        return ["git", "-C", REPO_ROOT, "ls-files", "-z", "--cached", "--others",
                "--exclude-standard"]

    def tar_cmd(self) -> list[str]:
        return ["tar", "-czf", self.tarball, "-C", REPO_ROOT, "--null", "-T", self.filelist]

    # -- remote shell commands --------------------------------------------------------------

    @property
    def remote(self) -> str:
        return f'"$HOME"/{self.a.remote_dir}'

    def unpack_remote(self) -> str:
        d = self.remote
        return (f"rm -rf {d} && mkdir -p {d} && tar -xzf \"$HOME\"/{TARBALL} -C {d} "
                f"&& rm -f \"$HOME\"/{TARBALL}")

    def install_remote(self) -> str:
        pre = f"{self.a.setup} && " if self.a.setup else ""
        return f"{pre}cd {self.remote} && {self.a.python} -m pip install -e \".[tpu]\""

    def preflight_cmd(self) -> list[str]:
        """Compile the job for this slice here (the training overrides, no run directory)."""
        ov = [o for o in self.a.train_overrides if not o.startswith("train.run_dir=")]
        return [sys.executable, "-m", "longctx.compile",
                "--config", os.path.join(REPO_ROOT, self.a.config_rel),
                "--target", self.a.accelerator_type, "--num-slices", str(self.a.num_slices), *ov]

    def preflight(self) -> int:
        """0 when the job fits the slice; else the compile's exit status (3: does not fit)."""
        rc = self.run_cmd(self.preflight_cmd()).rc
        if rc == 3:
            self.log(f"# preflight: the job does not fit {self.a.accelerator_type} (figures "
                     "above); nothing was created or run")
        elif rc:
            self.log(f"# preflight: compiling for {self.a.accelerator_type} failed (exit {rc}); "
                     "nothing was created or run")
        return rc

    def train_argv(self) -> list[str]:
        return ["-m", "longctx.train", "--config", self.a.config_rel, *self.a.train_overrides]

    def train_remote(self) -> str:
        # LONGCTX_DISTRIBUTED=1: jax.distributed.initialize() (the coordinator comes from the
        # TPU metadata server; TPU VMs do not export TPU_WORKER_HOSTNAMES themselves).
        env = "env " + " ".join(shlex.quote(e) for e in ["LONGCTX_DISTRIBUTED=1", *self.a.env]) + " "
        # the pid file lets a retry stop a leftover trainer (exec: the shell becomes python)
        return (f"cd {self.remote} && echo $$ > \"{PID_FILE}\" && exec {env}{self.a.python} "
                + shlex.join(self.train_argv()))

    @staticmethod
    def cleanup_remote() -> str:
        """Stop a trainer left over from the failed attempt (it may hold the TPU)."""
        return (f"P=\"{PID_FILE}\"; if [ -f \"$P\" ]; then pid=$(cat \"$P\"); "
                "if grep -q longctx.train /proc/$pid/cmdline 2>/dev/null; then "
                "kill -TERM $pid; for i in $(seq 60); do kill -0 $pid 2>/dev/null || break; "
                "sleep 1; done; kill -KILL $pid 2>/dev/null; fi; rm -f \"$P\"; fi; "
                "rm -f /tmp/libtpu_lockfile; true")

    # -- the plan (--dry-run) -------------------------------------------------------------------

    def plan(self) -> list[str]:
        a = self.a
        kind = "queued resource" if a.queued else "TPU VM"
        ready = "ACTIVE" if a.queued else "READY"
        gone = "SUSPENDED/FAILED" if a.queued else "PREEMPTED/TERMINATED"
        slices = f" x {a.num_slices} slices (DCN)" if a.num_slices > 1 else ""
        L = ["# dry run: nothing is created or run",
             f"# {kind} {a.name!r} in {a.zone}: {a.accelerator_type} ({a.hosts} host(s) per "
             f"slice){slices}, runtime {a.version}; run dir {a.run_dir}",
             *a.warnings]
        if a.preflight:
            L += [f"# 0. preflight: compile the job for {a.accelerator_type} here; stop (exit 3) "
                  "if it does not fit",
                  fmt(self.preflight_cmd())]
        L += [f"# 1. the slice: reuse it if {ready}, create it if missing; if {gone}: delete "
             "and recreate",
             fmt(self.describe_cmd()),
             fmt(self.create_cmd())]
        if a.queued:
            L += [f"#    wait (every {a.poll_interval:g} s) until the state is {ready}",
                  fmt(self.describe_cmd())]
        L += ["# 2. the code: a tarball of the git working tree (tracked + untracked, not "
              "ignored), to every worker",
              fmt(self.ls_files_cmd()),
              fmt(self.tar_cmd()),
              fmt(self.scp_cmd(self.tarball, TARBALL)),
              fmt(self.ssh_cmd(self.unpack_remote())),
              "# 3. install on every worker",
              fmt(self.ssh_cmd(self.install_remote())),
              "# 4. train on every worker (one command: one run directory)",
              fmt(self.ssh_cmd(self.train_remote())),
              f"#    then check that the slice is still {ready}",
              fmt(self.describe_cmd())]
        if a.max_retries:
            L += [f"# 5. if step 4 failed or the slice is not {ready}: up to {a.max_retries} "
                  "retries of the same command (the trainer resumes from the run dir)",
                  f"#    if {gone}: delete, recreate, then steps 2-4",
                  fmt(self.delete_cmd()),
                  fmt(self.create_cmd()),
                  f"#    if still {ready}: stop the leftover trainer, then step 4",
                  fmt(self.ssh_cmd(self.cleanup_remote())),
                  fmt(self.ssh_cmd(self.train_remote()))]
        else:
            L.append("# 5. --max-retries 0: no retry")
        if a.delete_when_done:
            L += ["# 6. after success: delete the slice", fmt(self.delete_cmd())]
        return L

    # -- running -------------------------------------------------------------------------------

    def _check(self, argv, what: str, *, capture: bool = False) -> Result:
        r = self.run_cmd(argv, capture=capture)
        if r.rc != 0:
            raise LaunchError(f"{what} failed (exit {r.rc}){': ' + r.err.strip() if r.err else ''}")
        return r

    def state(self, tries: int = 3) -> str:
        """The slice's state, NOT_FOUND if it does not exist; a failing describe (auth,
        network) is tried ``tries`` times, ``--poll-interval`` apart."""
        for i in range(tries):
            r = self.run_cmd(self.describe_cmd(), capture=True)
            if r.rc == 0:
                return (r.out.strip().splitlines() or ["UNKNOWN"])[-1].strip()
            text = (r.err + r.out).lower()
            if "not_found" in text or "not found" in text:
                return NOT_FOUND
            if i + 1 < tries:
                self.log(f"# describe failed ({r.err.strip()[:200]}): trying again")
                self.sleep(self.a.poll_interval)
        raise LaunchError(f"cannot read the state of {self.a.name}: {r.err.strip()}")

    def ensure_ready(self, state: str | None = None) -> bool:
        """Bring the slice to READY / ACTIVE; True if it was (re)created.

        ``state``: the state just read, if any (saves one describe)."""
        created, t0 = False, self.clock()
        while True:
            st, state = state or self.state(), None
            if st in READY:
                return created
            if st == NOT_FOUND:
                if self.creations > self.a.max_retries:
                    raise LaunchError(f"{self.a.name} created {self.creations} times already; "
                                      "giving up (see --max-retries)")
                self.log(f"# creating {self.a.name}")
                self._check(self.create_cmd(), "create")
                self.creations += 1
                created = True
                continue
            if st in GONE:
                if created and st == "FAILED":
                    raise LaunchError(f"{self.a.name} is FAILED right after creation: see "
                                      + shlex.join(self.describe_cmd()[:-2]))
                self.log(f"# {self.a.name} is {st}: deleting it to recreate it")
                self._check(self.delete_cmd(), "delete")
                continue
            if st == "STOPPED" and not self.a.queued:
                self._check(self.start_cmd(), "start")
                continue
            if self.a.wait_timeout and self.clock() - t0 > self.a.wait_timeout:
                raise LaunchError(f"{self.a.name} still {st} after {self.a.wait_timeout:g} s")
            self.log(f"# {self.a.name} is {st}: waiting {self.a.poll_interval:g} s")
            self.sleep(self.a.poll_interval)

    def make_tarball(self) -> None:
        if self._tar_done:
            return
        r = self._check(self.ls_files_cmd(), "git ls-files", capture=True)
        files = [f for f in r.out.split("\0")
                 if f and os.path.lexists(os.path.join(REPO_ROOT, f))]  # skip deleted files
        os.makedirs(self.a.tmp_dir, exist_ok=True)
        with open(self.filelist, "w") as fh:
            fh.write("\0".join(files) + ("\0" if files else ""))
        self._check(self.tar_cmd(), "tar")
        self._tar_done = True

    def sync_and_install(self) -> None:
        self.make_tarball()
        self._check(self.scp_cmd(self.tarball, TARBALL), "scp of the code")
        self._check(self.ssh_cmd(self.unpack_remote()), "unpacking the code")
        self._check(self.ssh_cmd(self.install_remote()), "pip install")

    def run(self) -> int:
        for w in self.a.warnings:
            self.log(w)
        if self.a.preflight:
            rc = self.preflight()
            if rc:
                return rc
        self.ensure_ready()
        self.sync_and_install()
        attempt = 0
        while True:
            self.log(f"# training (attempt {attempt + 1} of {self.a.max_retries + 1})")
            rc = self.run_cmd(self.ssh_cmd(self.train_remote())).rc
            st = self.state()
            if rc == 0 and st in READY:
                self.log("# training finished")
                if self.a.delete_when_done:
                    self._check(self.delete_cmd(), "delete")
                return 0
            if attempt >= self.a.max_retries:
                self.log(f"# giving up after {attempt + 1} attempt(s): training exit {rc}, "
                         f"slice {st}")
                return rc or 1
            attempt += 1
            self.log(f"# training exit {rc}, slice {st}: retry {attempt} of "
                     f"{self.a.max_retries}")
            if st in READY:
                self.run_cmd(self.ssh_cmd(self.cleanup_remote()))
            else:
                self.ensure_ready(st)
                self.sync_and_install()


def main(argv=None, *, runner=None, sleep=time.sleep) -> int:
    args = parse_args(argv)
    pod = TpuPod(args, runner=runner, sleep=sleep)
    if args.dry_run:
        print("\n".join(pod.plan()), flush=True)
        return 0
    try:
        return pod.run()
    except LaunchError as e:
        print(f"tpu_pod: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("tpu_pod: interrupted (the slice is left as it is)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
