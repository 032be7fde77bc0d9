"""The launch/ recipes: scripts and manifests that restart a job on exit code 75 and resume it.

The restart loop is exercised for real (a tiny script, then the real harness with a real signal to
one rank); the Kubernetes and SkyPilot files are checked for the keys that make recovery work, and
the harness overrides they carry are validated against the real config schema.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from conftest import children, metrics, stop_lines, steps_with_saves, wait_for, worker_pids
from harness.config import PREEMPTED_EXIT_CODE, register_configs, to_plain, validate

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / "launch"
RESTART_LOOP = LAUNCH / "restart-loop.sh"
WORKSTATION = LAUNCH / "workstation.sh"
K8S_JOB = LAUNCH / "kubernetes-job.yaml"
SKYPILOT = LAUNCH / "skypilot-spot.yaml"

# Slow enough (~20 steps/s on 2 CPU ranks) that a signal sent once training runs lands before the end.
HARNESS_OVERRIDES = ["name=test", "trainer.max_steps=60", "launcher.nproc_per_node=2",
                     "trainer.num_threads=1", "trainer.log_every=20", "task.model.hidden=1024"]

# A job that exits 75 on its first FAIL_RUNS runs, then 0; on a stop signal it records the signal
# and exits 75, like the harness after its save.
FAKE_JOB = """
import os, signal, sys, time
state, mode = sys.argv[1], sys.argv[2]
runs = int(open(state).read()) + 1 if os.path.exists(state) else 1
open(state, "w").write(str(runs))
def stop(signum, frame):
    open(state + ".signals", "a").write(signal.Signals(signum).name + "\\n")
    time.sleep(0.2)  # "saving"
    sys.exit(75)
for forwarded in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP):
    signal.signal(forwarded, stop)
if mode == "block":
    open(state + ".ready", "w").close()
    time.sleep(60)
    sys.exit(0)
sys.exit(75 if runs <= int(os.environ.get("FAIL_RUNS", "0")) else int(mode))
"""


def _loop_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "HARNESS_RESTART_DELAY_S": "0.1", "PYTHON": sys.executable, **extra}


@pytest.fixture
def fake_job(tmp_path) -> tuple[list[str], Path]:
    script = tmp_path / "job.py"
    script.write_text(FAKE_JOB)
    state = tmp_path / "runs"
    return [sys.executable, str(script), str(state)], state


def _runs(state: Path) -> int:
    return int(state.read_text()) if state.exists() else 0


def _signals(state: Path) -> list[str]:
    path = Path(f"{state}.signals")
    return path.read_text().split() if path.exists() else []


# ---- static checks ------------------------------------------------------------------------------------

@pytest.mark.parametrize("script", sorted(LAUNCH.glob("*.sh")), ids=lambda path: path.name)
def test_scripts_parse_and_are_executable(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert os.access(script, os.X_OK), f"chmod +x {script}"


@pytest.mark.parametrize("manifest", sorted(LAUNCH.glob("*.yaml")), ids=lambda path: path.name)
def test_yaml_files_parse(manifest):
    documents = [doc for doc in yaml.safe_load_all(manifest.read_text()) if doc is not None]
    assert documents and all(isinstance(doc, dict) for doc in documents)


def _compose(overrides: list[str]):
    """The validated HarnessConfig for these overrides, composed exactly as `harness.launch` does."""
    from hydra import compose, initialize_config_dir

    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        return validate(to_plain(compose(config_name="config", overrides=overrides)))


def _harness_overrides(shell: str, env: dict[str, str]) -> list[str]:
    """The overrides after `exec python -m harness.launch` in a shell snippet, variables expanded."""
    line = shell.replace("\\\n", " ")
    for name, value in env.items():
        line = line.replace("${" + name + "}", str(value))
    words = shlex.split(line)
    start = words.index("harness.launch") + 1
    assert words[start - 4:start] == ["exec", "python", "-m", "harness.launch"], \
        "python must be exec'd so signals reach it and its exit code is the container's"
    return words[start:]


def _k8s_job() -> dict:
    return next(doc for doc in yaml.safe_load_all(K8S_JOB.read_text()) if doc and doc["kind"] == "Job")


def test_kubernetes_job_retries_exit_75_without_counting_it():
    job = _k8s_job()
    assert job["apiVersion"] == "batch/v1"
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"  # required by podFailurePolicy
    container = pod["containers"][0]
    rules = job["spec"]["podFailurePolicy"]["rules"]
    # The first rule that matches exit code 75 decides (rules are evaluated in order).
    matching = [rule for rule in rules if "onExitCodes" in rule
                and (PREEMPTED_EXIT_CODE in rule["onExitCodes"]["values"]) == (rule["onExitCodes"]["operator"] == "In")]
    assert matching and matching[0]["action"] == "Ignore"
    assert matching[0]["onExitCodes"].get("containerName", container["name"]) == container["name"]
    assert any(rule["action"] == "Ignore" and rule.get("onPodConditions") == [{"type": "DisruptionTarget"}]
               for rule in rules)
    assert job["spec"]["backoffLimit"] >= 1


def test_kubernetes_job_grace_period_covers_the_harness_grace_and_checkpoints_outlive_the_pod():
    job = _k8s_job()
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["command"] == ["/bin/sh", "-c"]
    cfg = _compose(_harness_overrides(container["args"][0], {}))
    grace = pod["terminationGracePeriodSeconds"]
    assert grace >= cfg.preempt.grace_s > 30, "size the grace period from the save time; 30 s is the default"
    assert cfg.launcher.backend == "local"
    if not cfg.checkpoint.dir.startswith("s3://"):
        mount = next(m for m in container["volumeMounts"] if cfg.checkpoint.dir.startswith(m["mountPath"] + "/"))
        volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
        assert "persistentVolumeClaim" in volume, "checkpoints on an emptyDir die with the pod"


def test_skypilot_job_recovers_on_exit_75_with_a_durable_checkpoint_dir():
    task = yaml.safe_load(SKYPILOT.read_text())
    # Keys of SkyPilot's task YAML spec (docs.skypilot.co/en/latest/reference/yaml-spec.html).
    assert set(task) <= {"name", "workdir", "num_nodes", "resources", "envs", "secrets", "volumes",
                         "file_mounts", "setup", "run", "config"}
    resources = task["resources"]
    assert resources["use_spot"] is True
    recovery = resources["job_recovery"]
    assert set(recovery) <= {"strategy", "max_restarts_on_errors", "recover_on_exit_codes"}
    assert recovery["strategy"] in ("FAILOVER", "EAGER_NEXT_REGION")
    assert PREEMPTED_EXIT_CODE in recovery["recover_on_exit_codes"]
    assert isinstance(recovery["max_restarts_on_errors"], int)
    cfg = _compose(_harness_overrides(task["run"], task["envs"]))
    assert cfg.checkpoint.dir.startswith("s3://") or any(
        cfg.checkpoint.dir.startswith(path) for path in task.get("file_mounts", {}))
    assert cfg.preempt.spot == resources["infra"]  # the notice is polled on the cloud it runs on
    assert task["num_nodes"] == 1


def test_workstation_script_sets_max_restarts_and_lets_overrides_win():
    def composed(*args: str) -> dict:
        result = subprocess.run([str(WORKSTATION), *args, "--cfg", "job"], cwd=REPO, capture_output=True,
                                text=True, timeout=60, env=_loop_env())
        assert result.returncode == 0, result.stderr
        return yaml.safe_load(result.stdout)
    assert composed("name=ws")["launcher"]["max_restarts"] == 100
    assert composed("launcher.max_restarts=4")["launcher"]["max_restarts"] == 4


# ---- the restart loop with a tiny real job ------------------------------------------------------------

def test_restart_loop_restarts_on_75_until_the_job_exits_0(fake_job):
    command, state = fake_job
    result = subprocess.run([str(RESTART_LOOP), "--", *command, "0"], env=_loop_env(FAIL_RUNS="2"),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert _runs(state) == 3  # two preempted runs, then the finishing one
    assert result.stderr.count("restarting in") == 2


def test_restart_loop_propagates_other_exit_codes_without_restarting(fake_job):
    command, state = fake_job
    result = subprocess.run([str(RESTART_LOOP), "--", *command, "3"], env=_loop_env(FAIL_RUNS="1"),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 3
    assert _runs(state) == 2


def test_restart_loop_gives_up_with_75_after_max_restarts(fake_job):
    command, state = fake_job
    result = subprocess.run([str(RESTART_LOOP), "--", *command, "0"],
                            env=_loop_env(FAIL_RUNS="100", HARNESS_MAX_RESTARTS="2"),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == PREEMPTED_EXIT_CODE
    assert _runs(state) == 3
    assert "HARNESS_MAX_RESTARTS=2" in result.stderr


def _ignore_sigint() -> None:
    """What a non-interactive shell does to a command it starts with `&` (job control off), and what
    the loop then inherits from pytest started that way: SIGINT ignored. Bash cannot trap a signal
    that was ignored when it started (POSIX), so the loop's forwarding trap was silently not set."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _default_sighup() -> None:
    """A loop started under nohup (as a CI runner may start the suite) inherits SIGHUP ignored and,
    by design, leaves it so: the HUP case tests a loop that was started able to receive it."""
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


@pytest.mark.parametrize("signum, target, inherited", [
    (signal.SIGTERM, "loop", None),
    (signal.SIGUSR1, "loop", None),
    (signal.SIGUSR2, "loop", None),
    (signal.SIGHUP, "loop", _default_sighup),
    (signal.SIGINT, "process group", None),
    (signal.SIGINT, "process group", _ignore_sigint)],
    ids=["SIGTERM-to-loop", "SIGUSR1-to-loop", "SIGUSR2-to-loop", "SIGHUP-to-loop", "SIGINT-to-terminal-group",
         "SIGINT-to-group-of-a-loop-started-with-SIGINT-ignored"])
def test_a_signalled_loop_forwards_it_once_and_exits_75_without_restarting(fake_job, signum, target, inherited):
    """A terminal's Ctrl-C reaches the whole foreground process group: the job must still see ONE
    SIGINT (the harness stops without saving on a second one). Also when the loop was started with
    SIGINT ignored (a background job of a script, a CI runner): an explicit SIGINT still stops it."""
    command, state = fake_job
    loop = subprocess.Popen([str(RESTART_LOOP), "--", *command, "block"], env=_loop_env(),
                            stderr=subprocess.PIPE, text=True, start_new_session=True, preexec_fn=inherited)
    wait_for(lambda: Path(f"{state}.ready").exists(), 30, "the job to start")
    if target == "loop":
        os.kill(loop.pid, signum)
    else:
        os.killpg(loop.pid, signum)
    assert loop.wait(timeout=30) == PREEMPTED_EXIT_CODE
    assert _signals(state) == [signum.name]
    assert _runs(state) == 1
    assert "not restarting" in loop.stderr.read()


def test_a_signal_during_the_restart_delay_stops_the_loop(fake_job):
    command, state = fake_job
    loop = subprocess.Popen([str(RESTART_LOOP), "--", *command, "0"], stderr=subprocess.PIPE, text=True,
                            env=_loop_env(FAIL_RUNS="100", HARNESS_RESTART_DELAY_S="30"), start_new_session=True)
    def sleeping() -> bool:  # the job has exited 75 and the loop's `sleep` is running
        return any(_cmdline(pid).startswith(b"sleep") for pid in children(loop.pid))
    wait_for(sleeping, 30, "the restart delay to start")
    os.kill(loop.pid, signal.SIGTERM)
    assert loop.wait(timeout=10) == PREEMPTED_EXIT_CODE  # at once, not after the 30 s delay
    assert _runs(state) == 1
    assert "while waiting to restart" in loop.stderr.read()


# ---- the restart loop with the real harness -----------------------------------------------------------

def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _launcher_of(loop: subprocess.Popen) -> SimpleNamespace:
    """The `python -m harness.launch` process the loop is running (for conftest.worker_pids)."""
    def find():
        pids = [pid for pid in children(loop.pid) if b"harness.launch" in _cmdline(pid)]
        return SimpleNamespace(pid=pids[0]) if pids else None
    return wait_for(find, 60, "harness.launch under the restart loop")


def _start_loop(ckpt_dir: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen([str(RESTART_LOOP), f"checkpoint.dir={ckpt_dir}", *HARNESS_OVERRIDES], cwd=REPO,
                            env=_loop_env(), stdout=log.open("w"), stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _training(ckpt_dir: Path) -> bool:
    return max(metrics(ckpt_dir), default=0) >= 2


def test_restart_loop_resumes_the_harness_after_one_rank_is_preempted(tmp_path):
    ckpt_dir, log = tmp_path / "ckpt", tmp_path / "loop.log"
    loop = _start_loop(ckpt_dir, log)
    try:
        ranks = worker_pids(_launcher_of(loop))
        wait_for(lambda: _training(ckpt_dir), 60, "training to start")
        os.kill(ranks[1], signal.SIGTERM)  # e.g. a spot notice seen by one rank only
        assert loop.wait(timeout=180) == 0, log.read_text()
    finally:
        if loop.poll() is None:
            os.killpg(loop.pid, signal.SIGKILL)
    output = log.read_text()
    stopped = stop_lines(output)
    assert set(stopped) == {0, 1} and len(set(stopped.values())) == 1, output  # one agreed step
    stop_step = stopped[0]
    assert 0 < stop_step < 60
    assert output.count("restarting in") == 1
    assert re.search(rf"resumed from \S+step_{stop_step:09d} at step {stop_step}", output), output
    assert steps_with_saves(ckpt_dir)[-1] == 60


def test_sigterm_to_the_loop_saves_and_exits_75_without_restarting(tmp_path):
    ckpt_dir, log = tmp_path / "ckpt", tmp_path / "loop.log"
    loop = _start_loop(ckpt_dir, log)
    try:
        worker_pids(_launcher_of(loop))
        wait_for(lambda: _training(ckpt_dir), 60, "training to start")
        os.kill(loop.pid, signal.SIGTERM)  # the machine is going away
        assert loop.wait(timeout=120) == PREEMPTED_EXIT_CODE, log.read_text()
    finally:
        if loop.poll() is None:
            os.killpg(loop.pid, signal.SIGKILL)
    output = log.read_text()
    stopped = stop_lines(output)
    assert set(stopped) == {0, 1}, output
    assert steps_with_saves(ckpt_dir) == [stopped[0]] and stopped[0] < 60
    assert "restarting in" not in output and "not restarting" in output
    assert output.count("starting 2 worker processes") == 1
