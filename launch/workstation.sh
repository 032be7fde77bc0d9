#!/usr/bin/env bash
# Train on one workstation and restart in-process after a preemption (exit code 75).
#
#   launch/workstation.sh name=exp1 trainer.max_steps=10000
#   HARNESS_MAX_RESTARTS=5 launch/workstation.sh name=exp1 launcher.nproc_per_node=4
#
# The local launcher restarts the worker ranks itself (launcher.max_restarts) when they exit 75 after
# a stop that did not come from outside, e.g. a signal sent to one rank or a spot notice; each restart
# resumes from the newest checkpoint. A SIGTERM/Ctrl-C sent to this script means "stop": the ranks save
# and the script exits 75 without restarting; run the same command again to resume.
#
# Arguments are Hydra overrides; they come last, so they win (also over launcher.max_restarts).
#
# Environment:
#   HARNESS_MAX_RESTARTS  in-process restarts after exit 75 (default 100)
#   PYTHON                interpreter (default: python3, else python)
set -euo pipefail

readonly MAX_RESTARTS="${HARNESS_MAX_RESTARTS:-100}"
python="${PYTHON:-$(command -v python3 || command -v python)}"

# exec: Python replaces this shell, so signals reach the launcher directly and its exit code
# (0 finished, 75 preempted, other: error) is this script's exit code.
exec "$python" -m harness.launch "launcher.max_restarts=${MAX_RESTARTS}" "$@"
