"""Checkpoints on S3 through fsspec: the same manifest-last protocol against a real (moto) S3 server.

The server is moto's standalone HTTP server in a subprocess; the harness reaches it only through the
standard environment variables (``AWS_ENDPOINT_URL_S3`` or fsspec's ``FSSPEC_S3_ENDPOINT_URL``), as
a user's job would. Nothing is patched in-process.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
import torch

from conftest import REPO, assert_tensors_equal, newest_payload, require_module, skip_unless_required, wait_for
from harness.checkpoint.format import read_payload
from harness.checkpoint.store import CheckpointStore, Retention
from harness.checkpoint.storage import open_storage
from harness.checkpoint.layout import step_dir_name

s3fs = require_module("s3fs", "S3 checkpoint tests need s3fs (pip install -e .[dev])")
boto3 = require_module("boto3", "S3 checkpoint tests need boto3 (pip install -e .[dev])")

from harness.checkpoint.storage.fsspec import FsspecStorage  # noqa: E402  (after the check for its backend)

BUCKET = "harness-test"
SERVER_START_S = 60.0
RUNNING_LINE = re.compile(r"Running on http://127\.0\.0\.1:(\d+)")
MIB = 1 << 20
S3_MIN_PART = 5 * MIB  # the smallest multipart part S3 (and moto) accept


@dataclass(frozen=True)
class MotoServer:
    endpoint: str
    process: subprocess.Popen
    log_path: Path  # its request log: one line per HTTP request

    def requests(self) -> list[str]:
        return [line for line in self.log_path.read_text().splitlines() if '"' in line]

    def client(self):
        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")


def _start_moto(log_path: Path) -> tuple[subprocess.Popen, int | None]:
    """moto's server bound to port 0 (the kernel picks a free one); returns it and the port it logged."""
    log = open(log_path, "w")
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", "0"],
                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline and process.poll() is None:
        match = RUNNING_LINE.search(log_path.read_text())
        if match:
            return process, int(match.group(1))
        time.sleep(0.05)
    return process, None


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory) -> Iterator[MotoServer]:
    log_path = tmp_path_factory.mktemp("moto") / "moto.log"
    process, port = _start_moto(log_path)
    if port is None:
        process.kill()
        process.wait(timeout=30)
        skip_unless_required("moto's S3 server did not start (pip install 'moto[server]'); its output: "
                    + log_path.read_text()[-2000:])
    server = MotoServer(endpoint=f"http://127.0.0.1:{port}", process=process, log_path=log_path)
    server.client().create_bucket(Bucket=BUCKET)
    yield server
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture
def s3_url(moto_server, monkeypatch, tmp_path, request) -> str:
    """A fresh s3:// prefix for this test; this process and its children reach moto through env vars."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "FSSPEC_S3_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto_server.endpoint)
    # A developer's ~/.aws must not redirect the tests to a real account.
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    s3fs.S3FileSystem.clear_instance_cache()  # no client built before these variables were set
    prefix = re.sub(r"[^A-Za-z0-9_-]", "-", request.node.name)
    return f"s3://{BUCKET}/{prefix}"


def _keys(server: MotoServer, url: str) -> list[str]:
    prefix = url.removeprefix(f"s3://{BUCKET}/") + "/"
    listing = server.client().list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return sorted(item["Key"].removeprefix(prefix) for item in listing.get("Contents", []))


def _uploads_in_progress(server: MotoServer, key: str) -> int:
    uploads = server.client().list_multipart_uploads(Bucket=BUCKET, Prefix=key).get("Uploads", [])
    return sum(1 for upload in uploads if upload["Key"] == key)


def _key(url: str, rel: str) -> str:
    return f"{url.removeprefix(f's3://{BUCKET}/')}/{rel}"


def _payload(step: int) -> dict:
    return {"step": step, "weights": torch.arange(1000, dtype=torch.float32) * step}


def _commit(store: CheckpointStore, step: int) -> None:
    store.commit(step, lambda handle: torch.save(_payload(step), handle), {"metric": None}, payload_name="state.pt")


def _store(url: str) -> CheckpointStore:
    return CheckpointStore(open_storage(url))


def test_open_storage_routes_urls_to_fsspec(s3_url):
    assert isinstance(open_storage(s3_url), FsspecStorage)
    assert open_storage(s3_url + "/").root == s3_url


def test_commit_writes_payload_then_manifest_and_resume_finds_newest(moto_server, s3_url):
    store = _store(s3_url)
    assert store.list_complete() == [] and store.latest_valid() is None  # prefix does not exist yet
    for step in (10, 20, 30):
        _commit(store, step)
    assert _keys(moto_server, s3_url) == [f"{step_dir_name(step)}/{name}" for step in (10, 20, 30)
                                          for name in ("manifest.json", "state.pt")]
    assert [ref.step for ref in store.list_complete()] == [10, 20, 30]
    newest = store.latest_valid()
    assert newest.step == 30
    loaded = torch.load(io.BytesIO(store.storage.read_bytes(f"{newest.name}/state.pt")), weights_only=True)
    assert torch.equal(loaded["weights"], _payload(30)["weights"])
    assert not store.storage.fs.transaction.files  # no file object kept per save


def test_listing_sees_checkpoints_another_client_committed(moto_server, s3_url):
    """s3fs caches listings per process; a long-lived store must still see other writers' commits."""
    store = _store(s3_url)
    _commit(store, 10)
    assert [ref.step for ref in store.list_complete()] == [10]  # the listing is now cached
    client = moto_server.client()
    # Another writer commits step 20: data, then manifest (of step 20: a manifest's step must match
    # its folder's name).
    client.copy_object(Bucket=BUCKET, Key=_key(s3_url, "step_000000020/state.pt"),
                       CopySource={"Bucket": BUCKET, "Key": _key(s3_url, "step_000000010/state.pt")})
    manifest = json.loads(store.storage.read_bytes("step_000000010/manifest.json")) | {"step": 20}
    client.put_object(Bucket=BUCKET, Key=_key(s3_url, "step_000000020/manifest.json"),
                      Body=json.dumps(manifest).encode())
    assert [ref.step for ref in store.list_complete()] == [10, 20]
    assert store.latest_valid().step == 20


def test_checkpoint_without_manifest_does_not_exist(s3_url):
    store = _store(s3_url)
    _commit(store, 10)
    store.storage.write("step_000000020/state.pt", lambda handle: torch.save(_payload(20), handle))
    assert "step_000000020" in store.storage.list_names()  # the data is there ...
    assert [ref.step for ref in store.list_complete()] == [10]  # ... but without a manifest it is not
    assert store.latest_valid().step == 10


@pytest.mark.parametrize("damage", ["truncated", "rewritten"])
def test_corrupt_payload_is_skipped_with_a_warning(moto_server, s3_url, damage, caplog):
    store = _store(s3_url)
    _commit(store, 10)
    _commit(store, 20)
    assert store.latest_valid().step == 20  # also fills the client's caches before the damage
    key = _key(s3_url, "step_000000020/state.pt")
    body = bytearray(moto_server.client().get_object(Bucket=BUCKET, Key=key)["Body"].read())
    if damage == "truncated":
        body = body[: len(body) // 2]
    else:
        body[len(body) // 2] ^= 0xFF  # same size: only the checksum can tell
    moto_server.client().put_object(Bucket=BUCKET, Key=key, Body=bytes(body))
    expected = "truncated" if damage == "truncated" else "xxh3_128 differs"
    with caplog.at_level("WARNING", logger="harness"):
        assert store.latest_valid().step == 10
    assert re.search(rf"skipping corrupt checkpoint {s3_url}/step_000000020: .*{expected}", caplog.text)


def test_prune_applies_retention_and_removes_stale_partials(moto_server, s3_url):
    store = _store(s3_url)
    for step in (10, 20, 30):
        _commit(store, step)
    store.storage.write("step_000000035/state.pt", lambda handle: handle.write(b"crashed before manifest"))
    for step in (40, 50):
        _commit(store, step)
    doomed = store.prune(Retention(keep_last=2))
    assert [ref.step for ref in doomed] == [10, 20, 30]
    assert [ref.step for ref in store.list_complete()] == [40, 50]
    assert _keys(moto_server, s3_url) == [f"{step_dir_name(step)}/{name}" for step in (40, 50)
                                          for name in ("manifest.json", "state.pt")]


def test_failed_fill_streams_parts_but_publishes_nothing(moto_server, s3_url):
    storage = FsspecStorage(s3_url, block_size=S3_MIN_PART)
    key = _key(s3_url, "step_000000010/state.pt")
    seen_in_flight = []

    def fill(handle):
        for _ in range(3):
            handle.write(os.urandom(4 * MIB))
        seen_in_flight.append(_uploads_in_progress(moto_server, key))  # parts left before fill ended
        raise RuntimeError("serialization failed")

    with pytest.raises(RuntimeError, match="serialization failed"):
        storage.write("step_000000010/state.pt", fill)
    assert seen_in_flight == [1]
    assert _keys(moto_server, s3_url) == []
    assert _uploads_in_progress(moto_server, key) == 0  # aborted, not left to be billed
    size, _ = storage.write("step_000000010/state.pt", lambda handle: handle.write(os.urandom(12 * MIB)))
    assert size == 12 * MIB and _keys(moto_server, s3_url) == ["step_000000010/state.pt"]  # control


KILLED_WRITER = """
import sys, torch
from harness.checkpoint.storage.fsspec import FsspecStorage
from harness.checkpoint.store import CheckpointStore

def fill(handle):
    handle.write(bytes(12 << 20))
    print("uploading", flush=True)
    sys.stdin.read()  # hang mid-upload until killed

CheckpointStore(FsspecStorage(sys.argv[1], block_size=5 << 20)).commit(10, fill, {}, payload_name="state.pt")
"""


def test_killed_upload_leaves_no_checkpoint(moto_server, s3_url):
    store = _store(s3_url)
    _commit(store, 5)
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, s3_url], cwd=REPO, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert writer.stdout.readline().strip() == "uploading"
        key = _key(s3_url, "step_000000010/state.pt")
        wait_for(lambda: _uploads_in_progress(moto_server, key), what="a multipart upload in flight")
        os.kill(writer.pid, signal.SIGKILL)
    finally:
        writer.kill()
        writer.wait(timeout=30)
    assert "step_000000010/state.pt" not in _keys(moto_server, s3_url)
    assert [ref.step for ref in store.list_complete()] == [5]
    assert store.latest_valid().step == 5


def test_fsspec_env_convention_also_configures_the_endpoint(moto_server, s3_url, monkeypatch):
    _commit(_store(s3_url), 10)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    monkeypatch.setenv("FSSPEC_S3_ENDPOINT_URL", moto_server.endpoint)  # read when fsspec is imported
    script = ("import sys; from harness.checkpoint.store import CheckpointStore; from harness.checkpoint.storage import open_storage; "
              "print(CheckpointStore(open_storage(sys.argv[1])).latest_valid().step)")
    result = subprocess.run([sys.executable, "-c", script, s3_url], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "10"


# ----- end to end: the real launcher, two DDP ranks, checkpoints on S3 -------------------------------
E2E_STEPS = 60
E2E_OVERRIDES = ["launcher.nproc_per_node=2", "trainer.num_threads=1", "checkpoint.every_steps=20",
                 f"task.scheduler.T_max={E2E_STEPS}"]  # one LR schedule for every leg


def _launch(ckpt_dir: str, max_steps: int, *overrides: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "harness.launch", "name=t", f"checkpoint.dir={ckpt_dir}",
               f"trainer.max_steps={max_steps}", *E2E_OVERRIDES, *overrides]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_launcher_trains_to_s3_and_resumes_bit_exact(moto_server, s3_url, tmp_path):
    first = _launch(s3_url, 40)
    assert f"no checkpoint in {s3_url}: starting fresh" in first.stdout
    assert _keys(moto_server, s3_url) == [f"{step_dir_name(step)}/{name}" for step in (20, 40)
                                          for name in ("manifest.json", "state.safetensors")]
    second = _launch(s3_url, E2E_STEPS)
    assert f"resumed from {s3_url}/step_000000040 at step 40" in second.stdout
    store = _store(s3_url)
    final = store.latest_valid()
    assert final.step == E2E_STEPS
    copy = tmp_path / "remote.safetensors"
    copy.write_bytes(store.storage.read_bytes(final.payload_path))
    remote = read_payload(str(copy))
    local_dir = tmp_path / "local"
    _launch(str(local_dir), E2E_STEPS)  # the same training, uninterrupted, on a local folder
    local = newest_payload(local_dir)
    assert remote["progress"] == local["progress"] and remote["progress"]["step"] == E2E_STEPS
    assert_tensors_equal(remote["state"], local["state"], "state")


def test_a_resume_from_s3_downloads_the_payload_once_per_node_and_removes_the_copy(moto_server, s3_url, tmp_path,
                                                                                 monkeypatch):
    """Two ranks on one node resume from S3: local rank 0 downloads the payload once into a node-local
    file that both ranks map (one download, not one per rank), and the file is gone afterwards."""
    _launch(s3_url, 40)
    node_tmp = tmp_path / "node-tmp"
    node_tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(node_tmp))  # where the node-local copy goes (tempfile.gettempdir)
    before = len(moto_server.requests())
    # verify=false: rank 0 does not hash the payload; it still reads its header (one GET: a payload
    # whose header is bogus is never chosen), then local rank 0 downloads it once for the node.
    second = _launch(s3_url, E2E_STEPS, "checkpoint.verify=false")
    assert f"resumed from {s3_url}/step_000000040 at step 40" in second.stdout
    key = "/" + _key(s3_url, "step_000000040/state.safetensors")
    gets = [line for line in moto_server.requests()[before:] if f"GET /{BUCKET}{key} " in line]  # ranged or not
    assert len(gets) == 2, f"expected the header check and one download for the node's 2 ranks, got {len(gets)}: {gets}"
    assert not list(node_tmp.glob("harness-resume-*")), "the node-local copy must be removed"
    assert _store(s3_url).latest_valid().step == E2E_STEPS


def _tool(*args: str, tmpdir: Path) -> subprocess.CompletedProcess:
    """``python -m harness.ckpt`` as a user runs it, reaching moto through the same variables."""
    env = {**os.environ, "TMPDIR": str(tmpdir)}
    return subprocess.run([sys.executable, "-m", "harness.ckpt", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_ckpt_tools_read_a_run_folder_on_s3(moto_server, s3_url, tmp_path):
    """verify, inspect and export take an s3:// run folder as they take a local one: verify reads the
    objects where they are and names a corrupted one; export and inspect copy one checkpoint into a
    temporary folder (removed when the command ends) and skip a newer one that is cut short."""
    store = _store(s3_url)
    weights = {step: {"module.fc.weight": torch.randn(4, 3), "module.fc.bias": torch.full((4,), float(step))}
               for step in (10, 20)}
    for step, state in weights.items():
        store.commit(step, lambda handle, state=state: torch.save(state, handle), {"metric": None},
                     payload_name="state.pt")
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()

    checked = _tool("verify", s3_url, tmpdir=tmpdir)
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.splitlines() == ["step_000000010: OK", "step_000000020: OK"]

    shown = _tool("inspect", f"{s3_url}/step_000000010", "--json", tmpdir=tmpdir)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["path"] == f"{s3_url}/step_000000010/state.pt"

    exported = _tool("export", s3_url, str(tmp_path / "model.pt"), tmpdir=tmpdir)
    assert exported.returncode == 0, exported.stderr
    assert_tensors_equal(torch.load(tmp_path / "model.pt"), {"fc.weight": weights[20]["module.fc.weight"],
                                                             "fc.bias": weights[20]["module.fc.bias"]})
    assert f"copying {s3_url}/step_000000020" in exported.stderr
    assert not list(tmpdir.iterdir()), "the local copy must be removed"

    key = _key(s3_url, "step_000000020/state.pt")
    body = moto_server.client().get_object(Bucket=BUCKET, Key=key)["Body"].read()
    moto_server.client().put_object(Bucket=BUCKET, Key=key, Body=body[: len(body) // 2])
    checked = _tool("verify", s3_url, tmpdir=tmpdir)
    assert checked.returncode == 1
    assert checked.stdout.splitlines() == ["step_000000010: OK", "step_000000020: CORRUPT"]
    assert "step_000000020/state.pt" in checked.stderr and "truncated" in checked.stderr
    exported = _tool("export", s3_url, str(tmp_path / "older.pt"), tmpdir=tmpdir)
    assert exported.returncode == 0, exported.stderr
    assert f"skipping {s3_url}/step_000000020" in exported.stderr
    assert_tensors_equal(torch.load(tmp_path / "older.pt")["fc.bias"], weights[10]["module.fc.bias"])

    missing = _tool("verify", f"{s3_url}-absent", tmpdir=tmpdir)
    assert missing.returncode == 1
    assert missing.stderr.strip() == f"harness.ckpt: {s3_url}-absent: no checkpoint (step_*/manifest.json) in this folder"
    assert not list(tmpdir.iterdir())


def test_ctrl_c_during_a_copy_from_s3_exits_130_and_removes_the_copy(moto_server, s3_url, tmp_path):
    """Ctrl-C while ``export`` copies a checkpoint from S3: one line, exit 130, no temporary copy and
    no OUT left behind."""
    store = _store(s3_url)
    # 256 MB: the copy lasts a second or more, so the signal lands in it even when this process is
    # scheduled late on a loaded machine (with 64 MB a CI run once finished the export first).
    big = {"fc.weight": torch.zeros(64, 1 << 20)}
    store.commit(10, lambda handle: torch.save(big, handle), {"metric": None}, payload_name="state.pt")
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    # SIGINT as a terminal gives it: a shell's background job (a CI script's `... &`) starts with it
    # ignored, which every child inherits, and Python then leaves it ignored.
    tool = subprocess.Popen([sys.executable, "-m", "harness.ckpt", "export", s3_url, str(tmp_path / "model.pt")],
                            cwd=REPO, env={**os.environ, "TMPDIR": str(tmpdir)}, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    first = tool.stderr.readline()
    assert first.startswith(f"harness.ckpt: copying {s3_url}/step_000000010"), first
    tool.send_signal(signal.SIGINT)
    rest = tool.stderr.read()
    assert tool.wait(timeout=60) == 130, rest
    assert rest == "harness.ckpt: interrupted\n"
    assert not list(tmpdir.iterdir()) and not (tmp_path / "model.pt").exists()
