#!/usr/bin/env bash
# The GPU check, for a machine with at least one NVIDIA GPU (never needed by CI). One call, ~5 min:
#   bash tests/gpu/check.sh            # prints every result; exit 0 only if every check passed
# 1. NCCL: a 1-GPU job (launcher=local) trained end to end, SIGTERM to its rank mid-run, exit 75,
#    relaunch, final state bit-identical to an uninterrupted run (same GPU, deterministic kernels).
# 2. Placement: the payload loads on the CPU and every module/optimizer tensor lands on cuda:<local_rank>;
#    Adam's `step` counters stay on the CPU; a CPU-saved checkpoint resumes on the GPU and vice versa.
# 3. FSDP2 on NCCL: the same 1-GPU job with trainer.strategy=fsdp (bf16 policy), SIGTERM mid-run, exit 75,
#    relaunch; the shards (unsharded) and the payload end bit-identical to an uninterrupted fsdp run,
#    and the sharded parameters live on cuda:0.
# 4. The pinned async snapshot (side CUDA stream), blocking / durable / effective stall for 1B and 7B
#    states against DCP async_save: `python -m benchmarks.gpu --ablate` (its report is printed as JSON),
#    with each part of the background write timed alone (copy, hash, write, thread hand-offs).
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python=${PYTHON:-python}
work="$(mktemp -d /tmp/harness-gpu.XXXXXX)"
echo "[gpu-check] $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -1); work dir $work"
set +e
"$python" - "$work" <<'PY'
import json, os, signal, subprocess, sys, time
import torch
work = sys.argv[1]
assert torch.cuda.is_available(), "no GPU visible"
common = ["launcher.nproc_per_node=1", "trainer.max_steps=400", "checkpoint.every_steps=100",
          "checkpoint.keep_last=0", "trainer.log_every=50", "task.data.num_samples=8192"]
env = dict(os.environ, CUBLAS_WORKSPACE_CONFIG=":4096:8")

def launch(ckpt, *extra, wait=True, cpu_only=False):
    cmd = [sys.executable, "-m", "harness.launch", "name=gpu", f"checkpoint.dir={ckpt}", *common, *extra]
    job_env = dict(env, CUDA_VISIBLE_DEVICES="") if cpu_only else env
    if wait:
        return subprocess.run(cmd, capture_output=True, text=True, env=job_env, timeout=300)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=job_env)

from harness.checkpoint.format import read_payload
from harness.checkpoint.layout import payload_file

def payload_of(step_dir):
    manifest = json.load(open(os.path.join(step_dir, "manifest.json")))
    return read_payload(os.path.join(step_dir, payload_file(manifest)))

def final_state(ckpt):
    steps = sorted(p for p in os.listdir(ckpt) if p.startswith("step_"))
    return payload_of(os.path.join(ckpt, steps[-1]))["state"]

def same(a, b):
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b

results = {}
ref = os.path.join(work, "ref"); r = launch(ref)
results["uninterrupted_exit"] = r.returncode
assert r.returncode == 0, r.stderr[-2000:]
run = os.path.join(work, "run"); job = launch(run, wait=False)
deadline = time.time() + 120
while time.time() < deadline and not os.path.exists(os.path.join(run, "step_000000200")):
    time.sleep(0.1)
job.send_signal(signal.SIGTERM); out = job.communicate(timeout=120)[0]
results["sigterm_exit"] = job.returncode
r2 = launch(run)
results["resume_exit"] = r2.returncode
results["bit_identical_after_sigterm"] = same(final_state(run), final_state(ref))
print(out[-1500:]); print(r2.stdout[-800:])

# Placement: restore through the real manager on cuda:0 and look where tensors live.
from harness.config import validate
from harness.session import Session
from harness.example import MLP
cfg = validate({"checkpoint": {"dir": run}, "trainer": {"max_steps": 400}})
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29555")
with Session(cfg) as session:
    model = session.prepare(MLP())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    session.register(optimizer=opt, scheduler=torch.optim.lr_scheduler.CosineAnnealingLR(opt, 400))
    session.start()
    results["params_on"] = sorted({str(p.device) for p in model.parameters()})
    results["adam_state_on"] = sorted({str(v.device) for s in opt.state.values() for k, v in s.items() if k != "step"})
    results["adam_step_on"] = sorted({str(s["step"].device) for s in opt.state.values()})
# A checkpoint written by a CPU-only run (no GPU visible: gloo) resumes on the GPU: stopped by SIGTERM
# mid-run, relaunched with the GPU, it must resume (not start fresh) and finish with finite weights.
cpu_run = os.path.join(work, "cpu-then-gpu"); job = launch(cpu_run, wait=False, cpu_only=True)
deadline = time.time() + 180
while time.time() < deadline and not os.path.exists(os.path.join(cpu_run, "step_000000100")):
    time.sleep(0.1)
job.send_signal(signal.SIGTERM); job.communicate(timeout=120)
r3 = launch(cpu_run)
results["cpu_saved_resumes_on_gpu"] = (job.returncode == 75 and r3.returncode == 0 and "resumed from" in r3.stdout
                                       and all(torch.isfinite(t).all() for t in final_state(cpu_run)["model"].values()))
# The reverse: the GPU run's file loads on the CPU.
cpu = payload_of(os.path.join(run, "step_000000400"))
results["gpu_file_loads_on_cpu"] = all(t.device.type == "cpu" for t in cpu["state"]["model"].values())
# FSDP2 over NCCL on this GPU: sharded checkpoints, stopped and resumed bit for bit.
from harness.strategy.fsdp import read_full_state
fsdp = ["trainer.strategy=fsdp", "trainer.precision=bf16", "preempt.check_every=1"]

def newest_step_dir(ckpt):
    return os.path.join(ckpt, sorted(p for p in os.listdir(ckpt) if p.startswith("step_"))[-1])

fsdp_ref = os.path.join(work, "fsdp-ref"); r = launch(fsdp_ref, *fsdp)
results["fsdp_uninterrupted_exit"] = r.returncode
fsdp_run = os.path.join(work, "fsdp-run"); job = launch(fsdp_run, *fsdp, wait=False)
deadline = time.time() + 180
while time.time() < deadline and not os.path.exists(os.path.join(fsdp_run, "step_000000200")):
    time.sleep(0.1)
job.send_signal(signal.SIGTERM); fsdp_out = job.communicate(timeout=120)[0]
results["fsdp_sigterm_exit"] = job.returncode
r4 = launch(fsdp_run, *fsdp)
results["fsdp_resume_exit"] = r4.returncode
if r.returncode == 0 and r4.returncode == 0:
    run_dir, ref_dir = newest_step_dir(fsdp_run), newest_step_dir(fsdp_ref)
    results["fsdp_bit_identical_after_sigterm"] = (
        same(read_full_state(os.path.join(run_dir, "shards")), read_full_state(os.path.join(ref_dir, "shards")))
        and same(payload_of(run_dir)["state"], payload_of(ref_dir)["state"]))
else:
    results["fsdp_bit_identical_after_sigterm"] = False
    print(fsdp_out[-1500:]); print(r4.stdout[-1500:], r4.stderr[-1500:])
print(json.dumps(results, indent=1))
ok = (results["sigterm_exit"] == 75 and results["resume_exit"] == 0 and results["bit_identical_after_sigterm"]
      and results["params_on"] == ["cuda:0"] and results["adam_state_on"] == ["cuda:0"]
      and results["adam_step_on"] == ["cpu"] and results["gpu_file_loads_on_cpu"]
      and results["cpu_saved_resumes_on_gpu"] and results["fsdp_sigterm_exit"] == 75
      and results["fsdp_resume_exit"] == 0 and results["fsdp_bit_identical_after_sigterm"])
print("[gpu-check]", "PASSED" if ok else "FAILED")
sys.exit(0 if ok else 1)
PY
status=$?
set -e
bench_dir="${GPU_BENCH_DIR:-$work}"; mkdir -p "$bench_dir"
"$python" -m benchmarks.gpu --sizes "${GPU_BENCH_SIZES:-1B,7B}" --reps "${GPU_BENCH_REPS:-2}" --dir "$bench_dir" --json "${GPU_BENCH_JSON:-$work/gpu-bench.json}" --ablate
exit $status
