#!/usr/bin/env bash
# The GPU check: at most 8 minutes on one CUDA GPU, every figure written to one file.
#
#   make setup && benchmarks/gpu_check.sh [FIGURES_FILE]
#
# Runs, each under its own time limit: the CUDA tests (tests/test_cuda.py and every `gpu`-marked test),
# bench_nn.py on CUDA (FA/BP step ratios, PG-Untie / PG0 step time and GFLOP/s), bench_pack.py on CUDA (16 DS0
# trials packed vs alone) and one full-scale trial of the seed report's Table 2 (DSR1, 100 epochs, CIFAR-10,
# batch 128, Adam 1e-3; the report's number: 0.5008). FIGURES_FILE defaults to $OUT/gpu-figures.txt when $OUT
# is set, else benchmarks/gpu-figures.txt. CIFAR-10 is read from $CIFAR_ROOT (an image folder or the pickled
# batches; default ../shared/data/cifar10-jpeg), else downloaded by torchvision; without either the trial is
# skipped with a line saying so.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
FASWEEP=${FASWEEP:-.venv/bin/fasweep}
FIGURES=${1:-${OUT:+$OUT/gpu-figures.txt}}
FIGURES=${FIGURES:-benchmarks/gpu-figures.txt}
CIFAR_ROOT=${CIFAR_ROOT:-../shared/data/cifar10-jpeg}
: >"$FIGURES"

say() { echo "$*" | tee -a "$FIGURES"; }
step() {  # step TITLE LIMIT_S COMMAND...: run one part under its limit, its output and wall time into the file
    local title=$1 limit=$2 start rc
    shift 2
    say "## $title (limit ${limit}s)"
    start=$(date +%s)
    timeout "$limit" "$@" 2>&1 | tee -a "$FIGURES"
    rc=${PIPESTATUS[0]}
    say "-> exit $rc, wall $(($(date +%s) - start)) s"
    say ""
}

say "# fasweep GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$FIGURES"
if ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    say "no CUDA device visible to torch: nothing to check"
    exit 1
fi
"$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name(0))" \
    | tee -a "$FIGURES"
say ""

step "CUDA tests" 120 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/
step "bench_nn.py on CUDA" 90 "$PY" benchmarks/bench_nn.py --device cuda --reps 10
step "bench_pack.py on CUDA: 16 DS0 trials, packs of 16" 90 \
    "$PY" benchmarks/bench_pack.py --device cuda --trials 16 --pack 16 --reps 1
if [ -d "$CIFAR_ROOT" ]; then
    data=(--dataset imagefolder --set "data.root=$CIFAR_ROOT")
else
    data=(--dataset cifar10)
fi
out=$(mktemp -d)
step "Table 2, DSR1 at full scale (100 epochs, CIFAR-10; the report: 0.5008)" 200 \
    "$FASWEEP" train --model DSR1 "${data[@]}" --epochs 100 --set train.device=cuda --set train.batch_size=128 \
    --set train.lr=1e-3 --set train.alignment_every=10 --out "$out"
if [ -s "$out/metrics.jsonl" ]; then
    "$PY" - "$out/metrics.jsonl" <<'PY' | tee -a "$FIGURES"
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
last = rows[-1]
print(f"DSR1: {len(rows)} epochs, final test_acc {last['test_acc']:.4f} (report 0.5008 at 100), "
      f"median epoch {sorted(r['epoch_time_s'] for r in rows)[len(rows) // 2]:.2f} s")
PY
fi
rm -rf "$out"
say "figures in $FIGURES"
