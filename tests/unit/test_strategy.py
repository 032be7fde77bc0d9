"""The strategy seam without processes: config validation, which blocks FSDP2 shards, and the
manifest rules that let a sharded strategy's files (``shards/...``) be listed and verified while
names outside the checkpoint folder stay refused."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from harness.checkpoint import checksum
from harness.checkpoint.format import encode
from harness.checkpoint.layout import is_inside_folder
from harness.checkpoint.storage.local import LocalStorage
from harness.checkpoint.store import CORRUPT, INCOMPLETE, OK, CheckpointStore
from harness.config import ConfigError, validate
from harness.strategy.fsdp import shard_units


def _config(**trainer) -> dict:
    return {"launcher": {"backend": "local"}, "trainer": trainer}


@pytest.mark.parametrize("trainer, checkpoint, message", [
    ({"strategy": "zero3"}, {}, "trainer.strategy='zero3' is invalid"),
    ({"fsdp_shard": ["Block"]}, {}, "applies to trainer.strategy=fsdp only"),
    ({"strategy": "fsdp", "eval_ema": True, "eval_every": 5}, {}, "trainer.eval_ema=true evaluates the EMA"),
    ({"strategy": "fsdp"}, {"async_save": True}, "checkpoint.async_save=true is not supported"),
    ({"strategy": "fsdp"}, {"dir": "s3://b/run"}, "checkpoint.dir=s3://b/run without checkpoint.staging_dir"),
    ({"strategy": "fsdp", "fsdp_shard": ["not a name"]}, {}, "trainer.fsdp_shard"),
])
def test_fsdp_options_it_cannot_honour_are_refused_at_start_naming_the_key(trainer, checkpoint, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        validate({**_config(**trainer), "checkpoint": checkpoint})


def test_fsdp_stages_to_a_remote_folder():
    cfg = validate({**_config(strategy="fsdp"), "checkpoint": {"dir": "s3://b/run", "staging_dir": "/tmp/x"}})
    assert cfg.checkpoint.staging_dir == "/tmp/x"


def test_fsdp_takes_fp16_and_an_evaluated_ema():
    cfg = validate(_config(strategy="fsdp", precision="fp16", ema_decay=0.9, eval_every=5, eval_ema=True))
    assert cfg.trainer.precision == "fp16" and cfg.trainer.eval_ema


def test_fsdp_with_bf16_and_named_blocks_is_a_valid_config():
    cfg = validate(_config(strategy="fsdp", precision="bf16", fsdp_shard=["Block"]))
    assert cfg.trainer.strategy == "fsdp" and list(cfg.trainer.fsdp_shard) == ["Block"]
    assert validate(_config()).trainer.strategy == "ddp"  # the default


class Block(nn.Module):
    def __init__(self, inner: bool = False):
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.parts = nn.ModuleList([nn.Linear(4, 4)]) if inner else None


class Model(nn.Module):
    def __init__(self, inner: bool = False):
        super().__init__()
        self.embed = nn.Linear(4, 4)
        self.blocks = nn.ModuleList([Block(inner), Block(inner)])


def test_fsdp_shards_each_module_list_element_by_default_innermost_first():
    model = Model(inner=True)
    units = shard_units(model, [])
    inner = [block.parts[0] for block in model.blocks]
    assert units == inner + list(model.blocks)  # children before their parents
    assert shard_units(model, ["Block"]) == list(model.blocks)
    with pytest.raises(ValueError, match=r"no module of class \['GPT2Block'\]; its classes are"):
        shard_units(model, ["GPT2Block"])


@pytest.mark.parametrize("name, inside", [
    ("state.safetensors", True), ("shards/__0_0.distcp", True), ("shards/.metadata", True),
    ("../x", False), ("shards/../x", False), ("shards/../../x", False), ("/etc/passwd", False),
    ("shards//x", False), ("shards/", False), ("a/b/c", False), ("./x", False), ("shards\\x", False),
    ("", False), ("x\0", False),
])
def test_manifest_names_may_reach_one_subfolder_but_never_out_of_the_checkpoint(name, inside):
    assert is_inside_folder(name) is inside


def _sharded_commit(root: Path, step: int = 10) -> Path:
    """A checkpoint as the fsdp strategy commits one: files in shards/ first, then payload + manifest."""
    store = CheckpointStore(LocalStorage(str(root)))
    shards = Path(store.open_folder(step, "shards"))
    written = {}
    for rank in range(2):
        path = shards / f"__{rank}_0.distcp"
        path.write_bytes(bytes([rank]) * 1000)
        written[f"shards/{path.name}"] = checksum.file_entry(1000, checksum.of_file(str(path)))
    store.make_durable(step, "shards")
    file = encode({"w": torch.zeros(3)})
    store.commit(step, file.write_to, {}, payload_name=file.name, written=written)
    return root / f"step_{step:09d}"


def test_every_shard_listed_in_the_manifest_is_verified(tmp_path):
    step_dir = _sharded_commit(tmp_path / "run")
    store = CheckpointStore(LocalStorage(str(tmp_path / "run")))
    manifest = json.loads((step_dir / "manifest.json").read_text())
    assert set(manifest["files"]) == {"shards/__0_0.distcp", "shards/__1_0.distcp", "state.safetensors"}
    assert store.examine(step_dir.name).state == OK
    data = bytearray((step_dir / "shards" / "__1_0.distcp").read_bytes())
    data[500] ^= 0xFF
    (step_dir / "shards" / "__1_0.distcp").write_bytes(bytes(data))
    report = store.examine(step_dir.name)
    assert report.state == CORRUPT and "shards/__1_0.distcp" in report.details[0]
    (step_dir / "shards" / "__0_0.distcp").unlink()
    assert any("__0_0.distcp: missing" in detail for detail in store.examine(step_dir.name).details)


@pytest.mark.parametrize("name", ["../x", "a/b/c", "state.safetensors", "manifest.json"])
def test_commit_refuses_extra_files_outside_the_folder_or_named_like_its_own(tmp_path, name):
    store = CheckpointStore(LocalStorage(str(tmp_path)))
    file = encode({"w": torch.zeros(3)})
    with pytest.raises(ValueError, match="cannot be listed in a manifest"):
        store.commit(1, file.write_to, {}, payload_name=file.name,
                     written={name: checksum.file_entry(0, checksum.of_bytes(b""))})
    assert not (tmp_path / "step_000000001").exists()


def test_reopening_a_step_for_shards_uncommits_it_first_and_never_writes_through_a_link(tmp_path):
    step_dir = _sharded_commit(tmp_path / "run")
    store = CheckpointStore(LocalStorage(str(tmp_path / "run")))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep").write_text("x")
    os.rename(step_dir / "shards", tmp_path / "old-shards")
    os.symlink(elsewhere, step_dir / "shards")
    folder = store.open_folder(10, "shards")
    assert store.examine(step_dir.name).state == INCOMPLETE  # no manifest while the ranks write
    assert os.path.isdir(folder) and not os.path.islink(folder) and os.listdir(folder) == []
    assert (elsewhere / "keep").exists()  # the link was removed, not followed
