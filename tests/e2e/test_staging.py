"""checkpoint.staging_dir: commit to a local folder, upload behind, never lose or reorder anything.

The "remote" is a real folder (a LocalStorage whose writes can be held back by a gate, so the test
controls only the timing) or the real moto S3 server of test_remote. Uploads run in the real
background thread; nothing is mocked.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, IO

import pytest
import torch

from conftest import REPO, kill_tree, launch_cmd, metrics, wait_for, worker_pids
from harness.checkpoint.storage.staged import StagedStorage
from harness.checkpoint.layout import HASH_CHUNK, MANIFEST_NAME, PAYLOAD_NAME, step_dir_name
from harness.checkpoint import checksum, flat
from harness.checkpoint.format import encode
from harness.checkpoint.errors import CheckpointError
from harness.checkpoint.store import CheckpointStore, Retention
from harness.checkpoint.storage.local import LocalStorage
from harness.checkpoint.storage import open_storage

# The moto S3 server fixtures; without s3fs/boto3/moto only the S3 tests are skipped, except under
# HARNESS_REQUIRE_ALL=1 (CI), where the import fails this module instead of skipping anything.
try:
    from test_remote import BUCKET, _keys, moto_server, s3_url  # noqa: F401  (pytest fixtures)
    from harness.checkpoint.storage.fsspec import FsspecStorage
    HAVE_S3 = True
except pytest.skip.Exception:
    HAVE_S3 = False
needs_s3 = pytest.mark.skipif(not HAVE_S3, reason="S3 tests need s3fs, boto3 and moto[server]")

GATE_TIMEOUT_S = 120


class CountingWriter:
    """Passes writes through, recording each write's size."""

    def __init__(self, raw: IO[bytes], sizes: list[int]):
        self._raw, self._sizes = raw, sizes

    def write(self, data) -> int:
        self._sizes.append(len(memoryview(data).cast("B")))
        return self._raw.write(data)


class GatedRemote(LocalStorage):
    """A real LocalStorage used as the remote. Its writes wait while ``gate`` is closed and fail with
    an injected OSError where ``fail(rel)`` says so; it records what it was asked to do, and whether
    a newer complete checkpoint existed on it whenever one was deleted."""

    def __init__(self, root: Path, fail: Callable[[str], bool] = lambda rel: False):
        super().__init__(str(root))
        self.gate = threading.Event()
        self.gate.set()
        self.fail = fail
        self.started: list[str] = []  # writes entered (maybe waiting at the gate)
        self.done: list[tuple[str, str]] = []  # ("write" | "remove", rel), in completion order
        self.chunks: list[int] = []  # sizes of the writes the uploader streamed into us
        self.removed_without_newer: list[str] = []

    def write(self, rel, fill, algorithm=checksum.DEFAULT):
        self.started.append(rel)
        if not self.gate.wait(GATE_TIMEOUT_S):
            raise TimeoutError("the test never opened the gate")
        if self.fail(rel):
            raise OSError(errno.ENOSPC, "No space left on device (injected)", f"{self.root}/{rel}")
        result = super().write(rel, lambda handle: fill(CountingWriter(handle, self.chunks)), algorithm)
        self.done.append(("write", rel))
        return result

    def remove_dir(self, rel):
        steps = [ref.step for ref in CheckpointStore(LocalStorage(self.root)).list_complete()]
        if not any(step > int(rel.split("_")[1]) for step in steps):
            self.removed_without_newer.append(rel)
        super().remove_dir(rel)
        self.done.append(("remove", rel))


def _data(step: int, size: int = 4096) -> bytes:
    """A readable flat payload of exactly ``size`` bytes (>= its 4096-byte header), distinct per step:
    verification checks the payload's header, so random bytes would not pass as a checkpoint."""
    seed = hashlib.sha256(str(step).encode()).digest()
    body = bytearray((seed * ((size - flat.ALIGN) // len(seed) + 1))[:size - flat.ALIGN])
    tensor = torch.frombuffer(body, dtype=torch.uint8) if body else torch.zeros(0, dtype=torch.uint8)
    buffer = io.BytesIO()
    encode({"bytes": tensor}).write_to(buffer)
    assert len(buffer.getvalue()) == size
    return buffer.getvalue()


def _commit(store: CheckpointStore, step: int, size: int = 4096) -> None:
    store.commit(step, lambda handle: handle.write(_data(step, size)), {"metric": None})


def _files(step: int) -> list[str]:
    return [f"{step_dir_name(step)}/{PAYLOAD_NAME}", f"{step_dir_name(step)}/{MANIFEST_NAME}"]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _steps(root: Path) -> list[int]:
    """Complete checkpoints in a plain folder, read with the ordinary LocalStorage protocol."""
    return [ref.step for ref in CheckpointStore(LocalStorage(str(root))).list_complete()]


def _staged(tmp_path: Path, remote) -> CheckpointStore:
    return CheckpointStore(StagedStorage(LocalStorage(str(tmp_path / "stage")), remote))


def _uploader_threads(storage: StagedStorage) -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == f"harness-upload:{storage.root}"]


# ----- the upload: order, streaming, completeness -----------------------------------------------------
def test_upload_streams_payload_in_chunks_then_manifest(tmp_path):
    remote = GatedRemote(tmp_path / "remote")
    store = _staged(tmp_path, remote)
    size = 2 * HASH_CHUNK + 12345
    _commit(store, 10, size)
    store.storage.flush()
    assert remote.done == [("write", rel) for rel in _files(10)]  # payload published before manifest
    payload_chunks = remote.chunks[:-1]  # the last write is the (small) manifest
    assert max(payload_chunks) <= HASH_CHUNK and sum(payload_chunks) == size
    assert len(payload_chunks) == 3  # streamed from the staged file, never read whole
    for rel in _files(10):
        assert _sha(tmp_path / "remote" / rel) == _sha(tmp_path / "stage" / rel)


def test_remote_has_no_manifest_while_upload_is_blocked(tmp_path):
    remote = GatedRemote(tmp_path / "remote")
    store = _staged(tmp_path, remote)
    _commit(store, 10)
    store.storage.flush()
    remote.gate.clear()
    _commit(store, 20)  # returns once staged locally: the upload is still held at the gate
    wait_for(lambda: f"{step_dir_name(20)}/{PAYLOAD_NAME}" in remote.started, what="upload of step 20")
    assert not (tmp_path / "remote" / step_dir_name(20) / MANIFEST_NAME).exists()
    assert CheckpointStore(LocalStorage(remote.root)).latest_valid().step == 10  # the remote alone
    assert store.latest_valid().step == 20  # through the staging folder: the local copy is complete
    assert store.storage.local_path(f"{step_dir_name(20)}/{PAYLOAD_NAME}").startswith(str(tmp_path / "stage"))
    remote.gate.set()
    store.storage.flush()
    assert CheckpointStore(LocalStorage(remote.root)).latest_valid().step == 20
    assert remote.done == [("write", rel) for rel in _files(10) + _files(20)]


def test_staging_folder_keeps_only_what_is_not_uploaded_and_the_newest(tmp_path):
    remote = GatedRemote(tmp_path / "remote")
    store = _staged(tmp_path, remote)
    for step in (10, 20, 30):
        _commit(store, step)
    store.storage.flush()
    assert _steps(tmp_path / "remote") == [10, 20, 30]
    assert sorted(os.listdir(tmp_path / "stage")) == [step_dir_name(30)]
    remote.gate.clear()
    _commit(store, 40)
    wait_for(lambda: remote.started[-1:] == [f"{step_dir_name(40)}/{PAYLOAD_NAME}"], what="upload of 40")
    assert sorted(os.listdir(tmp_path / "stage")) == [step_dir_name(30), step_dir_name(40)]
    assert [ref.step for ref in store.list_complete()] == [10, 20, 30, 40]  # both sides, one listing
    remote.gate.set()
    store.storage.flush()
    assert sorted(os.listdir(tmp_path / "stage")) == [step_dir_name(40)]


# ----- retention ------------------------------------------------------------------------------------
def test_prune_deletes_nothing_before_its_upload_is_done_and_skips_unstarted_uploads(tmp_path):
    remote = GatedRemote(tmp_path / "remote")
    store = _staged(tmp_path, remote)
    remote.gate.clear()
    _commit(store, 10)
    wait_for(lambda: remote.started, what="upload of step 10")  # its payload is being uploaded
    _commit(store, 20)  # queued behind it
    _commit(store, 30)
    assert [ref.step for ref in store.prune(Retention(keep_last=1))] == [10, 20]
    assert [ref.step for ref in store.list_complete()] == [30]  # pruned, as far as the caller sees
    for step in (10, 20):  # but no staged copy is deleted before the remote has something newer
        assert (tmp_path / "stage" / step_dir_name(step) / MANIFEST_NAME).exists()
    remote.gate.set()
    store.storage.flush()
    # 10's upload had started, so it was finished; 20's had not, so it never happened; both were
    # deleted only after 30 was complete on the remote
    assert remote.done == [*[("write", rel) for rel in _files(10) + _files(30)], ("remove", step_dir_name(10))]
    assert not any(rel.startswith(step_dir_name(20)) for rel in remote.started)
    assert remote.removed_without_newer == []
    assert os.listdir(tmp_path / "remote") == os.listdir(tmp_path / "stage") == [step_dir_name(30)]


def test_many_saves_with_slow_uploads_never_leave_the_remote_without_a_checkpoint(tmp_path):
    remote = GatedRemote(tmp_path / "remote")
    store = _staged(tmp_path, remote)
    retention = Retention(keep_last=2)
    for step in range(10, 130, 10):
        if step == 50:
            remote.gate.clear()  # a backlog builds up behind a stalled upload
        _commit(store, step, size=64 << 10)
        store.prune(retention)
        if step == 90:
            remote.gate.set()
    store.storage.flush()
    assert remote.removed_without_newer == []
    assert _steps(tmp_path / "remote") == [110, 120]
    assert os.listdir(tmp_path / "stage") == [step_dir_name(120)]
    written = [rel for kind, rel in remote.done if kind == "write"]
    for step in (110, 120):  # every upload kept payload-then-manifest order
        payload, manifest = _files(step)
        assert written.index(payload) < written.index(manifest)
    assert store.latest_valid().step == 120


# ----- failures -------------------------------------------------------------------------------------
def test_upload_to_unwritable_remote_fails_flush_and_keeps_local_checkpoint(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the remote folder should be")
    remote = GatedRemote(blocker / "remote")  # every real write fails: NotADirectoryError
    store = _staged(tmp_path, remote)
    remote.gate.clear()  # so the failure comes after the commit, not during it (see the next test)
    _commit(store, 10)  # the commit itself succeeds: it is staged locally
    remote.gate.set()
    with pytest.raises(CheckpointError, match=rf"could not upload {remote.root}/step_000000010/state.safetensors"):
        store.storage.flush()
    assert CheckpointStore(LocalStorage(str(tmp_path / "stage"))).latest_valid().step == 10  # kept
    store.storage.flush()  # reported once, not again


def test_upload_failure_surfaces_on_next_write_and_manifest_stays_unpublished(tmp_path):
    failing = {f"{step_dir_name(20)}/{PAYLOAD_NAME}"}
    remote = GatedRemote(tmp_path / "remote", fail=lambda rel: rel in failing)
    store = _staged(tmp_path, remote)
    _commit(store, 10)
    remote.gate.clear()  # the failure comes after commit 20 returned ...
    _commit(store, 20)
    remote.gate.set()
    wait_for(lambda: store.storage.pending == 0, what="the uploader to stop")  # ... and before 30
    with pytest.raises(CheckpointError) as raised:
        _commit(store, 30)
    message = str(raised.value)  # commit's message carries the upload's: which file, which remote, why
    assert f"could not upload {remote.root}/step_000000020/state.safetensors" in message, message
    assert "No space left on device (injected)" in message
    assert not (tmp_path / "stage" / step_dir_name(30)).exists()  # refused before writing anything
    assert _steps(tmp_path / "remote") == [10]  # no manifest over the payload that failed
    assert not (tmp_path / "remote" / step_dir_name(20)).exists()
    assert store.latest_valid().step == 20  # still staged locally
    store.storage.flush()  # already reported
    failing.clear()  # the remote recovers: later saves upload again
    _commit(store, 30)
    store.storage.flush()
    assert _steps(tmp_path / "remote") == [10, 30]
    assert _steps(tmp_path / "stage") == [20, 30]  # 20 was never uploaded: it stays staged


def test_prune_after_a_failed_upload_keeps_the_remotes_newest_checkpoint(tmp_path):
    remote = GatedRemote(tmp_path / "remote", fail=lambda rel: rel.startswith(step_dir_name(20)))
    store = _staged(tmp_path, remote)
    _commit(store, 10)
    remote.gate.clear()
    _commit(store, 20)
    remote.gate.set()
    with pytest.raises(CheckpointError, match="step_000000020"):
        store.storage.flush()
    store.prune(Retention(keep_last=1))  # retention sees 20 (staged) and drops 10 ...
    store.storage.flush()
    assert _steps(tmp_path / "remote") == [10]  # ... but 10 is the remote's only checkpoint: kept
    assert remote.removed_without_newer == []
    assert _steps(tmp_path / "stage") == [10, 20]


# ----- restart after a crash --------------------------------------------------------------------------
def test_construction_uploads_checkpoints_a_crash_left_staged_only(tmp_path):
    stage, remote_dir = tmp_path / "stage", tmp_path / "remote"
    staged_only = CheckpointStore(LocalStorage(str(stage)))
    for step in (10, 20, 30):
        _commit(staged_only, step)  # committed locally; the process died before uploading 20, 30
    for rel in _files(10):  # 10 was uploaded before the crash
        (remote_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(stage / rel, remote_dir / rel)
    partial = remote_dir / step_dir_name(20) / PAYLOAD_NAME  # 20's payload was half uploaded
    partial.parent.mkdir(parents=True)
    partial.write_bytes((stage / step_dir_name(20) / PAYLOAD_NAME).read_bytes()[:100])
    remote = GatedRemote(remote_dir)
    storage = StagedStorage(LocalStorage(str(stage)), remote)
    store = CheckpointStore(storage)
    assert store.latest_valid().step == 30  # readers see the staged copies at once ...
    assert remote.started == [] and _uploader_threads(storage) == []  # ... nothing uploads before a
    storage.flush()  # write or flush: ranks that only read never upload
    wait_for(lambda: not _uploader_threads(storage), what="the idle uploader thread to end")
    assert remote.done == [("write", rel) for rel in _files(20) + _files(30)]  # 10 was already there
    assert _steps(remote_dir) == [10, 20, 30]
    assert CheckpointStore(LocalStorage(str(remote_dir))).latest_valid().step == 30
    for rel in _files(30):
        assert _sha(remote_dir / rel) == _sha(stage / rel)
    assert os.listdir(stage) == [step_dir_name(30)]


def _commit_with_shard(store: CheckpointStore, stage: Path, step: int, remote=None) -> str:
    """A sharded commit: a "rank" wrote shards/part into the staging folder (and, given ``remote``,
    uploaded it itself) before rank 0 commits; returns the shard's checksum."""
    rel = f"{step_dir_name(step)}/shards/part"
    (stage / rel).parent.mkdir(parents=True)
    (stage / rel).write_bytes(b"shard %d" % step)
    digest = checksum.of_file(str(stage / rel))
    if remote is not None:
        remote.write(rel, lambda handle: handle.write((stage / rel).read_bytes()))
        store.storage.published_elsewhere({rel: digest})
    store.commit(step, lambda handle: handle.write(_data(step)), {"metric": None},
                 written={"shards/part": checksum.file_entry(len(b"shard %d" % step), digest)})
    return digest


def test_a_manifest_waits_for_shards_uploaded_by_other_ranks(tmp_path):
    """Files other writers put in the folder are published with the manifest only once recorded as
    uploaded by them: without that record the manifest stays unpublished (negative control)."""
    stage, remote_dir = tmp_path / "stage", tmp_path / "remote"
    remote = GatedRemote(remote_dir)
    store = _staged(tmp_path, remote)
    store.storage.claim(step_dir_name(10))
    _commit_with_shard(store, stage, 10, remote)
    store.storage.flush()
    assert _steps(remote_dir) == [10]
    assert CheckpointStore(LocalStorage(str(remote_dir))).latest_valid().step == 10
    store.storage.claim(step_dir_name(20))
    _commit_with_shard(store, stage, 20)  # the shard was never uploaded, nor recorded
    with pytest.raises(CheckpointError, match="shards/part did not reach"):
        store.storage.flush()
    assert _steps(remote_dir) == [10]


def test_a_staged_checkpoint_missing_a_shard_is_not_recovered(tmp_path, caplog):
    """After a crash, a checkpoint complete in the staging folder whose shard is not there (staged on
    another node) is not uploaded, and the start does not fail."""
    stage, remote_dir = tmp_path / "stage", tmp_path / "remote"
    _commit_with_shard(CheckpointStore(LocalStorage(str(stage))), stage, 10)
    (stage / step_dir_name(10) / "shards" / "part").unlink()
    storage = StagedStorage(LocalStorage(str(stage)), GatedRemote(remote_dir))
    storage.flush()
    assert _steps(remote_dir) == []
    assert "its shards/part is not in this staging folder" in caplog.text


def test_reads_prefer_complete_staged_copy_then_remote(tmp_path):
    stage, remote_dir = tmp_path / "stage", tmp_path / "remote"
    _commit(CheckpointStore(LocalStorage(str(remote_dir))), 10)  # only on the remote
    _commit(CheckpointStore(LocalStorage(str(stage))), 20)  # only staged
    LocalStorage(str(stage)).write(f"{step_dir_name(30)}/{PAYLOAD_NAME}", lambda h: h.write(b"partial"))
    storage = StagedStorage(LocalStorage(str(stage)), LocalStorage(str(remote_dir)))
    assert storage.list_names() == [step_dir_name(step) for step in (10, 20, 30)]
    assert [ref.step for ref in CheckpointStore(storage).list_complete()] == [10, 20]
    assert storage.local_path(_files(20)[0]) == str(stage / _files(20)[0])
    assert storage.local_path(_files(10)[0]) == str(remote_dir / _files(10)[0])
    assert storage.read_bytes(_files(10)[0]) == _data(10)
    assert storage.size(_files(20)[0]) == len(_data(20))
    with storage.open_read(f"{step_dir_name(30)}/{PAYLOAD_NAME}") as handle:
        assert handle.read() == b"partial"
    for read in (storage.read_bytes, storage.size, storage.open_read):
        with pytest.raises(FileNotFoundError):
            read(f"{step_dir_name(99)}/{PAYLOAD_NAME}")


# ----- on S3 (moto) ---------------------------------------------------------------------------------
@needs_s3
def test_commit_through_staging_reaches_s3_identical(moto_server, s3_url, tmp_path):
    storage = open_storage(s3_url, str(tmp_path / "stage"))
    assert isinstance(storage, StagedStorage) and storage.root == s3_url
    stage = Path(storage.local.root)
    assert stage.parent == tmp_path / "stage", "each destination stages in its own subfolder"
    store = CheckpointStore(storage)
    for step in (10, 20):
        _commit(store, step, size=3 << 20)
    storage.flush()
    assert _keys(moto_server, s3_url) == sorted(rel for step in (10, 20) for rel in _files(step))
    client = moto_server.client()
    prefix = s3_url.removeprefix(f"s3://{BUCKET}/")
    for rel in _files(20):
        body = client.get_object(Bucket=BUCKET, Key=f"{prefix}/{rel}")["Body"].read()
        assert hashlib.sha256(body).hexdigest() == _sha(stage / rel)
    assert CheckpointStore(FsspecStorage(s3_url)).latest_valid().step == 20  # verifies checksums too
    assert os.listdir(stage) == [step_dir_name(20)]


def test_runs_sharing_a_staging_folder_never_see_each_other(tmp_path):
    shared = str(tmp_path / "stage")
    run_a = CheckpointStore(open_storage(str(tmp_path / "a"), shared))
    _commit(run_a, 500)
    run_a.storage.flush()
    run_b = CheckpointStore(open_storage(str(tmp_path / "b"), shared))
    assert run_b.latest_valid() is None, "run B saw run A's staged checkpoint"
    run_b.storage.flush()
    assert not (tmp_path / "b").exists(), "run A's checkpoint was uploaded into run B's folder"


KILLED_UPLOADER = """
import os, sys
import torch
from harness.checkpoint.format import encode
from harness.checkpoint.storage.fsspec import FsspecStorage
from harness.checkpoint.storage.staged import StagedStorage
from harness.checkpoint.store import CheckpointStore
from harness.checkpoint.storage.local import LocalStorage

class HangsBeforePublishing(FsspecStorage):
    def write(self, rel, fill, algorithm="xxh3_128"):
        def stream_then_hang(handle):
            fill(handle)  # the parts are uploaded ...
            print("uploading", flush=True)
            sys.stdin.read()  # ... and the process is killed before the upload completes
        return super().write(rel, stream_then_hang, algorithm)

storage = StagedStorage(LocalStorage(sys.argv[2]), HangsBeforePublishing(sys.argv[1], block_size=5 << 20))
payload = encode({"bytes": torch.frombuffer(bytearray(os.urandom(12 << 20)), dtype=torch.uint8)})
CheckpointStore(storage).commit(10, payload.write_to, {})
print("committed", flush=True)
storage.flush()
"""


@needs_s3
def test_upload_killed_with_the_process_is_redone_by_the_next_start(moto_server, s3_url, tmp_path):
    stage = tmp_path / "stage"
    child = subprocess.Popen([sys.executable, "-c", KILLED_UPLOADER, s3_url, str(stage)], cwd=REPO,
                             text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        lines = {child.stdout.readline().strip() for _ in range(2)}
        assert lines == {"uploading", "committed"}
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait(timeout=30)
    assert _keys(moto_server, s3_url) == []  # nothing was published
    assert _steps(stage) == [10]
    storage = StagedStorage(LocalStorage(str(stage)), FsspecStorage(s3_url))
    storage.flush()
    remote = CheckpointStore(FsspecStorage(s3_url))
    assert remote.latest_valid().step == 10
    assert remote.checksum(_files(10)[0], "sha256") == "sha256:" + _sha(stage / _files(10)[0])


# ----- end to end: the real launcher, two DDP ranks, staged to S3 ------------------------------------
def _launch(*overrides: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "harness.launch", "name=t", "launcher.nproc_per_node=2",
               "trainer.num_threads=1", "checkpoint.every_steps=20", "task.scheduler.T_max=60",
               *overrides]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@needs_s3
def test_launcher_stages_to_s3_and_a_run_without_staging_resumes_from_it(moto_server, s3_url, tmp_path):
    stage = tmp_path / "stage"
    first = _launch(f"checkpoint.dir={s3_url}", f"checkpoint.staging_dir={stage}", "trainer.max_steps=40")
    assert f"no checkpoint in {s3_url}: starting fresh" in first.stdout
    assert CheckpointStore(FsspecStorage(s3_url)).latest_valid().step == 40
    assert _keys(moto_server, s3_url) == sorted(rel for step in (20, 40) for rel in _files(step))
    (destination,) = os.listdir(stage)  # one subfolder per destination
    assert os.listdir(stage / destination) == [step_dir_name(40)]
    second = _launch(f"checkpoint.dir={s3_url}", "trainer.max_steps=60")
    assert f"resumed from {s3_url}/step_000000040 at step 40" in second.stdout
    assert CheckpointStore(FsspecStorage(s3_url)).latest_valid().step == 60


@needs_s3
def test_a_job_whose_node_survived_resumes_its_staged_checkpoint_on_every_rank(moto_server, s3_url, tmp_path):
    """SIGTERM, exit 75, relaunch on the same node: every rank reads the newest checkpoint from the
    staging folder where it is complete (before, rank 0 did and rank 1 waited in a collective for a
    copy nobody downloaded: the job crashed)."""
    run, stage = tmp_path / "run", tmp_path / "stage"
    run.mkdir()
    command = launch_cmd(s3_url, "trainer.max_steps=60", "checkpoint.every_steps=10", "preempt.check_every=1",
                         f"checkpoint.staging_dir={stage}", f"trainer.metrics_file={run / 'metrics.jsonl'}")
    with open(tmp_path / "job.log", "w") as log:
        launcher = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        pids = worker_pids(launcher, 2)
        wait_for(lambda: max(metrics(run), default=0) >= 20, 120, "step 20")
        os.kill(pids[1], signal.SIGTERM)
        assert launcher.wait(timeout=120) == 75, (tmp_path / "job.log").read_text()
    finally:
        if launcher.poll() is None:
            kill_tree(launcher)
    stopped = CheckpointStore(FsspecStorage(s3_url)).latest_valid().step
    before = len(moto_server.requests())
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"resumed from {s3_url}/{step_dir_name(stopped)} at step {stopped}" in result.stdout, result.stdout
    assert not [line for line in moto_server.requests()[before:]
                if f"GET /{BUCKET}/" in line and f"{step_dir_name(stopped)}/{PAYLOAD_NAME}" in line]


def test_a_stop_waits_for_its_staged_upload_before_raising_preempted(tmp_path):
    """The stop's checkpoint must be durable at the destination (not only staged) when Preempted is
    raised: a held-back upload delays the exit, and the remote then holds the stop's step."""
    from harness import Preempted, Session, validate
    from harness.env import DistEnv

    remote = GatedRemote(tmp_path / "remote")
    cfg = validate({"trainer": {"max_steps": 100, "num_threads": 1},
                    "checkpoint": {"dir": str(tmp_path / "remote"), "staging_dir": str(tmp_path / "stage"),
                                   "every_steps": 1000}})
    env = DistEnv(rank=0, local_rank=0, world_size=1, local_world_size=1, master_addr="127.0.0.1",
                  master_port=0, source="single")
    opened_at: list[float] = []

    def open_gate_later() -> None:
        wait_for(lambda: remote.started, 60, "the stop's upload to start")
        time.sleep(1.0)  # the upload is held back this long
        opened_at.append(time.monotonic())
        remote.gate.set()

    with pytest.raises(Preempted) as stopped:
        with Session(cfg, env=env) as session:
            session.checkpoints.store.storage = StagedStorage(LocalStorage(str(tmp_path / "stage")), remote)
            model = session.prepare(torch.nn.Linear(2, 1))
            loader = session.loader(torch.utils.data.TensorDataset(torch.randn(64, 2)), batch_size=4)
            try:
                for (inputs,) in session.batches(loader):
                    model(inputs).sum().backward()
                    if session.step == 4:
                        remote.gate.clear()
                        threading.Thread(target=open_gate_later, daemon=True).start()
                        session.request_stop()
            except Preempted:  # when the loop learns of the stop, before the session closes
                raised_at = time.monotonic()
                raise
    assert opened_at and raised_at > opened_at[0], "Preempted was raised before the upload could finish"
    assert _steps(tmp_path / "remote") == [stopped.value.step]
