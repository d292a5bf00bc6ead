#!/usr/bin/env bash
# One-shot search of a darts_binary-style CIFAR-10 cell, from supernet to a retrained network.
#
#   scripts/oneshot_cifar10.sh cpu [RUN]   # darts_binary_proxy: a 2-core CPU, under 2 hours
#   scripts/oneshot_cifar10.sh gpu [RUN]   # darts_binary itself, full CIFAR-10, on one GPU
#   scripts/oneshot_cifar10.sh gpu-steps [RUN]
#       the gpu recipe's three steps cut short, to time them in minutes on a lent GPU:
#       1 supernet epoch, trials scored for 30 s (at most 40), the best retrained for 1 epoch
#
# Each step resumes where it stopped when the script is run again with the same RUN.
# Data: BNAS_DATA (default ~/.cache/bnas/data) must hold CIFAR-10 (see the README's Datasets).
set -euo pipefail
usage="usage: scripts/oneshot_cifar10.sh cpu|gpu|gpu-steps [RUN]"
mode=${1:?$usage}
limit=()
case "$mode" in
  cpu)
    space=search_spaces/darts_binary_proxy.yaml
    device=cpu; supernet_epochs=12; trials=30; top=1; retrain_epochs=10
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    threads=(--threads "$OMP_NUM_THREADS")
    ;;
  gpu)
    # darts_binary's budget is 10 epochs a trial; the supernet trains one path per batch,
    # so it gets ten times that, and the best three retrain for 100 epochs.
    space=search_spaces/darts_binary.yaml
    device=cuda; supernet_epochs=100; trials=2000; top=3; retrain_epochs=100
    threads=()
    ;;
  gpu-steps)
    space=search_spaces/darts_binary.yaml
    device=cuda; supernet_epochs=1; trials=40; top=1; retrain_epochs=1
    threads=(); limit=(--timeout 30)
    ;;
  *) echo "$usage" >&2; exit 2 ;;
esac
run=${2:-runs/oneshot-cifar10-$mode}
mkdir -p "$run"
resume=()
[ -f "$run/supernet/supernet.pt" ] && resume=(--resume)
start=$(date +%s)
bnas supernet "$space" --out "$run/supernet" --epochs "$supernet_epochs" --device "$device" \
  "${threads[@]}" --quiet "${resume[@]}"
bnas search "$space" --supernet "$run/supernet/supernet.pt" --out "$run/search" --trials "$trials" \
  "${limit[@]}" --device "$device" "${threads[@]}" --quiet --retrain-top "$top" --retrain-epochs "$retrain_epochs"
echo "one-shot search of $space on $device: $(( $(date +%s) - start )) s this session; summary: $run/search/summary.md"
