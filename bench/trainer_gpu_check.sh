#!/bin/sh
# The trainer's GPU check, for a host with CUDA (not run by CI): one FSDP job of a 1B shape and
# one of the 7B shape on every visible GPU, each rank's peak GPU memory and host RSS against
# `pairloop plan`'s, written to bench/results/trainer_dpo_gpu_check.json (and $OUT if set).
#   sh bench/trainer_gpu_check.sh            # ~10 min on one H200 (7B: needs ~30 GB of disk)
# Fewer than 4 GPUs cannot hold 7B with its reference sharded over them: the 7B job then
# precomputes the reference log-probs (~108 GiB by count on one GPU).
set -eu
gpus=$(python -c 'import torch; print(torch.cuda.device_count())')
seven=7b:fsdp
if [ "$gpus" -lt 4 ]; then seven=7b:fsdp+precompute; fi
python -m bench.trainer_dpo_gpu --gpus 0 --variants "1b:fsdp,$seven" --steps 1 --grad-accum 2 \
    --batch-size 4 --prompt-tokens 256 --response-tokens 384 --tag check
if [ -n "${OUT:-}" ]; then cp bench/results/trainer_dpo_gpu_check.json "$OUT/"; fi
