"""Reliability of the checkpoint rooms under injected faults: read errors during pruning, failed
deletions, staging folders shared by runs, a dying uploader, hostile manifests, registered modules
whose own keys start with ``module.``, config values that would inject sbatch lines."""

from __future__ import annotations

import copy
import errno
import json
import logging
import os
import shutil

import pytest
import torch
from torch import nn

from conftest import require_cluster

from harness.checkpoint.errors import CheckpointError
from harness.checkpoint.format import write_payload
from harness.checkpoint.payload import StateRegistry
from harness.checkpoint.storage import open_storage, staging_key
from harness.checkpoint.storage.local import LocalStorage
from harness.checkpoint.storage.staged import StagedStorage
from harness.checkpoint.store import CheckpointStore, Retention
from harness.config import ConfigError, validate


def _commit(store: CheckpointStore, step: int, metric=None) -> None:
    store.commit(step, lambda handle: write_payload({"step": torch.tensor(step)}, handle), {"metric": metric},
                 payload_name="state.pt")


class FaultyStorage:
    """A real LocalStorage whose reads of chosen files, or deletions of chosen folders, fail with a
    chosen errno (EIO, EBUSY...): the errors a flaky NFS or object store gives."""

    def __init__(self, local: LocalStorage, read_errors: dict[str, int] = None, remove_errors: dict[str, int] = None):
        self._local = local
        self.root = local.root
        self.read_errors = dict(read_errors or {})
        self.remove_errors = dict(remove_errors or {})

    def __getattr__(self, name):
        return getattr(self._local, name)

    def read_bytes(self, rel: str) -> bytes:
        if rel in self.read_errors:
            raise OSError(self.read_errors[rel], os.strerror(self.read_errors[rel]), rel)
        return self._local.read_bytes(rel)

    def remove_dir(self, rel: str) -> None:
        if rel in self.remove_errors:
            raise OSError(self.remove_errors[rel], os.strerror(self.remove_errors[rel]), rel)
        self._local.remove_dir(rel)


def test_prune_keeps_a_checkpoint_whose_manifest_cannot_be_read_now(tmp_path, caplog):
    local = LocalStorage(str(tmp_path))
    for step in (10, 20, 30, 40):
        _commit(CheckpointStore(local), step)
    # step 10: an I/O error on its manifest; step 20: its manifest is a directory (EISDIR, a real
    # read error); neither is provably absent, so neither is a partial save to delete.
    (tmp_path / "step_000000020" / "manifest.json").unlink()
    (tmp_path / "step_000000020" / "manifest.json").mkdir()
    flaky = CheckpointStore(FaultyStorage(local, read_errors={"step_000000010/manifest.json": errno.EIO}))
    with caplog.at_level(logging.WARNING, logger="harness"):
        flaky.prune(Retention(keep_last=1), current=40)
    assert (tmp_path / "step_000000010" / "state.pt").exists()
    assert (tmp_path / "step_000000020" / "state.pt").exists()
    assert not (tmp_path / "step_000000030").exists()  # readable and dropped by keep_last=1
    assert "unreadable manifest" in caplog.text
    # Negative control: once the manifest is provably absent, the folder is a partial save and goes.
    (tmp_path / "step_000000020" / "manifest.json").rmdir()
    CheckpointStore(local).prune(Retention(keep_last=1), current=40)
    assert not (tmp_path / "step_000000020").exists()


def test_a_failed_deletion_is_a_warning_and_is_retried_at_the_next_prune(tmp_path, caplog):
    local = LocalStorage(str(tmp_path))
    faulty = FaultyStorage(local, remove_errors={"step_000000010": errno.EBUSY})
    store = CheckpointStore(faulty)
    for step in (10, 20):
        _commit(store, step)
    with caplog.at_level(logging.WARNING, logger="harness"):
        assert store.prune(Retention(keep_last=1), current=20) == []
    assert "could not delete old checkpoint" in caplog.text and (tmp_path / "step_000000010").exists()
    faulty.remove_errors.clear()  # the NFS silly-rename went away
    _commit(store, 30)
    assert [ref.step for ref in store.prune(Retention(keep_last=1), current=30)] == [10, 20]


def test_runs_sharing_a_staging_disk_never_share_a_folder(tmp_path, monkeypatch):
    keys = set()
    for project in ("a", "b"):
        (tmp_path / project).mkdir()
        monkeypatch.chdir(tmp_path / project)
        keys.add(staging_key(open_storage("checkpoints/exp1").root))  # the same relative dir
    keys.add(staging_key("s3://bucket/x_y"))
    keys.add(staging_key("s3://bucket/x/y"))
    assert len(keys) == 4
    staged = open_storage(str(tmp_path / "dest"), str(tmp_path / "staging"))
    assert isinstance(staged, StagedStorage) and staged.local.root.startswith(str(tmp_path / "staging"))


class DyingRemote:
    """A remote whose upload ends the uploader thread with a BaseException (not an Exception)."""

    def __init__(self, root: str):
        self.root = root

    def write(self, rel, fill, algorithm="xxh3_128"):
        raise SystemExit("the uploader thread is torn down")

    def list_names(self):
        return []

    def read_bytes(self, rel):
        raise FileNotFoundError(rel)

    def size(self, rel):
        raise FileNotFoundError(rel)

    def local_path(self, rel):
        return None

    def flush(self):
        pass


def test_an_uploader_killed_by_a_base_exception_is_reported_not_waited_for(tmp_path):
    staged = StagedStorage(LocalStorage(str(tmp_path / "staging")), DyingRemote("mem://dest"))
    store = CheckpointStore(staged)
    _commit(store, 10)  # committed locally; the upload dies in the background
    with pytest.raises(CheckpointError, match="could not upload mem://dest/step_000000010"):
        staged.flush()
    staged.flush()  # reported once, and no thread left for a later flush to wait on


def test_recovery_never_uploads_files_a_manifest_names_outside_its_folder(tmp_path, caplog):
    staging, dest = tmp_path / "staging", tmp_path / "dest"
    _commit(CheckpointStore(LocalStorage(str(staging))), 10)
    manifest_path = staging / "step_000000010" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    (tmp_path / "secret").write_text("not a checkpoint")
    manifest["files"]["../../secret"] = {"bytes": 16, "sha256": "0" * 64}
    manifest_path.write_text(json.dumps(manifest))
    staged = StagedStorage(LocalStorage(str(staging)), LocalStorage(str(dest)))
    with caplog.at_level(logging.WARNING, logger="harness"):
        staged.flush()
    assert "names files outside the checkpoint folder" in caplog.text
    assert not dest.exists() or not list(dest.rglob("*secret*"))


class EmaLikeTimm(nn.Module):
    """Like timm's ModelEmaV2: the averaged copy lives in ``self.module``, so every key of its
    state_dict starts with ``module.``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.module = copy.deepcopy(model)


def test_a_registered_module_whose_own_keys_start_with_module_restores():
    saved = StateRegistry()
    saved.register("ema", EmaLikeTimm(nn.Linear(3, 2)))
    state = saved.state_dict()
    assert all(key.startswith("module.") for key in state["ema"])
    fresh = EmaLikeTimm(nn.Linear(3, 2))
    assert not torch.equal(fresh.module.weight, saved.get("ema").module.weight)  # negative control
    restored = StateRegistry()
    restored.register("ema", fresh)
    restored.load_state_dict(state)
    assert torch.equal(fresh.module.weight, saved.get("ema").module.weight)


def test_old_files_saved_from_a_ddp_wrapper_still_load_into_a_plain_module():
    model = nn.Linear(3, 2)
    registry = StateRegistry()
    registry.register("model", nn.Linear(3, 2))
    registry.load_state_dict({"model": {f"module.{key}": value for key, value in model.state_dict().items()}})
    assert torch.equal(registry.get("model").weight, model.weight)


@pytest.mark.parametrize("data, key", [
    ({"name": "exp1\n#SBATCH --wrap=evil"}, "name"),
    ({"launcher": {"backend": "slurm", "additional": {"comment": "x\n#SBATCH --exclusive"}}},
     "launcher.additional.comment"),
])
def test_values_that_would_inject_sbatch_lines_are_refused(data, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(data)


def test_validate_builds_a_user_loop_config_from_a_dict_with_the_defaults():
    cfg = validate({"trainer": {"max_steps": 7}})
    assert cfg.task is None and cfg.trainer.max_steps == 7 and cfg.checkpoint.every_steps == 100


def test_slurm_jobs_are_submitted_requeueable_and_a_new_submission_gets_a_fresh_timeout_budget(tmp_path):
    from harness.launch.slurm import TimeoutBudget, make_executor

    # submitit's executor looks for SLURM's srun (no cluster needs to run); CI installs it.
    require_cluster(shutil.which("srun") is not None, "needs SLURM's client commands (srun): "
                    "bash slurm/local-cluster.sh start installs them", "HARNESS_REQUIRE_SLURM")

    cfg = validate({"launcher": {"backend": "slurm", "timeout_min": 60, "additional": {"comment": "x"}}})
    executor = make_executor(cfg, str(tmp_path))
    script = executor._executor._make_submission_file_text("python train.py", "uid")  # what sbatch gets
    assert "#SBATCH --requeue" in script.splitlines() and "#SBATCH --comment=x" in script.splitlines()
    budget = TimeoutBudget(str(tmp_path), limit=1)
    assert budget.spend() and not budget.spend()  # the requeues of one job spend it...
    budget.reset()  # ...and submit() resets it for the next job
    assert budget.used() == 0 and budget.spend()


def test_help_lists_the_presets_but_not_the_internal_schema_entries(tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "harness.launch", "--help"], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "launcher: local" in done.stdout and "script=path/to/train.py" in done.stdout
    assert "_schema" not in done.stdout


class _FinishedJob:
    """What follow() reads of a submitit job once SLURM reports a final state."""

    def __init__(self, statuses: list[str]):
        self.job_id = "42"
        self._statuses = statuses

    def results(self) -> list[dict]:
        return [{"status": status, "rank": rank} for rank, status in enumerate(self._statuses)]


@pytest.mark.parametrize("state, statuses, code", [
    ("COMPLETED", ["finished", "finished"], 0),
    ("COMPLETED", ["preempted", "preempted"], 75),  # stopped after a save, but not requeued
    ("PREEMPTED", [], 75),  # preempted and not requeued (JobRequeue=0): a final state
    ("FAILED", [], 1),
])
def test_follow_reports_a_job_that_stopped_early_instead_of_success(state, statuses, code):
    from harness.launch.slurm import FINAL_STATES, _final_code

    assert state in FINAL_STATES
    assert _final_code(_FinishedJob(statuses), state) == code


def test_a_remote_checkpoint_is_read_through_one_node_local_copy_that_is_removed(tmp_path, monkeypatch):
    """Resume from an fsspec URL (memory://): the run resumes from the checkpoint of the step it
    stopped at, through one node-local copy of the payload that is removed after the restore.
    (Two ranks sharing one download from real S3: tests/e2e/test_remote.py.)"""
    from harness import Preempted, Session
    from harness.env import DistEnv

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    single = DistEnv(rank=0, local_rank=0, world_size=1, local_world_size=1, master_addr="127.0.0.1",
                     master_port=0, source="single")
    cfg = validate({"trainer": {"max_steps": 8, "num_threads": 1},
                    "checkpoint": {"dir": f"memory://{tmp_path.name}/run", "every_steps": 100}})

    resumed_at = []
    removed = []
    unlink = os.unlink

    def recording_unlink(path, *args, **kwargs):  # the real removal, recorded
        removed.append(os.path.basename(path))
        return unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", recording_unlink)

    def train(stop_at: int = 0) -> nn.Linear:
        with Session(cfg, env=single) as session:
            ref = session.resume_point()
            resumed_at.append(None if ref is None else ref.step)
            model = session.prepare(nn.Linear(2, 1))
            optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
            session.register(optimizer=optimizer)
            data = torch.utils.data.TensorDataset(torch.randn(64, 2))
            for (batch,) in session.batches(session.loader(data, batch_size=4)):
                model(batch).pow(2).mean().backward()
                optimizer.step()
                optimizer.zero_grad()
                if session.step + 1 == stop_at:
                    session.request_stop()
        return model

    reference = validate({"trainer": {"max_steps": 8, "num_threads": 1},
                          "checkpoint": {"dir": str(tmp_path / "local"), "every_steps": 100}})
    cfg, remote = reference, cfg
    expected = train()
    cfg = remote
    with pytest.raises(Preempted) as stopped:
        train(stop_at=4)
    assert resumed_at == [None, None]
    assert not [name for name in removed if name.startswith("harness-resume-")]
    resumed = train()
    assert resumed_at[-1] == stopped.value.step, "the third run must resume where the second stopped"
    assert torch.equal(resumed.weight, expected.weight)
    copies = [name for name in removed if name.startswith("harness-resume-")]
    assert len(copies) == 1 and copies[0].endswith(".safetensors"), f"one node-local copy, removed: {removed}"
    assert not list(tmp_path.glob("harness-resume-*")), "the node-local copy must be removed"


class BlinkingStorage:
    """A real LocalStorage seen as a remote store (no local paths) whose listing, manifest reads and
    payload reads each fail with EIO the first ``failures`` times: a throttled or briefly
    unreachable object store, as a restart after a node failure often meets it."""

    def __init__(self, local: LocalStorage, failures: int):
        self._local, self.root = local, local.root
        self.left = {"list": failures, "manifest": failures, "payload": failures}

    def __getattr__(self, name):
        return getattr(self._local, name)

    def _blink(self, what: str, rel: str = "") -> None:
        if self.left[what] > 0:
            self.left[what] -= 1
            raise OSError(errno.EIO, os.strerror(errno.EIO), rel)

    def list_names(self):
        self._blink("list")
        return self._local.list_names()

    def read_bytes(self, rel: str) -> bytes:
        if rel.endswith("manifest.json") and "step_000000020" in rel:
            self._blink("manifest", rel)
        return self._local.read_bytes(rel)

    def open_read(self, rel: str):
        if "step_000000020" in rel:
            self._blink("payload", rel)
        return self._local.open_read(rel)

    def local_path(self, rel: str):
        return None  # every byte goes through open_read, as on S3


@pytest.mark.parametrize("failures, chosen", [(1, 20), (100, None)], ids=["transient", "lasting"])
def test_a_transient_read_error_does_not_change_which_checkpoint_is_resumed(tmp_path, failures, chosen, caplog):
    local = LocalStorage(str(tmp_path))
    for step in (10, 20):
        _commit(CheckpointStore(local), step)
    store = CheckpointStore(BlinkingStorage(local, failures))
    with caplog.at_level(logging.WARNING, logger="harness"):
        if chosen is None:  # the control: an error that lasts still fails the listing, as before
            with pytest.raises(OSError):
                store.latest_valid(verify=True)
            return
        assert store.latest_valid(verify=True).step == chosen, "the newest checkpoint, not an older one"
    assert "retrying" in caplog.text
