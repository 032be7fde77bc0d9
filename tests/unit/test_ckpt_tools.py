"""``python -m harness.ckpt`` diff / export / inspect on real files, and its one-line errors."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import assert_tensors_equal, require_module
from harness.ckpt import main as ckpt_main
from harness.checkpoint.payload import Progress, build_payload, capture_rng
from harness.checkpoint.format import encode
from harness.checkpoint.store import CheckpointStore
from harness.checkpoint.storage.local import LocalStorage
from harness.checkpoint.layout import step_dir_name

REPO = Path(__file__).resolve().parents[2]

SAFETENSORS = "safetensors export needs safetensors (pip install -e .[dev])"


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    model.train()
    loss = model(torch.randn(16, 4)).square().mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def _harness_checkpoint(root: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> Path:
    """A real harness checkpoint (payload, then manifest) written through CheckpointStore."""
    states = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    payload = build_payload(states, Progress(step=step), [capture_rng()], {"name": "test"})
    file = encode(payload)
    CheckpointStore(LocalStorage(str(root))).commit(step, file.write_to, {}, payload_name=file.name)
    return root / step_dir_name(step)


@pytest.fixture
def trained(tmp_path):
    """(run folder with checkpoints at steps 1 and 2, the model and optimizer as of step 2)."""
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    root = tmp_path / "run"
    for step in (1, 2):
        _train_step(model, optimizer)
        _harness_checkpoint(root, step, model, optimizer)
    return root, model, optimizer


def _json(capsys) -> dict:
    return json.loads(capsys.readouterr().out)


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected a one-line error, got:\n{err}"
    assert lines[0].startswith("harness.ckpt: ")
    return lines[0]


# ---- diff ---------------------------------------------------------------------------------------------

def test_diff_of_identical_checkpoints_exits_0(trained, capsys):
    root, _, _ = trained
    assert ckpt_main(["diff", str(root), str(root / step_dir_name(2)), "--json"]) == 0
    report = _json(capsys)
    assert report["identical"] is True
    assert report["a"]["step"] == report["b"]["step"] == 2
    assert report["equal"] > 10  # model, optimizer state and param_groups were all compared
    assert not (report["only_a"] or report["only_b"] or report["differing"] or report["mismatched"])


def test_diff_of_two_training_steps_finds_model_and_optimizer_differences(trained, capsys):
    root, _, _ = trained
    assert ckpt_main(["diff", str(root / step_dir_name(1)), str(root / step_dir_name(2)), "--json"]) == 1
    report = _json(capsys)
    differing = {item["key"] for item in report["differing"]}
    assert "model.0.weight" in differing
    assert "optimizer.state.0.exp_avg" in differing
    assert "model.1.num_batches_tracked" in differing  # an integer buffer: 1 vs 2
    assert all(item["max_abs"] > 0 and 0 < item["count"] <= item["numel"] for item in report["differing"])


def test_diff_counts_changed_elements_and_their_max_abs_difference(tmp_path, capsys):
    state = _model().state_dict()
    changed = {key: value.clone() for key, value in state.items()}
    changed["0.weight"][0, :3] += torch.tensor([0.25, -0.5, 0.125])
    torch.save(state, tmp_path / "a.pt")
    torch.save(changed, tmp_path / "b.pt")
    assert ckpt_main(["diff", str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), "--json"]) == 1
    report = _json(capsys)
    assert report["differing"] == [{"key": "model.0.weight", "count": 3, "numel": 32,
                                    "max_abs": pytest.approx(0.5, abs=1e-6)}]
    assert report["equal"] == len(state) - 1


def test_diff_reports_keys_on_one_side_and_shape_or_dtype_mismatches(tmp_path, capsys):
    state = _model().state_dict()
    other = dict(state)
    del other["3.bias"]
    other["extra.weight"] = torch.zeros(2)
    other["0.bias"] = torch.zeros(9)  # shape
    other["1.running_var"] = state["1.running_var"].double()  # dtype
    torch.save(state, tmp_path / "a.pt")
    torch.save(other, tmp_path / "b.pt")
    assert ckpt_main(["diff", str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), "--json"]) == 1
    report = _json(capsys)
    assert report["only_a"] == ["model.3.bias"]
    assert report["only_b"] == ["model.extra.weight"]
    mismatched = {item["key"]: (item["a"], item["b"]) for item in report["mismatched"]}
    assert mismatched["model.0.bias"] == ({"shape": [8], "dtype": "float32"}, {"shape": [9], "dtype": "float32"})
    assert mismatched["model.1.running_var"][1]["dtype"] == "float64"
    assert report["differing"] == []

    assert ckpt_main(["diff", str(tmp_path / "a.pt"), str(tmp_path / "b.pt")]) == 1
    text = capsys.readouterr().out
    assert "only in A (1):" in text and "model.3.bias" in text
    assert "shape/dtype mismatch (2):" in text and text.rstrip().splitlines()[-1].startswith("DIFFERENT")


def test_diff_reports_non_tensor_values_such_as_the_learning_rate(tmp_path, trained, capsys):
    root, model, optimizer = trained
    for group in optimizer.param_groups:
        group["lr"] = 0.001
    _harness_checkpoint(tmp_path / "other", 2, model, optimizer)
    assert ckpt_main(["diff", str(root), str(tmp_path / "other"), "--json"]) == 1
    report = _json(capsys)
    assert report["values"] == [{"key": "optimizer.param_groups.0.lr", "a": 0.01, "b": 0.001}]
    assert report["differing"] == []


def test_diff_treats_nan_at_the_same_place_as_equal_and_nan_against_a_number_as_inf(tmp_path, capsys):
    torch.save({"w": torch.tensor([1.0, float("nan"), 3.0])}, tmp_path / "a.pt")
    torch.save({"w": torch.tensor([1.0, float("nan"), 3.0])}, tmp_path / "b.pt")
    torch.save({"w": torch.tensor([float("nan"), float("nan"), 3.0])}, tmp_path / "c.pt")
    assert ckpt_main(["diff", str(tmp_path / "a.pt"), str(tmp_path / "b.pt")]) == 0
    capsys.readouterr()
    assert ckpt_main(["diff", str(tmp_path / "a.pt"), str(tmp_path / "c.pt"), "--json"]) == 1
    assert _json(capsys)["differing"] == [{"key": "model.w", "count": 1, "numel": 3, "max_abs": float("inf")}]


def test_diff_of_a_checkpoint_and_a_prefixed_weight_file_compares_the_model_group(trained, tmp_path, capsys):
    root, model, _ = trained
    wrapped = nn.DataParallel(model)  # a real wrapper: its state_dict keys start with "module."
    assert all(key.startswith("module.") for key in wrapped.state_dict())
    torch.save({"state_dict": wrapped.state_dict(), "epoch": 7}, tmp_path / "lightning.ckpt")
    assert ckpt_main(["diff", str(root), str(tmp_path / "lightning.ckpt"), "--json"]) == 1
    report = _json(capsys)
    assert report["only_b"] == [] and report["differing"] == [] and report["mismatched"] == []
    assert report["only_a"] and all(key.startswith("optimizer.") for key in report["only_a"])
    assert report["equal"] == len(model.state_dict())


# ---- export -------------------------------------------------------------------------------------------

def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_export_writes_model_weights_only_with_their_sha256(trained, tmp_path, capsys):
    root, model, _ = trained
    out = tmp_path / "export" / "model.pt"
    assert ckpt_main(["export", str(root), str(out)]) == 0
    digest = _sha256(out)
    assert capsys.readouterr().out.strip() == f"{digest}  {out}"
    assert (tmp_path / "export" / "model.pt.sha256").read_text() == f"{digest}  model.pt\n"
    check = subprocess.run(["sha256sum", "-c", "model.pt.sha256"], cwd=out.parent, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    exported = torch.load(out, weights_only=True)
    assert set(exported) == set(model.state_dict())
    for key, value in model.state_dict().items():
        assert torch.equal(exported[key], value) and exported[key].dtype == value.dtype
    assert sorted(os.listdir(out.parent)) == ["model.pt", "model.pt.sha256"]  # no temp files left


def test_export_strips_wrapper_prefixes_and_casts_only_floating_tensors(tmp_path, capsys):
    model = _model()
    wrapped = nn.DataParallel(torch.compile(model))  # real "module._orig_mod." prefixes, nothing compiled
    assert all(key.startswith("module._orig_mod.") for key in wrapped.state_dict())
    torch.save({"model": wrapped.state_dict(), "iteration": 5}, tmp_path / "detectron2.pth")
    out = tmp_path / "model_fp16.pt"
    assert ckpt_main(["export", str(tmp_path / "detectron2.pth"), str(out), "--dtype", "fp16"]) == 0
    exported = torch.load(out, weights_only=True)
    assert set(exported) == set(model.state_dict())
    assert exported["0.weight"].dtype == torch.float16
    assert exported["1.num_batches_tracked"].dtype == torch.int64  # integer buffers are not cast
    assert torch.equal(exported["0.weight"], model.state_dict()["0.weight"].half())


def test_export_safetensors_round_trips_and_diffs_equal_to_the_checkpoint_model(trained, tmp_path, capsys):
    safetensors_torch = require_module("safetensors.torch", SAFETENSORS)
    root, model, _ = trained
    out = tmp_path / "model.safetensors"
    assert ckpt_main(["export", str(root), str(out), "--format", "safetensors"]) == 0
    assert capsys.readouterr().out.split()[0] == _sha256(out)
    loaded = safetensors_torch.load_file(str(out))
    assert set(loaded) == set(model.state_dict())
    assert all(torch.equal(loaded[key], value) for key, value in model.state_dict().items())
    # The export holds exactly the checkpoint's model group: only the optimizer is missing.
    assert ckpt_main(["diff", str(root), str(out), "--json"]) == 1
    report = _json(capsys)
    assert report["differing"] == [] and report["mismatched"] == [] and report["only_b"] == []
    assert report["only_a"] and all(key.startswith("optimizer.") for key in report["only_a"])


def test_export_picks_the_format_from_the_output_name_unless_given(trained, tmp_path, capsys):
    """``export RUN model.safetensors`` (the README's own line) writes safetensors, not a torch pickle
    under that name; other names get torch files; ``--format`` decides when given."""
    safetensors_torch = require_module("safetensors.torch", SAFETENSORS)
    root, model, _ = trained
    named = {"model.safetensors": ([], "safetensors"), "model.pt": ([], "torch"),
             "forced.bin": (["--format", "safetensors"], "safetensors")}
    for name, (flags, kind) in named.items():
        assert ckpt_main(["export", str(root), str(tmp_path / name), *flags]) == 0
        loaded = (safetensors_torch.load_file(str(tmp_path / name)) if kind == "safetensors"
                  else torch.load(tmp_path / name, weights_only=True))
        assert_tensors_equal(loaded, model.state_dict())
    capsys.readouterr()


def test_export_safetensors_accepts_tied_weights(tmp_path, capsys):
    require_module("safetensors.torch", SAFETENSORS)
    embedding = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = embedding.weight  # tied: two keys, one storage (safetensors refuses shared storage)
    torch.save(nn.ModuleDict({"embed": embedding, "head": head}).state_dict(), tmp_path / "tied.pt")
    assert ckpt_main(["export", str(tmp_path / "tied.pt"), str(tmp_path / "tied.safetensors"),
                      "--format", "safetensors", "--dtype", "bf16"]) == 0
    capsys.readouterr()
    assert ckpt_main(["inspect", str(tmp_path / "tied.safetensors"), "--json"]) == 0
    tensors = {t["key"]: t for t in _json(capsys)["groups"]["model"]["tensors"]}
    assert set(tensors) == {"embed.weight", "head.weight"} and tensors["head.weight"]["dtype"] == "bfloat16"


def test_export_safetensors_without_the_package_is_a_clear_error(trained, tmp_path, capsys, monkeypatch):
    root, _, _ = trained
    monkeypatch.setitem(sys.modules, "safetensors", None)  # makes `import safetensors...` raise ImportError
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    out = tmp_path / "model.safetensors"
    assert ckpt_main(["export", str(root), str(out), "--format", "safetensors"]) == 1
    assert "pip install safetensors" in _one_line_error(capsys)
    assert not out.exists()


def test_export_state_writes_the_emas_weights_or_another_registered_models(tmp_path, capsys):
    """``--state ema`` exports trainer.ema_decay's average (not the model), ``--state NAME`` any other
    registered state dict of tensors (wrapper prefixes stripped, as timm's ModelEmaV2 adds them);
    a name that is missing or holds more than tensors is a one-line error naming what there is."""
    from harness.task import ModelEma

    model = _model()
    ema = ModelEma(model, decay=0.5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    for _ in range(2):
        _train_step(model, optimizer)
        ema.update(model)
    teacher = _model(seed=1)
    states = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "ema": ema.state_dict(),
              "teacher": nn.DataParallel(teacher).state_dict()}  # keys "module.*", as timm's EMA saves
    payload = build_payload(states, Progress(step=2), [capture_rng()], {"name": "test"})
    file = encode(payload)
    CheckpointStore(LocalStorage(str(tmp_path / "run"))).commit(2, file.write_to, {}, payload_name=file.name)
    out = tmp_path / "ema.pt"
    assert ckpt_main(["export", str(tmp_path / "run"), str(out), "--state", "ema"]) == 0
    exported = torch.load(out, weights_only=True)
    assert set(exported) == set(model.state_dict())
    assert all(torch.equal(exported[key], value) for key, value in ema.shadow.items())
    assert not torch.equal(exported["0.weight"], model.state_dict()["0.weight"])  # the average, not the model
    assert ckpt_main(["export", str(tmp_path / "run"), str(tmp_path / "teacher.pt"), "--state", "teacher"]) == 0
    exported = torch.load(tmp_path / "teacher.pt", weights_only=True)
    assert set(exported) == set(teacher.state_dict())
    assert all(torch.equal(exported[key], value) for key, value in teacher.state_dict().items())
    capsys.readouterr()
    for name, message in (("nope", "holds no state named 'nope'; it holds ['ema', 'model', 'optimizer', 'teacher']"),
                          ("optimizer", "'optimizer' is not a state dict of tensors")):
        assert ckpt_main(["export", str(tmp_path / "run"), str(tmp_path / "x.pt"), "--state", name]) == 1
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()


def test_export_replaces_an_existing_file_and_reports_unwritable_outputs(trained, tmp_path, capsys):
    root, _, _ = trained
    out = tmp_path / "model.pt"
    out.write_bytes(b"old")
    assert ckpt_main(["export", str(root), str(out)]) == 0
    assert capsys.readouterr().out.split()[0] == _sha256(out) != hashlib.sha256(b"old").hexdigest()
    (tmp_path / "a_file").write_text("not a folder")
    assert ckpt_main(["export", str(root), str(tmp_path / "a_file" / "model.pt")]) == 1
    assert "cannot write" in _one_line_error(capsys)
    assert ckpt_main(["export", str(root), str(tmp_path)]) == 1
    assert "is a folder" in _one_line_error(capsys)


# ---- a run folder whose newest checkpoint is damaged --------------------------------------------------

def test_tools_on_a_run_folder_skip_a_damaged_newest_checkpoint_and_say_so(trained, tmp_path, capsys):
    root, model, _ = trained
    payload = next((root / step_dir_name(2)).glob("state.*"))
    with open(payload, "r+b") as handle:
        handle.truncate(payload.stat().st_size // 2)  # a copy cut short: the manifest still lists it
    assert ckpt_main(["inspect", str(root), "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["path"].endswith(f"{step_dir_name(1)}/{payload.name}")
    assert f"{step_dir_name(2)}" in captured.err and "truncated" in captured.err
    assert ckpt_main(["export", str(root), str(tmp_path / "weights.pt")]) == 0
    assert step_dir_name(1) in capsys.readouterr().err
    # Named directly, the damaged checkpoint is one line naming the file and the fix (was a traceback
    # from the file's reader).
    for command in (["inspect", str(root / step_dir_name(2))],
                    ["export", str(root / step_dir_name(2)), str(tmp_path / "damaged.pt")]):
        assert ckpt_main(command) == 1
        err = capsys.readouterr().err
        assert "truncated" in err and "HINT: python -m harness.ckpt verify" in err and "Traceback" not in err, err
    assert not (tmp_path / "damaged.pt").exists()


# ---- inspect of other layouts -------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["lightning", "detectron2", "ddp-prefixed"])
def test_inspect_reads_common_layouts_without_prefixes(tmp_path, capsys, layout):
    model = _model()
    state = nn.DataParallel(model).state_dict()
    obj = {"lightning": {"state_dict": state, "epoch": 3, "global_step": 30},
           "detectron2": {"model": state, "iteration": 30},
           "ddp-prefixed": state}[layout]
    torch.save(obj, tmp_path / "weights.pt")
    assert ckpt_main(["inspect", str(tmp_path / "weights.pt"), "--json"]) == 0
    report = _json(capsys)
    assert report["kind"] == "weights"
    assert {t["key"] for t in report["groups"]["model"]["tensors"]} == set(model.state_dict())


def test_inspect_reads_a_full_model_pickle_only_with_unsafe(tmp_path, capsys):
    model = _model()
    torch.save(model, tmp_path / "full.pt")  # pickles the classes: weights_only refuses it
    assert ckpt_main(["inspect", str(tmp_path / "full.pt")]) == 1
    assert "--unsafe" in _one_line_error(capsys)
    assert ckpt_main(["inspect", str(tmp_path / "full.pt"), "--unsafe", "--json"]) == 0
    assert {t["key"] for t in _json(capsys)["groups"]["model"]["tensors"]} == set(model.state_dict())
    assert ckpt_main(["export", str(tmp_path / "full.pt"), str(tmp_path / "out.pt")]) == 1
    capsys.readouterr()
    assert ckpt_main(["export", str(tmp_path / "full.pt"), str(tmp_path / "out.pt"), "--unsafe"]) == 0
    assert set(torch.load(tmp_path / "out.pt", weights_only=True)) == set(model.state_dict())


# ---- errors -------------------------------------------------------------------------------------------

def _bad_file(tmp_path: Path, kind: str) -> tuple[Path, str]:
    """A file that is not a usable checkpoint, and the words its error must contain."""
    path = tmp_path / f"{kind}.pt"
    if kind == "missing":
        return path, "no such file"
    if kind == "text":
        path.write_text("epoch,loss\n1,0.5\n")
        return path, "not a readable checkpoint"
    if kind == "truncated":
        torch.save(_model().state_dict(), path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        return path, "not a readable checkpoint"
    if kind == "no-weights":
        torch.save({"losses": [0.5, 0.4], "note": "metrics only"}, path)
        return path, "holds no model weights"
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["missing", "text", "truncated", "no-weights"])
@pytest.mark.parametrize("command", ["inspect", "diff", "export"])
def test_unusable_files_give_a_one_line_error_and_exit_1(tmp_path, capsys, kind, command):
    path, words = _bad_file(tmp_path, kind)
    good = tmp_path / "good.pt"
    torch.save(_model().state_dict(), good)
    argv = {"inspect": ["inspect", str(path)], "diff": ["diff", str(good), str(path)],
            "export": ["export", str(path), str(tmp_path / "out.pt")]}[command]
    assert ckpt_main(argv) == 1
    line = _one_line_error(capsys)
    assert words in line and str(path) in line
    assert not (tmp_path / "out.pt").exists()


def test_truncated_safetensors_file_is_a_one_line_error(tmp_path, capsys):
    require_module("safetensors.torch", SAFETENSORS)
    source = tmp_path / "w.pt"
    torch.save(_model().state_dict(), source)
    out = tmp_path / "w.safetensors"
    assert ckpt_main(["export", str(source), str(out), "--format", "safetensors"]) == 0
    out.write_bytes(out.read_bytes()[:-20])
    capsys.readouterr()
    assert ckpt_main(["inspect", str(out)]) == 1
    assert "not a readable safetensors file" in _one_line_error(capsys)


def test_command_line_entry_point_exits_with_the_diff_verdict(trained):
    root, _, _ = trained
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "harness.ckpt", *args], cwd=REPO, capture_output=True,
                              text=True, timeout=120)
    same = run("diff", str(root), str(root / step_dir_name(2)))
    assert same.returncode == 0 and "identical" in same.stdout
    different = run("diff", str(root / step_dir_name(1)), str(root / step_dir_name(2)))
    assert different.returncode == 1 and "DIFFERENT" in different.stdout


def test_a_reader_that_stops_early_ends_inspect_quietly(trained):
    """``python -m harness.ckpt inspect ... | head``: the reader is gone before inspect writes (its end
    of the pipe is closed at once, long before the tool has imported torch)."""
    root, _, _ = trained
    proc = subprocess.Popen([sys.executable, "-m", "harness.ckpt", "inspect", str(root / step_dir_name(2))],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141, stderr  # 128 + SIGPIPE, as a shell shows for `cat` or `grep`
    assert stderr == "", "no BrokenPipeError traceback, nothing at all"


def test_export_reads_every_byte_against_its_checksum_first(trained, tmp_path, capsys):
    """A flipped byte keeps the file's size, so only the checksum sees it; exported weights get used,
    so export checks every byte first and writes nothing from a damaged checkpoint."""
    root, _, _ = trained
    copy = tmp_path / "damaged-run"
    shutil.copytree(root, copy)
    payload = next((copy / step_dir_name(2)).glob("state.*"))
    data = bytearray(payload.read_bytes())
    data[-10] ^= 0xFF  # inside the last tensor
    payload.write_bytes(bytes(data))
    assert ckpt_main(["export", str(copy / step_dir_name(2)), str(tmp_path / "w.pt")]) == 1
    err = capsys.readouterr().err
    assert "differs from the manifest (corrupted); nothing exported" in err, err
    assert not (tmp_path / "w.pt").exists()
    assert ckpt_main(["export", str(copy / step_dir_name(1)), str(tmp_path / "w.pt")]) == 0  # the control


def test_export_of_a_run_whose_models_have_other_names_says_which_to_choose(tmp_path, capsys):
    """A GAN prepares netG and netD, no 'model': export without --state names them in one line (was a
    KeyError traceback), and --state netG exports it."""
    net_g, net_d = _model(), _model()
    states = {"netG": net_g.state_dict(), "netD": net_d.state_dict()}
    payload = build_payload(states, Progress(step=1), [capture_rng()], {"name": "test"})
    file = encode(payload)
    CheckpointStore(LocalStorage(str(tmp_path / "run"))).commit(1, file.write_to, {}, payload_name=file.name)
    assert ckpt_main(["export", str(tmp_path / "run"), str(tmp_path / "w.pt")]) == 1
    line = _one_line_error(capsys)
    assert "holds no object named 'model'" in line and "['netD', 'netG']" in line and "--state netD" in line, line
    assert ckpt_main(["export", str(tmp_path / "run"), str(tmp_path / "g.pt"), "--state", "netG"]) == 0
    assert all(torch.equal(value, net_g.state_dict()[key]) for key, value in torch.load(tmp_path / "g.pt").items())
