#!/usr/bin/env bash
# Restart a harness job while it exits 75 ("preempted, checkpoint saved, restart me").
#
# For a plain VM, a cron/@reboot entry, a systemd unit or any machine without an orchestrator:
#
#   launch/restart-loop.sh name=exp1 checkpoint.dir=/data/runs/exp1 trainer.max_steps=10000
#   launch/restart-loop.sh -- python train.py --my-flag        # any command that speaks exit code 75
#
# Without "--" the arguments are Hydra overrides for `python -m harness.launch`.
#
# Rules:
#   * the job exits 0      -> this script exits 0 (finished);
#   * the job exits 75     -> wait HARNESS_RESTART_DELAY_S, run it again; the relaunch resumes from the
#                             newest checkpoint (same name / checkpoint.dir);
#   * any other exit code  -> propagated unchanged (a crash is not retried here: see the docs);
#   * more than HARNESS_MAX_RESTARTS restarts -> exit 75, so an outer scheduler can still retry.
#   * this script receives SIGTERM/SIGINT/SIGUSR1/SIGUSR2/SIGHUP -> the signal is forwarded once to the
#     job (which saves and exits 75) and the job is NOT restarted: the machine is going away. The
#     script then exits with the job's code.
#
# The job runs in its own process group (set -m), so a Ctrl-C in the terminal reaches the job exactly
# once, through this script; a second SIGINT would make the harness stop without saving. Started with
# SIGINT ignored (in the background of a script without job control), the script restarts itself with
# SIGINT restored (coreutils `env --default-signal`), so `kill -INT` still stops the job.
#
# Environment:
#   HARNESS_MAX_RESTARTS     restarts allowed after exit 75 (default 100)
#   HARNESS_RESTART_DELAY_S  seconds between a preempted exit and the restart (default 5)
#   PYTHON                   interpreter for the default command (default: python3, else python)
set -uo pipefail

readonly PREEMPTED_EXIT_CODE=75  # harness.config.PREEMPTED_EXIT_CODE
readonly FORWARDED_SIGNALS=(TERM INT USR1 USR2 HUP)
readonly MAX_RESTARTS="${HARNESS_MAX_RESTARTS:-100}"
readonly RESTART_DELAY_S="${HARNESS_RESTART_DELAY_S:-5}"

say() { echo "[restart-loop] $*" >&2; }

# A non-interactive bash cannot trap a signal that was ignored when it started (POSIX: `trap` then
# fails silently). Shells without job control start `cmd &` with SIGINT ignored, so a loop started
# in the background by a script, a CI runner or a test harness would never forward a Ctrl-C or a
# `kill -INT` to the job, which trains on. Start again with SIGINT back to its default, so it is a
# stop signal like the others (as it is for `python -m harness.launch`, which sets its own handler).
# Other ignored signals are left alone: `nohup` ignores SIGHUP on purpose.
if [[ "$(trap -p INT)" == "trap -- '' SIGINT" ]]; then
    if [[ -z "${HARNESS_RESTART_LOOP_SIGINT_RESET:-}" ]] && env --default-signal=INT true 2>/dev/null; then
        HARNESS_RESTART_LOOP_SIGINT_RESET=1 exec env --default-signal=INT "$BASH" "$0" "$@"
    fi
    say "SIGINT was ignored when this script started and cannot be forwarded; stop the job with SIGTERM"
fi

if ! [[ "$MAX_RESTARTS" =~ ^[0-9]+$ ]]; then
    say "HARNESS_MAX_RESTARTS=$MAX_RESTARTS is invalid: expected an integer >= 0"
    exit 2
fi
if ! [[ "$RESTART_DELAY_S" =~ ^[0-9]+([.][0-9]+)?$ ]]; then
    say "HARNESS_RESTART_DELAY_S=$RESTART_DELAY_S is invalid: expected seconds >= 0"
    exit 2
fi

if [[ "${1:-}" == "--" ]]; then
    shift
    if (($# == 0)); then
        say "usage: $0 [HYDRA_OVERRIDES...] | $0 -- COMMAND [ARGS...]"
        exit 2
    fi
    command=("$@")
else
    python="${PYTHON:-$(command -v python3 || command -v python)}"
    command=("$python" -m harness.launch "$@")
fi

set -m  # background jobs get their own process group and keep SIGINT (see the header)

child=0          # pid of the running job or delay, 0 when none
signalled=""     # name of the first signal this script received
signal_count=0   # incremented by every trap, so an interrupted `wait` can be told apart

on_signal() {
    local name=$1
    signal_count=$((signal_count + 1))
    [[ -z "$signalled" ]] && signalled=$name
    if ((child > 0)) && kill -0 "$child" 2>/dev/null; then
        kill -s "$name" "$child" 2>/dev/null || true
    fi
}
for name in "${FORWARDED_SIGNALS[@]}"; do
    trap "on_signal $name" "$name"
done

# wait_child: wait for $child and set `status` to ITS exit status.
# `wait` returns >128 as soon as a trapped signal arrives, while the child still runs; then we wait
# again. Waiting again for a child whose status was already returned gives 127: keep the one we have.
wait_child() {
    local seen again
    seen=$signal_count
    wait "$child"
    status=$?
    while ((signal_count != seen)); do
        seen=$signal_count
        wait "$child"
        again=$?
        ((again == 127)) && break
        status=$again
    done
    child=0
}

restarts=0
while true; do
    # The harness reads it: a restart always resumes, even when the first launch had
    # checkpoint.resume=false.
    HARNESS_RESTART_COUNT=$restarts "${command[@]}" &
    child=$!
    # A signal that came between the fork and the line above found no child to forward to: pass it on.
    if [[ -n "$signalled" ]]; then
        kill -s "$signalled" "$child" 2>/dev/null || true
    fi
    wait_child
    if ((status != PREEMPTED_EXIT_CODE)); then
        if ((status == 0)); then say "job finished"; else say "job failed with exit code $status"; fi
        exit "$status"
    fi
    if [[ -n "$signalled" ]]; then
        say "job saved a checkpoint and exited $status after SIG$signalled; not restarting (relaunch to resume)"
        exit "$status"
    fi
    if ((restarts >= MAX_RESTARTS)); then
        say "job preempted again, but HARNESS_MAX_RESTARTS=$MAX_RESTARTS restarts are used up; exiting $status"
        exit "$status"
    fi
    restarts=$((restarts + 1))
    say "job preempted (exit $status): restarting in ${RESTART_DELAY_S}s ($restarts/$MAX_RESTARTS)"
    sleep "$RESTART_DELAY_S" &  # in the background, so a signal during the delay is handled at once
    child=$!
    wait_child
    if [[ -n "$signalled" ]]; then
        say "received SIG$signalled while waiting to restart; exiting $PREEMPTED_EXIT_CODE (relaunch to resume)"
        exit "$PREEMPTED_EXIT_CODE"
    fi
done
