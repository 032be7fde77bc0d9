"""How far a checkpoint folder is trusted: what the async writer hands its thread, what a prune may
fail, and which manifests, file names, folder names and payload headers make a checkpoint unusable
(skipped with a warning, the previous one used) instead of crashing or reading outside the folder."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import stat
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

# Imported here, not under capsys: harness.progress binds sys.stdout as a default argument at import.
from harness import Session
from harness.ckpt import main as ckpt_main
from harness.checkpoint import checksum
from harness.checkpoint.format import encode, read_payload, torch_load
from harness.checkpoint.storage.local import LocalStorage
from harness.checkpoint.storage.staged import StagedStorage
from harness.checkpoint.store import READ_ATTEMPTS, CheckpointStore, Retention
from harness.checkpoint.writer import CheckpointWriter
from harness.config import validate
from harness.env import DistEnv

DEADLINE_S = 20  # generous: these calls take milliseconds, but the machine is shared


def _commit(store: CheckpointStore, step: int) -> Path:
    """A real flat checkpoint of ``step`` (payload, then manifest)."""
    file = encode({"step": torch.tensor(step), "w": torch.full((4,), float(step))})
    store.commit(step, file.write_to, {}, payload_name=file.name)
    return Path(store.root) / f"step_{step:09d}"


def _run(tmp_path: Path, steps=(10, 20)) -> tuple[CheckpointStore, Path]:
    root = tmp_path / "run"
    store = CheckpointStore(LocalStorage(str(root)))
    for step in steps:
        _commit(store, step)
    return store, root


def _edit_manifest(step_dir: Path, edit) -> None:
    path = step_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def _within(seconds: float, work):
    """``work()``'s result, or an AssertionError if it has not returned within ``seconds`` (the
    thread is left behind: a daemon, blocked where it blocked)."""
    result, error = [], []

    def run():
        try:
            result.append(work())
        except BaseException as exc:  # handed to the test thread
            error.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise AssertionError(f"did not return within {seconds}s (blocked, e.g. opening a FIFO)")
    if error:
        raise error[0]
    return result[0]


# ---- 4, 8: the async writer's fallback snapshot ---------------------------------------------------

class GatedStorage:
    """A real LocalStorage whose writes wait for ``gate``: the background write happens only once
    the test has let the training loop move on."""

    def __init__(self, local: LocalStorage):
        self._local = local
        self.root = local.root
        self.gate = threading.Event()

    def __getattr__(self, name):
        return getattr(self._local, name)

    def write(self, rel, fill, algorithm=checksum.DEFAULT):
        assert self.gate.wait(DEADLINE_S), "the test never opened the gate"
        return self._local.write(rel, fill, algorithm)


def _async_writer(tmp_path: Path) -> tuple[CheckpointWriter, GatedStorage]:
    storage = GatedStorage(LocalStorage(str(tmp_path / "run")))
    return CheckpointWriter(CheckpointStore(storage), Retention(keep_last=0), asynchronous=True), storage


def test_async_fallback_save_holds_the_objects_of_its_own_step_not_later_ones(tmp_path):
    writer, storage = _async_writer(tmp_path)
    counts, weights, history = np.zeros(3), torch.zeros(3), [np.zeros(2)]
    payload = {"counts": counts, "w": weights, "nested": {"history": history, "meta": {"seen": [1]}}}
    writer.submit(10, payload, {})  # numpy arrays: the torch.save fallback
    counts += 1  # step 11 mutates everything in place while step 10 is being written
    weights += 1
    history[0] += 5
    payload["nested"]["meta"]["seen"].append(2)
    storage.gate.set()
    writer.flush()
    saved = torch_load(str(tmp_path / "run" / "step_000000010" / "state.pt"), unsafe=True)
    assert np.array_equal(saved["counts"], np.zeros(3))
    assert torch.equal(saved["w"], torch.zeros(3))
    assert np.array_equal(saved["nested"]["history"][0], np.zeros(2))
    assert saved["nested"]["meta"]["seen"] == [1]
    assert np.array_equal(counts, np.ones(3))  # negative control: the live object did change


def test_async_fallback_snapshot_keeps_keys_1_and_str_1_apart(tmp_path):
    writer, storage = _async_writer(tmp_path)
    payload = {"by_key": {1: torch.zeros(2), "1": torch.ones(2)}, "np": np.zeros(1)}
    writer.submit(10, payload, {})
    storage.gate.set()
    writer.flush()
    saved = torch_load(str(tmp_path / "run" / "step_000000010" / "state.pt"), unsafe=True)
    assert torch.equal(saved["by_key"][1], torch.zeros(2))
    assert torch.equal(saved["by_key"]["1"], torch.ones(2))


# ---- 6: a listing error while pruning -------------------------------------------------------------

class ListingFailsOnce:
    """A real LocalStorage whose next ``list_names`` fails like a throttled S3 ``ls``."""

    def __init__(self, local: LocalStorage):
        self._local = local
        self.root = local.root
        self.failures = 0

    def __getattr__(self, name):
        return getattr(self._local, name)

    def list_names(self):
        if self.failures:
            self.failures -= 1
            raise OSError(errno.EAGAIN, "SlowDown: please reduce your request rate", self.root)
        return self._local.list_names()


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_a_listing_error_while_pruning_is_a_warning_not_a_failed_save(tmp_path, caplog, asynchronous):
    storage = ListingFailsOnce(LocalStorage(str(tmp_path)))
    writer = CheckpointWriter(CheckpointStore(storage), Retention(keep_last=1), asynchronous=asynchronous)
    writer.submit(10, {"w": torch.zeros(2)}, {})
    writer.flush()
    storage.failures = READ_ATTEMPTS  # fails every retry: an outage longer than the retries
    with caplog.at_level(logging.WARNING, logger="harness"):
        writer.submit(20, {"w": torch.ones(2)}, {})  # committed; its prune cannot list the folder
        writer.flush()
    assert "SlowDown" in caplog.text and (tmp_path / "step_000000020" / "manifest.json").exists()
    assert (tmp_path / "step_000000010").exists()  # not pruned this time...
    writer.submit(30, {"w": torch.ones(2)}, {})
    writer.flush()
    assert sorted(os.listdir(tmp_path)) == ["step_000000030"]  # ...but at the next save


# ---- 9: manifest versions and entries -------------------------------------------------------------

def test_new_manifests_are_version_2_and_version_1_manifests_still_verify(tmp_path):
    store, root = _run(tmp_path)
    manifest = json.loads((root / "step_000000020" / "manifest.json").read_text())
    assert manifest["format_version"] == 2 and "checksum" in manifest["files"]["state.safetensors"]
    payload = (root / "step_000000020" / "state.safetensors").read_bytes()

    def version_1_sha256(manifest):  # what harness wrote before XXH3
        manifest["format_version"] = 1
        manifest["files"] = {"state.safetensors": {"bytes": len(payload),
                                                   "sha256": checksum.of_bytes(payload, "sha256").split(":")[1]}}

    _edit_manifest(root / "step_000000020", version_1_sha256)
    _edit_manifest(root / "step_000000010", lambda manifest: manifest.update(format_version=1))
    assert [ref.step for ref in store.list_complete()] == [10, 20]
    assert all(store.problems(ref) == [] for ref in store.list_complete())
    assert ckpt_main(["verify", str(root)]) == 0


UNUSABLE_MANIFESTS = {
    "newer-version": lambda m: m.update(format_version=3),
    "unknown-algorithm": lambda m: m["files"]["state.safetensors"].update(checksum="md5:00ff"),
    "no-checksum": lambda m: m["files"]["state.safetensors"].pop("checksum"),
    "no-bytes": lambda m: m["files"]["state.safetensors"].pop("bytes"),
    "bytes-not-a-number": lambda m: m["files"]["state.safetensors"].update(bytes="12"),
    "files-not-a-dict": lambda m: m.update(files=["state.safetensors"]),
    "no-files": lambda m: m.update(files={}),
    "no-step": lambda m: m.pop("step"),
}


@pytest.mark.parametrize("damage", sorted(UNUSABLE_MANIFESTS))
def test_an_unusable_manifest_skips_its_checkpoint_for_the_previous_one(tmp_path, caplog, capsys, damage):
    store, root = _run(tmp_path)
    _edit_manifest(root / "step_000000020", UNUSABLE_MANIFESTS[damage])
    with caplog.at_level(logging.WARNING, logger="harness"):
        assert store.latest_valid().step == 10
    assert "step_000000020" in caplog.text
    store.prune(Retention(keep_last=1), current=30)  # neither deleted as a partial save nor counted
    assert (root / "step_000000020" / "state.safetensors").exists()
    capsys.readouterr()
    assert ckpt_main(["verify", str(root)]) == 1
    out = capsys.readouterr().out
    assert "step_000000010: OK" in out and "step_000000020: UNUSABLE" in out


def test_a_ref_with_a_damaged_manifest_reports_problems_instead_of_raising(tmp_path):
    store, _ = _run(tmp_path)
    ref = store.latest_listed()
    for damage in ("unknown-algorithm", "no-checksum", "no-bytes", "files-not-a-dict"):
        manifest = json.loads(json.dumps(ref.manifest))
        UNUSABLE_MANIFESTS[damage](manifest)
        found = store.problems(type(ref)(step=ref.step, name=ref.name, manifest=manifest))
        assert found, damage


def test_staging_recovery_skips_a_manifest_with_an_unknown_checksum_algorithm(tmp_path, caplog):
    staging, dest = tmp_path / "staging", tmp_path / "dest"
    _commit(CheckpointStore(LocalStorage(str(staging))), 10)
    _edit_manifest(staging / "step_000000010", UNUSABLE_MANIFESTS["unknown-algorithm"])
    staged = StagedStorage(LocalStorage(str(staging)), LocalStorage(str(dest)))
    with caplog.at_level(logging.WARNING, logger="harness"):
        staged.flush()  # the uploader neither crashes nor publishes it
    assert "not uploading" in caplog.text and not (dest / "step_000000010" / "manifest.json").exists()


# ---- 10: file names outside the checkpoint folder ---------------------------------------------------

OUTSIDE_NAMES = {"dot-dot": "../../outside", "subfolder-dot-dot": "shards/../../../outside",
                 "subfolder-then-absolute": "shards//{fifo}"}


@pytest.mark.parametrize("where", ["dot-dot", "absolute", "subfolder-dot-dot", "subfolder-then-absolute"])
def test_a_manifest_naming_a_file_outside_its_folder_is_skipped_without_opening_it(tmp_path, caplog, where):
    store, root = _run(tmp_path)
    fifo = tmp_path / "outside"  # opening a FIFO for reading blocks until a writer comes
    os.mkfifo(fifo)
    name = str(fifo) if where == "absolute" else OUTSIDE_NAMES[where].format(fifo=fifo)

    def name_outside(manifest):
        manifest["files"] = {name: {"bytes": 0, "checksum": checksum.of_bytes(b"")}, **manifest["files"]}

    _edit_manifest(root / "step_000000020", name_outside)
    try:
        with caplog.at_level(logging.WARNING, logger="harness"):
            assert _within(DEADLINE_S, store.latest_valid).step == 10
        assert "step_000000020" in caplog.text
    finally:
        # A writer end opens without blocking only while a reader holds the FIFO open: ENXIO proves
        # that nothing is reading it now. (Opening it also releases a reader blocked by a failure.)
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            opened = True
        except OSError as error:
            assert error.errno == errno.ENXIO
            opened = False
    assert not opened, "something opened the file outside the checkpoint folder"
    assert ckpt_main(["verify", str(root)]) == 1


@pytest.mark.parametrize("target", ["identical-copy", "fifo"])
def test_a_payload_that_is_a_symlink_is_not_followed(tmp_path, caplog, target):
    store, root = _run(tmp_path)
    payload = root / "step_000000020" / "state.safetensors"
    outside = tmp_path / "outside"
    if target == "identical-copy":  # the same bytes: only the link itself can be refused
        shutil.copyfile(payload, outside)
    else:
        os.mkfifo(outside)
    payload.unlink()
    payload.symlink_to(outside)
    with caplog.at_level(logging.WARNING, logger="harness"):
        assert _within(DEADLINE_S, store.latest_valid).step == 10
    assert "symbolic link" in caplog.text
    if target == "fifo":
        with pytest.raises(OSError) as raised:
            os.close(os.open(outside, os.O_WRONLY | os.O_NONBLOCK))
        assert raised.value.errno == errno.ENXIO  # no reader: it was never opened


# ---- 11: the folder's name against its manifest ------------------------------------------------------

def test_a_folder_whose_name_disagrees_with_its_manifest_step_is_skipped_and_never_pruned(tmp_path, caplog):
    store, root = _run(tmp_path)
    shutil.copytree(root / "step_000000010", root / "step_000000900")  # a step-10 checkpoint
    (root / "step_000000050").symlink_to(root / "step_000000020")  # a step-20 one, via a link
    with caplog.at_level(logging.WARNING, logger="harness"):
        newest = store.latest_valid()
    assert (newest.step, newest.name) == (20, "step_000000020")
    assert "step_000000900" in caplog.text and "step 10" in caplog.text
    assert [ref.name for ref in store.list_complete()] == ["step_000000010", "step_000000020"]
    _commit(store, 60)
    store.prune(Retention(keep_last=1), current=60)
    assert (root / "step_000000900" / "manifest.json").exists()
    assert os.path.islink(root / "step_000000050")  # not deleted as if it were step 50
    assert ckpt_main(["verify", str(root)]) == 1


# ---- 12: a payload whose safetensors header lies --------------------------------------------------------

def _rewrite_payload(step_dir: Path, edit) -> None:
    """Change the payload's bytes, then record their true size and checksum: a file whose checksum
    matches but whose content is bogus."""
    path = step_dir / "state.safetensors"
    data = edit(bytearray(path.read_bytes()))
    path.write_bytes(bytes(data))

    def record(manifest):
        manifest["files"]["state.safetensors"] = checksum.file_entry(len(data), checksum.of_bytes(bytes(data)))

    _edit_manifest(step_dir, record)


def _header(data: bytearray) -> dict:
    return json.loads(data[8:8 + int.from_bytes(data[:8], "little")])


def _with_header(data: bytearray, header: dict) -> bytearray:
    """The same file with a new header, padded to the old length (the data stays where it was)."""
    length = int.from_bytes(data[:8], "little")
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= length
    return data[:8] + text + b" " * (length - len(text)) + data[8 + length:]


def _tensor_entry(edit):
    def change(data):
        header = _header(data)
        edit(header["w"])
        return _with_header(data, header)
    return change


BOGUS_HEADERS = {
    "length-2^62": lambda data: bytearray((1 << 62).to_bytes(8, "little")) + data[8:],
    "length-past-the-end": lambda data: bytearray((len(data)).to_bytes(8, "little")) + data[8:],
    "not-json": lambda data: data[:8] + b"[" + data[9:],
    "offsets-past-the-data": _tensor_entry(lambda entry: entry.update(data_offsets=[0, 1 << 40])),
    "negative-offset": _tensor_entry(lambda entry: entry.update(data_offsets=[-8, 8])),
    "unknown-dtype": _tensor_entry(lambda entry: entry.update(dtype="F128")),
    "shape-disagrees-with-span": _tensor_entry(lambda entry: entry.update(shape=[5])),
    "skeleton-names-a-missing-tensor": lambda data: _with_header(data, {
        **_header(data), "__metadata__": {**_header(data)["__metadata__"],
                                          "skeleton": _header(data)["__metadata__"]["skeleton"].replace('"w"', '"v"')}}),
}


@pytest.mark.parametrize("damage", sorted(BOGUS_HEADERS))
def test_a_payload_with_a_bogus_header_but_a_matching_checksum_is_corrupt(tmp_path, caplog, capsys, damage):
    store, root = _run(tmp_path)
    _rewrite_payload(root / "step_000000020", BOGUS_HEADERS[damage])
    assert store.problems(store.latest_listed(), verify=True)
    for verify in (True, False):  # the header check is cheap: it runs without checkpoint.verify too
        with caplog.at_level(logging.WARNING, logger="harness"):
            assert store.latest_valid(verify=verify).step == 10
    capsys.readouterr()
    assert ckpt_main(["verify", str(root)]) == 1
    assert "step_000000020: CORRUPT" in capsys.readouterr().out


def test_the_header_check_accepts_every_payload_the_writer_produces(tmp_path):
    """Negative control for the checks above: real payloads of every kind pass."""
    store = CheckpointStore(LocalStorage(str(tmp_path)))
    payloads = [{}, {"empty": torch.zeros(0, 3), "scalar": torch.tensor(1.5)},
                {"state": torch.nn.Linear(3, 2).state_dict(), "bf16": torch.ones(3, dtype=torch.bfloat16),
                 "flags": torch.tensor([True]), "t": (1, "x", None)}]
    for step, payload in enumerate(payloads, start=1):
        file = encode(payload)
        store.commit(step, file.write_to, {}, payload_name=file.name)
    assert [store.problems(ref) for ref in store.list_complete()] == [[], [], []]


# ---- 13: ckpt verify lists every folder --------------------------------------------------------------

def test_verify_lists_every_step_folder_and_fails_on_any_that_is_not_ok(tmp_path, capsys):
    store, root = _run(tmp_path, steps=(10, 20, 30))
    (root / "step_000000020" / "manifest.json").write_text("{not json")
    (root / "step_000000040").mkdir()  # a save in progress, or one that crashed
    (root / "step_000000040" / "state.safetensors").write_bytes(b"partial")
    assert ckpt_main(["verify", str(root)]) == 1
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[:4] == ["step_000000010: OK", "step_000000020: UNUSABLE", "step_000000030: OK",
                         "step_000000040: INCOMPLETE"], captured.out
    assert "manifest" in captured.err
    assert ckpt_main(["verify", str(root / "step_000000020")]) == 1
    assert ckpt_main(["verify", str(root / "step_000000040")]) == 1
    assert ckpt_main(["verify", str(root / "step_000000030")]) == 0
    shutil.rmtree(root / "step_000000020")
    shutil.rmtree(root / "step_000000040")
    capsys.readouterr()
    assert ckpt_main(["verify", str(root)]) == 0  # negative control: a healthy folder
    assert capsys.readouterr().out.splitlines() == ["step_000000010: OK", "step_000000030: OK"]


# ---- 12 (continued): a payload that verifies but cannot be read --------------------------------------

def _train(root: Path, max_steps: int):
    """A one-process run of the real Session, saving every 4 steps; returns the session."""
    single = DistEnv(rank=0, local_rank=0, world_size=1, local_world_size=1, master_addr="127.0.0.1",
                     master_port=0, source="single")
    cfg = validate({"trainer": {"max_steps": max_steps, "num_threads": 1},
                    "checkpoint": {"dir": str(root), "every_steps": 4, "keep_last": 0}})
    with Session(cfg, env=single) as session:
        model = session.prepare(torch.nn.Linear(2, 1))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        session.register(optimizer=optimizer)
        data = torch.utils.data.TensorDataset(torch.randn(64, 2))
        for (batch,) in session.batches(session.loader(data, batch_size=4)):
            model(batch).pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
    return session


def test_a_payload_that_verifies_but_cannot_be_read_falls_back_to_the_previous_checkpoint(tmp_path, caplog):
    root = tmp_path / "run"
    _train(root, max_steps=8)
    newest = root / "step_000000008"
    payload = read_payload(str(newest / "state.safetensors"))
    payload["format_version"] = 99  # a payload format this harness does not read...
    file = encode(payload)
    with open(newest / "state.safetensors.new", "wb") as handle:
        file.write_to(handle)
    os.replace(newest / "state.safetensors.new", newest / "state.safetensors")
    _rewrite_payload(newest, lambda data: data)  # ...in a file whose manifest, size, checksum, header agree
    store = CheckpointStore(LocalStorage(str(root)))
    assert store.problems(store.latest_listed()) == []  # verification cannot see it
    with caplog.at_level(logging.WARNING, logger="harness"):
        session = _train(root, max_steps=12)
    assert session.resumed_from.step == 4 and session.resumed_from.name == "step_000000004"
    assert "could not read" in caplog.text and "format v99" in caplog.text
    assert json.loads((root / "step_000000012" / "manifest.json").read_text())["step"] == 12
