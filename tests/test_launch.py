"""Launchers: sweep expansion into distinct runs, TPU pod / SLURM / local command lines."""

import os
import subprocess
import sys

import pytest

from clipjax.hostmem import with_hugepage_malloc
from clipjax.launch import local, sweep

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_grid_and_zipped():
    assert sweep.grid({"a": [1, 2], "b": ["x", "y"]}) == [
        {"a": 1, "b": "x"},
        {"a": 1, "b": "y"},
        {"a": 2, "b": "x"},
        {"a": 2, "b": "y"},
    ]
    assert sweep.zipped({"a": [1, 2], "b": [3, 4]}) == [{"a": 1, "b": 3}, {"a": 2, "b": 4}]
    with pytest.raises(ValueError, match="different lengths"):
        sweep.zipped({"a": [1], "b": [3, 4]})


@pytest.mark.parametrize("launcher", sweep.LAUNCHERS)
def test_sweep_expands_to_distinct_workdirs(launcher, tmp_path):
    path = os.path.join(REPO, "experiments", "sweeps", "demo_lr.py")
    runs = sweep.commands(path, launcher, str(tmp_path), python="python")
    workdirs = [w for w, _ in runs]
    assert len(runs) == 6 and len(set(workdirs)) == 6
    assert all(w.startswith(str(tmp_path / "demo_lr")) for w in workdirs)
    for workdir, cmd in runs:
        assert cmd[cmd.index("--workdir") + 1] == workdir
        assert cmd[cmd.index("--config") + 1] == "experiments/demo.py"
        assert any(a.startswith("--config.optimizer.lr=") for a in cmd)
    first = runs[0][1]
    if launcher == "local":
        assert first[:3] == ["python", "-m", "clipjax.train"]
    elif launcher == "slurm":
        assert first[0] == "sbatch" and first[2].endswith("slurm.sbatch")
    else:
        assert first[0].endswith("tpu_pod.sh") and "--" in first
    assert "--config.optimizer.lr=0.0003" in first
    assert "--config.optimizer.weight_decay=0.0" in first


def test_sweep_cli_dry_run_and_bad_file(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "clipjax.launch.sweep",
            "experiments/sweeps/b16_loss.py",
            "--launcher",
            "tpu",
            "--launcher-args=--zone z --type v4-8",
            "--root",
            "gs://b/sweeps",
            "--dry-run",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 4 and all("--zone z --type v4-8" in line for line in lines)
    assert "--config.loss.name=sigmoid" in lines[2]
    bad = tmp_path / "bad.py"
    bad.write_text("CONFIG = 'experiments/demo.py'\ndef get_sweep():\n    return {}\n")
    r = subprocess.run(
        [sys.executable, "-m", "clipjax.launch.sweep", str(bad), "--launcher", "local"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert r.returncode != 0 and "non-empty list of dicts" in r.stderr


def test_tpu_pod_dry_run_prints_the_lifecycle():
    r = subprocess.run(
        [
            "bash",
            os.path.join(REPO, "launch", "tpu_pod.sh"),
            "--name",
            "pod",
            "--zone",
            "us-central2-b",
            "--type",
            "v4-32",
            "--dry-run",
            "--",
            "--config",
            "experiments/b16_laion.py",
            "--workdir",
            "gs://b/run",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    lines = r.stdout.strip().splitlines()
    assert lines[0].startswith("gcloud compute tpus tpu-vm create pod")
    assert "--accelerator-type v4-32" in lines[0]
    assert any(
        "ssh pod" in line and "--worker=all" in line and "clipjax.train" in line for line in lines
    )
    assert lines[-1].startswith("gcloud compute tpus tpu-vm delete pod")
    r = subprocess.run(
        ["bash", os.path.join(REPO, "launch", "tpu_pod.sh"), "--dry-run"],
        capture_output=True,
        text=True,
    )
    assert r.returncode != 0 and "--name is required" in r.stderr


def test_tpu_pod_multi_slice_dry_run_uses_a_queued_resource():
    argv = ["bash", os.path.join(REPO, "launch", "tpu_pod.sh"), "--name", "pod", "--zone", "z"]
    argv += ["--type", "v5litepod-256", "--slices", "2", "--dry-run", "--", "--workdir", "gs://b"]
    lines = subprocess.run(argv, capture_output=True, text=True, check=True).stdout.splitlines()
    assert lines[0].startswith("gcloud compute tpus queued-resources create pod")
    assert "--node-count 2" in lines[0] and "--accelerator-type v5litepod-256" in lines[0]
    for node in ("pod-0", "pod-1"):
        assert any(
            f"ssh {node}" in line and "clipjax.train" in line and "--config.mesh.slices=2" in line
            for line in lines
        )
    assert lines[-1].startswith("gcloud compute tpus queued-resources delete pod")
    r = subprocess.run(argv[:8] + ["--slices", "0", "--", "--workdir", "gs://b"], text=True,
                       capture_output=True)  # fmt: skip
    assert r.returncode != 0 and "--slices must be a positive integer" in r.stderr


def test_slurm_script_and_local_launcher_commands():
    r = subprocess.run(["bash", "-n", os.path.join(REPO, "launch", "slurm.sbatch")])
    assert r.returncode == 0
    cmds = local.commands(["python", "-m", "clipjax.train"], 3, 1234)
    assert [c[-1] for c in cmds] == ["--process_id=0", "--process_id=1", "--process_id=2"]
    assert all("--coordinator=127.0.0.1:1234" in c and "--num_processes=3" in c for c in cmds)
    env = local.process_env(2)
    assert "--xla_force_host_platform_device_count=2" in env["XLA_FLAGS"]
    assert env["JAX_PLATFORMS"] == "cpu"
    assert "glibc.malloc.hugetlb=1" in env["GLIBC_TUNABLES"].split(":")


def test_hugepage_malloc_tunable_is_added_once_and_keeps_other_tunables():
    env = with_hugepage_malloc({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "HOME": "h"})
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    assert env["HOME"] == "h"
    assert with_hugepage_malloc(env) == env
    assert with_hugepage_malloc({})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    # A user's own hugetlb choice wins.
    own = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}
    assert with_hugepage_malloc(own) == own
    assert with_hugepage_malloc(env, enabled=False)["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2"
    assert "GLIBC_TUNABLES" not in with_hugepage_malloc(own, enabled=False)


def _fake_gcloud(tmp_path, fail_on):
    """A `gcloud` on PATH that records its arguments and fails when they contain `fail_on`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    script = bin_dir / "gcloud"
    script.write_text(
        "#!/usr/bin/env bash\n"
        f'echo "$*" >> {log}\n'
        f'case "$*" in *"{fail_on}"*) exit 7 ;; esac\n'
        "exit 0\n"
    )
    script.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return env, log


@pytest.mark.parametrize("fail_on", ["clipjax.train", "pip install"])
@pytest.mark.parametrize("keep", [False, True])
def test_tpu_pod_deletes_the_slice_when_a_step_fails(tmp_path, fail_on, keep):
    env, log = _fake_gcloud(tmp_path, fail_on)
    argv = ["bash", os.path.join(REPO, "launch", "tpu_pod.sh"), "--name", "pod", "--zone", "z"]
    argv += ["--type", "v4-8", "--repo", "https://example.invalid/clipjax.git"]
    argv += ["--keep"] if keep else []
    r = subprocess.run(argv + ["--", "--workdir", "gs://b/r"], env=env, capture_output=True)
    assert r.returncode == 7  # the failed step's status
    calls = log.read_text().splitlines()
    assert calls[0].startswith("compute tpus tpu-vm create pod")
    assert fail_on in calls[-1 if keep else -2]
    deletes = [c for c in calls if " delete pod" in c]
    if keep:
        assert deletes == [] and b"still running" in r.stderr
    else:
        assert deletes == ["compute tpus tpu-vm delete pod --zone z --quiet"] == calls[-1:]


def test_tpu_pod_deletes_nothing_when_create_fails(tmp_path):
    env, log = _fake_gcloud(tmp_path, "create")
    argv = ["bash", os.path.join(REPO, "launch", "tpu_pod.sh"), "--name", "pod", "--zone", "z"]
    argv += ["--type", "v4-8", "--", "--workdir", "gs://b/r"]
    r = subprocess.run(argv, env=env, capture_output=True)
    assert r.returncode == 7 and len(log.read_text().splitlines()) == 1  # create only


def test_sweep_refuses_a_local_root_for_tpu_runs(tmp_path, capsys):
    path = os.path.join(REPO, "experiments", "sweeps", "demo_lr.py")
    with pytest.raises(SystemExit, match="local path.*--allow-local-root"):
        sweep.main([path, "--launcher", "tpu", "--root", str(tmp_path), "--dry-run"])
    with pytest.raises(SystemExit, match="local path"):
        sweep.main([path, "--launcher", "tpu", "--dry-run"])  # the default root is local too
    assert capsys.readouterr().out == ""  # refused before printing any command
    assert sweep.main([path, "--launcher", "tpu", "--root", "gs://b/sw", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 6 and all("--workdir gs://b/sw/demo_lr/" in line for line in lines)
    assert os.path.isfile(lines[0].split()[0])  # the repository's launch/tpu_pod.sh
    argv = [path, "--launcher", "tpu", "--root", str(tmp_path), "--allow-local-root", "--dry-run"]
    assert sweep.main(argv) == 0
    for launcher in ("local", "slurm"):  # their workdirs outlive the job
        assert sweep.main([path, "--launcher", launcher, "--root", str(tmp_path), "--dry-run"]) == 0


def test_local_launcher_kills_a_process_that_ignores_sigterm_after_a_failure(tmp_path):
    """A JAX process whose peer died can ignore SIGTERM (the runtime's preemption notifier takes
    it) until the heartbeat timeout: after --stop-grace the launcher kills it."""
    ready = tmp_path / "ignoring"
    stubborn = [
        sys.executable,
        "-c",
        "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "open(sys.argv[1], 'w').close(); time.sleep(120)",
        str(ready),
    ]
    failing = [  # fails once the other ignores SIGTERM
        sys.executable,
        "-c",
        "import os, sys, time\nwhile not os.path.exists(sys.argv[1]): time.sleep(0.01)\n"
        "raise SystemExit(4)",
        str(ready),
    ]
    procs = [subprocess.Popen(stubborn), subprocess.Popen(failing)]
    assert local.supervise(procs, grace_s=1) == 4
    assert procs[0].returncode == -9
    r = subprocess.run(
        [sys.executable, "-m", "clipjax.launch.local", "-n", "1", "--stop-grace", "-1", "--", "x"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "--stop-grace must be >= 0 seconds, got -1" in r.stderr
