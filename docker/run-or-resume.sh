#!/bin/sh
# pairloop-run-or-resume CONFIG RUN_ID: what the compose stack's orchestrator runs on every `up`.
# The first `up` creates run RUN_ID from CONFIG and executes it; a later `up` (after `down`, a
# crash or a reboot, the volume kept) resumes that run: unfinished work continues, finished
# stages are not redone, and a finished run is only reported. Never a second copy of the run.
# PLAN_ARGS (e.g. "--gpus 4 --gpu-memory 80 --host-memory 128"): the trainer's GPUs and
# host memory; a new run is first checked against them (`pairloop plan`) and refused if it
# cannot fit, before any work.
set -eu
if [ "$#" -ne 2 ]; then
    echo "usage: pairloop-run-or-resume CONFIG RUN_ID" >&2
    exit 2
fi
config=$1
run_id=$2
if [ ! -f "$config" ]; then
    echo "error: run config $config not found (compose mounts ./configs at /configs)" >&2
    exit 2
fi
store=$(python3 -c 'import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))["model_store"])' "$config")
run_dir="$store/runs/$run_id"
if [ -f "$run_dir/manifest.json" ]; then
    echo "run $run_id exists at $run_dir: resuming it (finished stages are not redone)"
    exec pairloop resume "$run_dir"
fi
# shellcheck disable=SC2086  # PLAN_ARGS is a list of flags: split on purpose
exec pairloop run "$config" --run-id "$run_id" ${PLAN_ARGS:-}
