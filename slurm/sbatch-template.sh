#!/bin/bash
# Run a harness job with plain sbatch + srun (no submitit). Submit from the repo root:
#
#   sbatch slurm/sbatch-template.sh name=exp1 trainer.max_steps=10000
#
# Every srun task is one rank: `launcher=direct` reads rank, world size and the node list from
# SLURM's variables, and derives the rendezvous port from the job id (identical after a requeue).
# The run's identity is `name` (and checkpoint.dir), never the job id, so a requeued job resumes.
#
# Signals: --signal=USR2@120 (no "B:") sends USR2 to every task 120 s before the time limit;
# `scontrol requeue` and partition preemption send SIGTERM, then SIGKILL after KillWait/GraceTime.
# On either, all ranks agree on a step, rank 0 saves, then requeues this job with `scontrol requeue`
# (it needs --requeue, below) and the next run resumes from the checkpoint.
#
#SBATCH --job-name=harness
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=2
#SBATCH --cpus-per-task=1
#SBATCH --time=01:00:00
#SBATCH --signal=USR2@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
# GPU clusters: one task per GPU, e.g.
#   #SBATCH --ntasks-per-node=8
#   #SBATCH --gpus-per-node=8

set -euo pipefail
echo "job ${SLURM_JOB_ID} on ${SLURM_JOB_NODELIST}, restart ${SLURM_RESTART_COUNT:-0}"
exec srun --kill-on-bad-exit=0 python -m harness.launch launcher=direct "$@"
