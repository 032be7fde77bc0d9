"""The checkpoint file formats: the flat (safetensors-compatible) file, its fallback to torch.save,
XXH3 checksums next to the older sha256 ones, and O_DIRECT writes straight from aligned memory."""

from __future__ import annotations

import collections
import json
import logging
import mmap
import random
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_tensors_equal
from harness.checkpoint import checksum, flat
from harness.checkpoint.format import encode, read_payload
from harness.checkpoint.layout import LEGACY_PAYLOAD_NAME, PAYLOAD_NAME
from harness.checkpoint.payload import capture_rng
from harness.checkpoint.storage.local import LocalStorage
from harness.checkpoint.store import CheckpointStore, Retention
from harness.checkpoint.writer import CheckpointWriter


def _trained_state() -> dict:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.BatchNorm1d(7), torch.nn.Linear(7, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 5)).square().mean().backward()
    optimizer.step()
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict()}


def _payload() -> dict:
    return {
        "format": "harness.checkpoint", "state": _trained_state(), "rng": [capture_rng(), capture_rng()],
        "plain": (1, 2.5, float("inf"), None, True, "text", b"\x00\xff", torch.Size([2, 3]), torch.bfloat16),
        "int_keys": {0: "zero", (1, 2): "tuple key"}, "half": torch.randn(3, 2).to(torch.bfloat16),
        "empty": torch.zeros(0, 4), "scalar": torch.tensor(7, dtype=torch.int64), "flag": torch.tensor([True, False]),
    }


def _same(a, b) -> bool:
    """Equal values AND equal types, all the way down (a tuple must come back a tuple)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[key], b[key]) for key in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _write(path, payload) -> None:
    file = encode(payload)
    assert file.name == PAYLOAD_NAME
    with open(path, "wb") as handle:
        file.write_to(handle)


def test_a_flat_file_gives_back_every_value_with_its_type_and_safetensors_reads_its_tensors(tmp_path):
    payload = _payload()
    path = tmp_path / PAYLOAD_NAME
    _write(path, payload)
    loaded = read_payload(str(path))
    assert _same(payload, loaded)
    assert isinstance(loaded["state"]["model"], collections.OrderedDict)
    assert loaded["state"]["model"]._metadata == payload["state"]["model"]._metadata  # module versions
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    assert (8 + header_len) % flat.ALIGN == 0  # the data section is page-aligned
    tensors = load_file(str(path))  # any safetensors tool reads the weights
    assert torch.equal(tensors["state/model/0.weight"], payload["state"]["model"]["0.weight"])
    assert torch.equal(tensors["half"], payload["half"])


def test_a_loaded_tensor_can_be_changed_and_saved_on_its_own_without_touching_the_file(tmp_path):
    path = tmp_path / PAYLOAD_NAME
    _write(path, _payload())
    before = path.read_bytes()
    loaded = read_payload(str(path))
    weight = loaded["state"]["model"]["0.weight"]
    weight.add_(1.0)  # optimizers keep loaded state tensors and update them in place
    assert path.read_bytes() == before
    torch.save(weight, tmp_path / "one.pt")  # its own storage: only its bytes are written
    assert (tmp_path / "one.pt").stat().st_size < 2 * weight.numel() * 4 + 2000


def test_a_truncated_flat_file_is_a_clear_error(tmp_path):
    path = tmp_path / PAYLOAD_NAME
    _write(path, _payload())
    data = path.read_bytes()
    path.write_bytes(data[:len(data) - 100])
    with pytest.raises(ValueError, match="truncated"):
        read_payload(str(path))


def test_a_payload_that_is_not_plain_data_falls_back_to_torch_save_and_says_so(tmp_path, caplog):
    payload = {"state": {"phase": torch.randn(3, dtype=torch.complex64)}, "step": 3}  # no safetensors dtype
    store = CheckpointStore(LocalStorage(str(tmp_path)))
    for asynchronous in (False, True):
        writer = CheckpointWriter(store, Retention(keep_last=0), asynchronous=asynchronous)
        with caplog.at_level(logging.WARNING, logger="harness"):
            writer.submit(10 + asynchronous, payload, {})
            writer.flush()
        ref = writer.last_ref
        assert ref.payload_path.endswith(LEGACY_PAYLOAD_NAME) and store.problems(ref) == []
        assert_tensors_equal(read_payload(str(tmp_path / ref.payload_path)), payload)
    assert "state/phase" in caplog.text and "torch.save" in caplog.text


def test_checksums_are_xxh3_and_sha256_manifests_still_verify(tmp_path):
    store = CheckpointStore(LocalStorage(str(tmp_path)))
    writer = CheckpointWriter(store, Retention(keep_last=0))
    writer.submit(5, _payload(), {})
    ref = writer.last_ref
    entry = ref.manifest["files"][PAYLOAD_NAME]
    assert entry["checksum"].startswith("xxh3_128:") and store.problems(ref) == []
    # A manifest from before the switch records sha256 under its own key: it still verifies ...
    path = tmp_path / ref.payload_path
    old_entry = {"bytes": entry["bytes"], "sha256": store.checksum(ref.payload_path, "sha256").split(":")[1]}
    manifest_path = tmp_path / ref.name / "manifest.json"
    manifest_path.write_text(json.dumps(ref.manifest | {"files": {PAYLOAD_NAME: old_entry}}))
    old_ref = store.latest_listed()
    assert store.problems(old_ref) == []
    # ... and a flipped byte is caught by either algorithm.
    data = bytearray(path.read_bytes())
    data[len(data) - 10] ^= 0x01
    path.write_bytes(bytes(data))
    assert "sha256 differs" in store.problems(old_ref)[0]
    manifest_path.write_text(json.dumps(ref.manifest))
    assert "xxh3_128 differs" in store.problems(store.latest_listed())[0]


def test_a_resume_loads_the_payload_from_the_map_its_verification_read_in(tmp_path):
    """Verify-then-load reads the file once: the map that the checksum pass populated is the one the
    loaded tensors view. A checkpoint that does not verify leaves no map behind."""
    store = CheckpointStore(LocalStorage(str(tmp_path)))
    writer = CheckpointWriter(store, Retention(keep_last=0))
    payload = _payload()
    writer.submit(5, payload, {})
    ref = writer.last_ref
    maps: dict = {}
    assert store.problems(ref, mapped=maps) == [] and list(maps) == [ref.payload_path]
    verified = maps.pop(ref.payload_path)
    loaded = read_payload(str(tmp_path / ref.payload_path), mapped=verified)
    assert _same(payload, loaded)
    weight = loaded["state"]["model"]["0.weight"]
    start = torch.frombuffer(verified, dtype=torch.uint8, count=1).data_ptr()
    assert start <= weight.data_ptr() < start + len(verified)  # a view of the verified map itself
    path = tmp_path / ref.payload_path
    data = bytearray(path.read_bytes())
    data[len(data) - 10] ^= 0x01
    path.write_bytes(bytes(data))
    assert "differs" in store.problems(ref, mapped=maps)[0] and maps == {}


def test_a_read_error_while_verifying_through_the_map_is_an_error_not_a_sigbus(tmp_path):
    """Pages of a mapped file that cannot be read raise SIGBUS on a plain access, which would kill the
    resuming rank instead of letting it fall back to an older checkpoint. Here the file loses its
    last pages after it was mapped, a real fault of the same kind."""
    path = tmp_path / PAYLOAD_NAME
    path.write_bytes(random.Random(0).randbytes(3 * checksum.READ_CHUNK))
    expected = checksum.of_file(str(path))
    found, whole = checksum.of_mapped_file(str(path))
    assert found == expected and whole[:] == path.read_bytes()
    whole.close()
    with open(path, "r+b") as handle:
        file_map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
        handle.truncate(checksum.READ_CHUNK + 4096)
    with pytest.raises(OSError, match=r"reading bytes .* failed"):
        checksum.of_mapping(file_map, len(file_map))
    file_map.close()


def test_hashing_a_truncated_map_without_populating_it_dies_of_sigbus(tmp_path):
    """The control: the same fault met by a plain read of the map kills the process."""
    path = tmp_path / "file.bin"
    path.write_bytes(bytes(3 * 4096))
    code = (f"import mmap, xxhash\nhandle = open({str(path)!r}, 'r+b')\n"
            "file_map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)\n"
            "handle.truncate(4096)\nxxhash.xxh3_128(memoryview(file_map)).hexdigest()\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert result.returncode == -signal.SIGBUS



@pytest.mark.parametrize("aligned", [True, False])
def test_odirect_writes_from_page_aligned_memory_equal_buffered_ones(odirect_dir, aligned):
    tmp_path = odirect_dir
    size = (20 << 20) + 4096 * 3 + 123  # several requests, a partial page at the end
    memory = mmap.mmap(-1, size + 1)
    rng = random.Random(0)
    memory[:size + 1] = rng.randbytes(size + 1)
    view = memoryview(memory)[0 if aligned else 1:][:size]
    header = b"h" * 4096
    results = {}
    for direct in (True, False):
        storage = LocalStorage(str(tmp_path / str(direct)), direct=direct)
        results[direct] = storage.write("blob", lambda handle: (handle.write(header), handle.write(view)))
        # The ring of aligned buffers exists only once a write went through O_DIRECT.
        assert (storage._ring is not None) == direct, "O_DIRECT was not used where the filesystem has it"
        assert (tmp_path / str(direct) / "blob").read_bytes() == header + bytes(view)
    assert results[True] == results[False] == (4096 + size, checksum.of_bytes(header + bytes(view)))


def test_the_async_snapshot_reuses_one_buffer_and_each_file_holds_its_own_step(tmp_path):
    store = CheckpointStore(LocalStorage(str(tmp_path)))
    writer = CheckpointWriter(store, Retention(keep_last=0), asynchronous=True)
    state = {"w": torch.zeros(1000, 100)}
    addresses = []
    for step in (1, 2, 3):
        state["w"].fill_(step)
        writer.submit(step, {"state": state}, {})
        state["w"].fill_(-1)  # the loop changes its tensors at once; the snapshot must not see it
        addresses.append(writer._snapshot._buffer.data_ptr())
    writer.flush()
    assert len(set(addresses)) == 1
    for step in (1, 2, 3):
        ref = next(r for r in store.list_complete() if r.step == step)
        assert store.problems(ref) == []
        assert torch.equal(read_payload(str(tmp_path / ref.payload_path))["state"]["w"], torch.full((1000, 100), float(step)))
