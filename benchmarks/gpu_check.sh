#!/usr/bin/env bash
# The GPU checks of issue 13 in one command (for a lent GPU machine; see benchmarks/README.md).
# usage: bash benchmarks/gpu_check.sh OUTDIR     -- each step has its own time limit, a failing
# step does not stop the next; logs and JSON land in OUTDIR.
set -u
out="${1:-gpu_out}"; mkdir -p "$out"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
step() { local name=$1 limit=$2; shift 2; echo "=== $name (limit ${limit}s) ==="
         timeout "$limit" "$@" > "$out/$name.log" 2>&1; echo "--- $name: exit $?"; tail -n 25 "$out/$name.log"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
step tests 100 python3 -m pytest -q -p no:cacheprovider -rs tests/test_selective_scan.py tests/test_tensorboard.py
step train_eager 170 python3 benchmarks/bench_train.py --device cuda --no-compile --budget 150 --json "$out/train_eager.json"
step train_compiled 170 python3 benchmarks/bench_train.py --device cuda --compile --budget 150 \
     --arch unet nnunet_2d segformer_b3 swin_umamba --json "$out/train_compiled.json"
step swin 90 python3 benchmarks/bench_swin_umamba.py --device cuda --sizes 256 512 --batch 8 --steps 3
step loader 45 python3 benchmarks/bench_loader.py --device cuda --workers 2 4 --no-ops --seconds 8
