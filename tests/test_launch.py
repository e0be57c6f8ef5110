"""launch/: TPU pod launcher (dry run, argument checks, retry loop with a fake gcloud),
SLURM renderer and job script, local multi-process launcher (really runs 2 processes)."""

import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from longctx.config import load_config
from longctx.train import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch")
TINY = "experiments/configs/tiny.yaml"


def _load(name):
    path = os.path.join(LAUNCH, f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"launch_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


tpu_pod = _load("tpu_pod")
slurm = _load("slurm")
local = _load("local")


def _commands(out: str) -> list[list[str]]:
    """The `+ ` lines of a plan as argv lists; every other line must be a comment."""
    cmds = []
    for line in out.splitlines():
        if line.startswith("+ "):
            cmds.append(shlex.split(line[2:]))
        else:
            assert line.startswith("#"), line
    return cmds


def _remote(cmd: list[str]) -> str:
    return cmd[cmd.index("--command") + 1]


POD = ["--name", "my-v5p", "--zone", "us-east5-a", "--accelerator-type", "v5p-32",
       "--config", TINY, "--run-dir", "gs://bkt/runs/a"]


# ----------------------------------------------------------------------------
# TPU pods
# ----------------------------------------------------------------------------


def test_tpu_dry_run_commands(capsys):
    assert tpu_pod.main([*POD, "--dry-run", "--", "train.steps=100", "optim.lr=1e-3"]) == 0
    cmds = _commands(capsys.readouterr().out)
    gcloud = [c for c in cmds if c[0] == "gcloud"]
    assert all(c[:4] == ["gcloud", "compute", "tpus", "tpu-vm"] for c in gcloud)
    verbs = [c[4] for c in gcloud]
    # create (not queued), code sync, install, train, then the retry branch
    create = gcloud[verbs.index("create")]
    assert create[5:] == ["my-v5p", "--zone=us-east5-a", "--accelerator-type=v5p-32",
                          "--version=v2-alpha-tpuv5", "--quiet"]
    assert verbs.index("describe") < verbs.index("create") < verbs.index("scp")
    scp = gcloud[verbs.index("scp")]
    assert "--worker=all" in scp and scp[6] == "my-v5p:longctx-code.tar.gz"
    tar = next(c for c in cmds if c[0] == "tar")
    assert tar[2] == scp[5] and tar[tar.index("-C") + 1] == ROOT  # the tarball that is copied
    ssh = [c for c in gcloud if c[4] == "ssh"]
    assert all("--worker=all" in c for c in ssh)
    remotes = [_remote(c) for c in ssh]
    assert any("tar -xzf" in r for r in remotes)
    install = [r for r in remotes if "pip install" in r]
    assert install == ['cd "$HOME"/longctx && python3 -m pip install -e ".[tpu]"']
    trains = [r for r in remotes if "-m longctx.train" in r]
    assert len(trains) == 2 and trains[0] == trains[1]  # first run and retry: the same command
    argv = shlex.split(trains[0].split("exec ", 1)[1])
    # every worker joins jax.distributed (coordinator from the TPU metadata)
    assert argv[:2] == ["env", "LONGCTX_DISTRIBUTED=1"]
    assert argv[2:] == ["python3", "-m", "longctx.train", "--config", TINY, "train.steps=100",
                        "optim.lr=1e-3", "train.run_dir=gs://bkt/runs/a"]
    # order: sync < install < train; the retry branch: delete + create, or cleanup + train
    order = [next(i for i, r in enumerate(remotes) if key in r)
             for key in ("tar -xzf", "pip install", "-m longctx.train")]
    assert order == sorted(order)
    first_train = gcloud.index(ssh[order[2]])
    assert [c[4] for c in gcloud[first_train + 1:]] == [
        "describe", "delete", "create", "ssh", "ssh"]
    assert "longctx-train.pid" in _remote(gcloud[-2]) and "kill" in _remote(gcloud[-2])


def test_tpu_dry_run_queued_single_slice(capsys):
    assert tpu_pod.main([*POD, "--queued", "--spot", "--dry-run", "train.steps=5"]) == 0
    cmds = [c for c in _commands(capsys.readouterr().out) if c[0] == "gcloud"]
    assert all(c[3] == "queued-resources" for c in cmds)
    create = next(c for c in cmds if c[4] == "create")
    assert "--node-id=my-v5p" in create and "--runtime-version=v2-alpha-tpuv5" in create
    assert "--spot" in create and not any(x.startswith("--node-count") for x in create)
    for c in cmds:
        if c[4] in ("ssh", "scp"):
            assert "--worker=all" in c and "--node=all" in c
    assert "mesh.dcn" not in capsys.readouterr().out


@pytest.mark.slow
def test_tpu_dry_run_multislice_via_wrapper():
    """--num-slices: queued resources with a node count, mesh.dcn={data: N}; through the .sh."""
    env = {**os.environ, "PYTHON": sys.executable}
    r = subprocess.run(["bash", os.path.join(LAUNCH, "tpu_pod.sh"), "--name", "ms", "--zone",
                        "us-west4-a", "--accelerator-type", "v5litepod-16", "--num-slices", "2",
                        "--config", TINY, "--dry-run", "--", "train.run_dir=gs://b/r",
                        "train.steps=7"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    cmds = [c for c in _commands(r.stdout) if c[0] == "gcloud"]
    create = next(c for c in cmds if c[4] == "create")
    assert create[3] == "queued-resources"
    assert {"--node-count=2", "--node-prefix=ms", "--accelerator-type=v5litepod-16",
            "--runtime-version=v2-alpha-tpuv5-lite"} <= set(create)
    trains = [_remote(c) for c in cmds if c[4] == "ssh" and "-m longctx.train" in _remote(c)]
    argv = shlex.split(trains[0].split("exec ", 1)[1])
    assert argv[-3:] == ["train.steps=7", "mesh.dcn={data: 2}", "train.run_dir=gs://b/r"]
    assert load_config(TINY, argv[7:]).mesh.dcn == {"data": 2}  # what the trainer will see


@pytest.mark.parametrize("argv, message", [
    (["--name", "x", "--accelerator-type", "v5p-32", "--config", TINY, "--run-dir", "gs://b/r"],
     "--zone"),
    (["--name", "x", "--zone", "z", "--config", TINY, "--run-dir", "gs://b/r"],
     "--accelerator-type"),
    ([*POD[:4], "--accelerator-type", "v5p", *POD[6:]], "'v5p'"),
    ([*POD, "train.steps"], "'train.steps'"),
    ([*POD, "steps=3"], "'steps=3'"),
    ([*POD, "train.stepz=3"], "stepz"),  # unknown key: the config schema's error
    ([*POD, "train.steps=many"], "train.steps"),  # wrong type
    ([*POD[:-2], "--run-dir", "/home/me/runs/a"], "'/home/me/runs/a'"),  # multi-host, not GCS
    ([*POD[:-2]], "--run-dir is required"),
    ([*POD, "--num-slices", "0"], "--num-slices 0"),
    ([*POD, "--num-slices", "2", "mesh.dcn={data: 4}"], "mesh.dcn={data: 4}"),
    ([*POD, "--config", "experiments/configs/nope.yaml"], "nope.yaml"),
    ([*POD[:6], "--accelerator-type", "v9x-16", *POD[6:]], "--version"),  # unknown family
])
def test_tpu_bad_arguments_fail_before_any_command(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        tpu_pod.main([*argv, "--dry-run"])
    assert e.value.code == 2
    out, err = capsys.readouterr()
    assert message in err, err
    assert "gcloud" not in out and "+ " not in out


def test_tpu_single_host_local_run_dir_is_a_warning(capsys):
    argv = ["--name", "one", "--zone", "z", "--accelerator-type", "v5litepod-8", "--config", TINY,
            "--run-dir", "runs/x", "--dry-run"]
    assert tpu_pod.main(argv) == 0
    out = capsys.readouterr().out
    assert "# warning: run dir 'runs/x' is local" in out


class FakeGcloud:
    """Answers `describe` from a list of states, the training command from a list of exit
    codes, everything else with 0; records every command."""

    def __init__(self, states, train_rcs, files=("README.md", "pyproject.toml", "gone.py")):
        self.states, self.train_rcs, self.files = list(states), list(train_rcs), files
        self.calls = []

    def __call__(self, argv, *, capture=False):
        self.calls.append(list(argv))
        R = tpu_pod.Result
        if argv[0] == "git":
            return R(0, "\0".join(self.files) + "\0")
        if argv[0] == "gcloud" and argv[4] == "describe":
            st = self.states.pop(0)
            if st == "NOT_FOUND":
                return R(1, "", "ERROR: (gcloud) NOT_FOUND: Resource not found")
            if st == "ERROR":
                return R(1, "", "ERROR: (gcloud) connection reset")
            return R(0, st + "\n")
        if argv[0] == "gcloud" and argv[4] == "ssh" and "-m longctx.train" in _remote(argv):
            return R(self.train_rcs.pop(0))
        return R(0)

    def kinds(self):
        out = []
        for c in self.calls:
            if c[0] != "gcloud":
                out.append(c[0])
            elif c[4] != "ssh":
                out.append(c[4])
            else:
                r = _remote(c)
                out.append("train" if "-m longctx.train" in r else "install" if "pip" in r
                           else "unpack" if "tar -xzf" in r else "cleanup" if "kill" in r
                           else "ssh?")
        return out


def test_tpu_retry_recreates_a_preempted_slice(tmp_path):
    fake = FakeGcloud(["READY", "PREEMPTED", "NOT_FOUND", "READY", "READY"], [255, 0])
    sleeps = []
    rc = tpu_pod.main([*POD, "--max-retries", "2", "--tmp-dir", str(tmp_path)],
                      runner=fake, sleep=sleeps.append)
    assert rc == 0
    assert fake.kinds() == [
        "describe",  # READY: reused, not created
        "git", "tar", "scp", "unpack", "install", "train",  # first attempt: exit 255
        "describe", "delete", "describe", "create", "describe",  # PREEMPTED: recreate
        "scp", "unpack", "install", "train",  # same tarball, fresh VM
        "describe"]  # READY after exit 0: done
    trains = [c for c in fake.calls if c[0] == "gcloud" and "-m longctx.train" in " ".join(c)]
    assert trains[0] == trains[1]  # the same command, the same gs:// run dir: it resumes
    assert "train.run_dir=gs://bkt/runs/a" in _remote(trains[0])
    # deleted files (listed by git, missing on disk) are left out of the tarball
    listed = (tmp_path / "longctx-my-v5p.files").read_text().split("\0")
    assert "README.md" in listed and "gone.py" not in listed
    assert sleeps == []


def test_tpu_retry_on_a_ready_slice_stops_leftovers_and_gives_up(tmp_path, capsys):
    fake = FakeGcloud(["READY"] * 4, [1, 1, 1])
    rc = tpu_pod.main([*POD, "--max-retries", "2", "--tmp-dir", str(tmp_path)], runner=fake,
                      sleep=lambda s: None)
    assert rc == 1
    assert fake.kinds()[6:] == ["train", "describe", "cleanup", "train", "describe", "cleanup",
                                "train", "describe"]
    assert "giving up after 3 attempt(s)" in capsys.readouterr().out


def test_tpu_describe_errors_are_retried_then_reported(tmp_path, capsys):
    fake = FakeGcloud(["ERROR", "READY", "READY"], [0])
    sleeps = []
    assert tpu_pod.main([*POD, "--tmp-dir", str(tmp_path)], runner=fake,
                        sleep=sleeps.append) == 0
    assert sleeps == [30.0]
    fake = FakeGcloud(["ERROR"] * 3, [])
    assert tpu_pod.main([*POD, "--tmp-dir", str(tmp_path)], runner=fake,
                        sleep=lambda s: None) == 1
    assert fake.kinds() == ["describe"] * 3  # nothing created, nothing run
    assert "cannot read the state of my-v5p: ERROR: (gcloud) connection reset" in \
        capsys.readouterr().err


def test_tpu_queued_resource_waits_in_the_queue(tmp_path):
    fake = FakeGcloud(["NOT_FOUND", "WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE", "ACTIVE"],
                      [0])
    sleeps = []
    rc = tpu_pod.main([*POD, "--num-slices", "2", "--poll-interval", "7", "--tmp-dir",
                       str(tmp_path)], runner=fake, sleep=sleeps.append)
    assert rc == 0 and sleeps == [7, 7]
    assert fake.kinds()[:5] == ["describe", "create", "describe", "describe", "describe"]
    create = fake.calls[1]
    assert create[3] == "queued-resources" and "--node-count=2" in create


# ----------------------------------------------------------------------------
# SLURM
# ----------------------------------------------------------------------------


@pytest.mark.slow
def test_slurm_dry_run_renders_directives_and_srun(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(LAUNCH, "slurm.py"), "--nodes", "2",
                        "--gpus-per-node", "8", "--partition", "gpu", "--time", "2-00:00:00",
                        "--config", TINY, "--dry-run", "--", "train.run_dir=/shared/runs/a",
                        "train.steps=10"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for d in ("--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8", "--partition=gpu",
              "--time=2-00:00:00", "--requeue", "--signal=B:USR1@300"):
        assert f"\n#SBATCH {d}\n" in out, d
    assert 'srun --kill-on-bad-exit=1 "$PYTHON" -m longctx.train --config "$CONFIG" "$@"' in out
    assert 'scontrol show hostnames "$NODELIST" 2>/dev/null | head -n1' in out
    sbatch = [shlex.split(x[2:]) for x in out.splitlines() if x.startswith("+ ")]
    assert sbatch == [["sbatch", "longctx.sbatch", TINY, "train.run_dir=/shared/runs/a",
                       "train.steps=10"]]
    assert not os.path.exists(os.path.join(ROOT, "longctx.sbatch"))  # dry run writes nothing
    script = out.split("----\n", 1)[1].split("# ---- end of job script", 1)[0]
    assert script.startswith("#!/bin/bash\n") and script.count("#SBATCH --nodes=") == 1
    (tmp_path / "job.sbatch").write_text(script)
    for path in (tmp_path / "job.sbatch", os.path.join(LAUNCH, "slurm.sbatch")):
        s = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert s.returncode == 0, s.stderr


@pytest.mark.parametrize("argv, message", [
    (["--nodes", "0"], "--nodes 0"),
    (["--gpus-per-node", "0"], "--gpus-per-node 0"),
    (["--time", "soon"], "'soon'"),
    (["train.steps"], "'train.steps'"),
])
def test_slurm_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        slurm.main(["--config", TINY, "--dry-run", *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_slurm_job_script_checkpoints_and_requeues_before_the_time_limit(tmp_path):
    """The job script with fake srun / scontrol: USR1 (time limit near) -> SIGTERM to the
    trainer, wait for it, `scontrol requeue`; the srun line gets the config and overrides."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    log = tmp_path / "log"
    (bin_ / "srun").write_text(
        "#!/bin/bash\n"
        f"echo \"srun $*\" >> {log}\n"
        f"trap 'echo trainer: SIGTERM, checkpoint saved >> {log}; exit 0' TERM\n"
        "while :; do sleep 0.05; done\n")
    (bin_ / "scontrol").write_text(
        "#!/bin/bash\n"
        f"echo \"scontrol $*\" >> {log}\n"
        "if [ \"$1\" = show ]; then echo node001; echo node002; fi\n")
    for f in bin_.iterdir():
        f.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242",
           "SLURM_JOB_NODELIST": "node[001-002]", "LONGCTX_ROOT": ROOT, "PYTHON": "python-x",
           "LONGCTX_COORDINATOR": "stale:1"}
    p = subprocess.Popen(["bash", os.path.join(LAUNCH, "slurm.sbatch"), TINY, "train.steps=9"],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 30
    while not (log.exists() and "srun" in log.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGUSR1)
    out = p.communicate(timeout=30)[0]
    assert p.returncode == 0, out
    lines = log.read_text().splitlines()
    assert lines[0] == "scontrol show hostnames node[001-002]"
    assert lines[1] == f"srun --kill-on-bad-exit=1 python-x -m longctx.train --config {TINY} " \
                       "train.steps=9"
    assert lines[2:] == ["trainer: SIGTERM, checkpoint saved", "scontrol requeue 4242"]
    assert "coordinator host node001" in out


# ----------------------------------------------------------------------------
# Local multi-process
# ----------------------------------------------------------------------------


def test_local_dry_run(capsys):
    assert local.main(["-n", "3", "-d", "2", "--port", "12345", "--dry-run", "--", "--config",
                       TINY, "train.steps=3"]) == 0
    cmds = _commands(capsys.readouterr().out)
    assert len(cmds) == 3
    for i, c in enumerate(cmds):
        env = dict(x.split("=", 1) for x in c[1:] if "=" in x and not x.startswith("train."))
        assert env["LONGCTX_COORDINATOR"] == "localhost:12345"
        assert env["LONGCTX_NUM_PROCESSES"] == "3" and env["LONGCTX_PROCESS_ID"] == str(i)
        assert env["JAX_PLATFORMS"] == "cpu"
        # conftest's 8-device flag is replaced, not duplicated
        assert env["XLA_FLAGS"].split().count("--xla_force_host_platform_device_count=2") == 1
        assert "device_count=8" not in env["XLA_FLAGS"]
        assert c[-5:] == ["-m", "longctx.train", "--config", TINY, "train.steps=3"]


def test_local_launcher_stops_the_others_when_one_fails(tmp_path):
    """Process 1 fails at once; process 0 would wait forever (it even ignores SIGTERM):
    the launcher kills it and exits with process 1's status."""
    fake = tmp_path / "python"
    fake.write_text("#!/bin/bash\necho \"args $*\"\n"
                    "if [ \"$LONGCTX_PROCESS_ID\" = 1 ]; then sleep 1; echo boom >&2; exit 3; fi\n"
                    "trap '' TERM\nexec sleep 60\n")
    fake.chmod(0o755)
    t0 = time.monotonic()
    r = subprocess.run(["bash", os.path.join(LAUNCH, "local.sh"), "-n", "2", "--grace", "1",
                        "--python", str(fake), "--", "--config", TINY],
                       env={**os.environ, "PYTHON": sys.executable}, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 3, r.stdout + r.stderr
    assert time.monotonic() - t0 < 30
    assert f"[p0] args -m longctx.train --config {TINY}" in r.stdout
    assert "[p1] boom" in r.stdout and "process 1 exited with 3" in r.stdout


ARGS = ["train.steps=3", "train.batch_size=16", "train.log_every=1", "train.eval_every=0",
        "train.tensorboard=false"]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_local_launcher_two_processes_agree_with_one(tmp_path):
    """launch/local.sh -n 2 -d 4: two processes (4 CPU devices each) train together; their
    losses match one process over the same 8 simulated devices (this test's process)."""
    two = tmp_path / "two"
    r = subprocess.run(["bash", os.path.join(LAUNCH, "local.sh"), "-n", "2", "-d", "4", "--",
                        "--config", TINY, *ARGS, f"train.run_dir={two}"],
                       cwd=ROOT, env={**os.environ, "PYTHON": sys.executable},
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert any(x.startswith("[p0] ") for x in lines) and any(x.startswith("[p1] ") for x in lines)
    assert all(x.startswith(("[p0] ", "[p1] ", "[local] ")) for x in lines)
    assert any("process 1 of 2" in x for x in lines if x.startswith("[p1] "))
    rows = [json.loads(x) for x in open(two / "metrics.jsonl")]  # process 0 only
    losses_two = [x["loss"] for x in rows if "loss" in x]
    assert [x["step"] for x in rows if "loss" in x] == [1, 2, 3]

    train(load_config(TINY, [*ARGS, f"train.run_dir={tmp_path / 'one'}"]), progress=False)
    one = [json.loads(x) for x in open(tmp_path / "one" / "metrics.jsonl")]
    np.testing.assert_allclose(losses_two, [x["loss"] for x in one if "loss" in x], atol=1e-5)


class PreflightThenFake(FakeGcloud):
    """Runs the preflight compile for real (a subprocess on compile-only TPUs), fakes gcloud."""

    def __call__(self, argv, *, capture=False):
        if argv[:3] == [sys.executable, "-m", "longctx.compile"]:
            self.calls.append(list(argv))
            p = subprocess.run(argv, text=True, capture_output=True, cwd=ROOT)
            self.preflight_out = p.stdout + p.stderr
            return tpu_pod.Result(p.returncode, p.stdout, p.stderr)
        return super().__call__(argv, capture=capture)


def test_tpu_preflight_in_the_plan(capsys):
    assert tpu_pod.main([*POD, "--preflight", "--dry-run", "--", "train.steps=10"]) == 0
    cmds = _commands(capsys.readouterr().out)
    assert cmds[0][1:] == ["-m", "longctx.compile", "--config", os.path.join(ROOT, TINY),
                           "--target", "v5p-32", "--num-slices", "1", "train.steps=10"]
    assert cmds[1][:5] == ["gcloud", "compute", "tpus", "tpu-vm", "describe"]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed")
def test_tpu_preflight_stops_before_the_slice_when_the_job_does_not_fit(tmp_path, capsys):
    """Exact attention over 64K tokens on a v5e-16 (15.75 GiB per chip): the TPU compiler
    refuses the [T, T] scores, and the launcher stops before any gcloud command."""
    argv = ["--name", "my-v5e", "--zone", "us-west4-a", "--accelerator-type", "v5litepod-16",
            "--config", TINY, "--run-dir", "gs://bkt/runs/a", "--preflight",
            "--tmp-dir", str(tmp_path), "--", "train.batch_size=16", "data.seq_len=65536",
            "model.max_seq_len=65536", "model.attention.impl=xla"]
    fake = PreflightThenFake(["READY"], [0])
    assert tpu_pod.main(argv, runner=fake, sleep=lambda s: None) == 3
    assert [c[1:3] for c in fake.calls] == [["-m", "longctx.compile"]]  # nothing else ran
    assert "does not fit" in fake.preflight_out and "exceeds available HBM" in fake.preflight_out
    assert "nothing was created or run" in capsys.readouterr().out
    # the same job at 4K fits: the launcher goes on to the slice
    fake = PreflightThenFake(["READY", "READY"], [0])
    argv[-3:-1] = ["data.seq_len=4096", "model.max_seq_len=4096"]
    assert tpu_pod.main(argv, runner=fake, sleep=lambda s: None) == 0
    assert fake.kinds()[:2] == [sys.executable, "describe"]
