#!/usr/bin/env bash
# GPU check of selfsup on one CUDA device, in under 8 minutes (each step has its own timeout):
#
#   1. the CUDA-marked tests (every test under a `skipif(... cuda ...)` decorator, found by grep);
#   2. the throughput table (benchmarks/throughput.py --device cuda, bf16 + channels_last) for
#      ResNet-18 at 32 px and for a ViT-S-sized ViT (vit_small, patch 4, 32 px);
#   3. the same ResNet-18 table with --set train.compile=true (a separate step: its failure is
#      reported and tolerated);
#   4. a short SimCLR run on Fashion-MNIST (1 epoch, then kNN / linear probe of its encoder; the
#      evaluation runs on the CPU cores, so the baselines are left out to stay in time).
# Step timeouts add up to 450 s.
#
# All output goes under one folder, $OUT if set, else ./gpu_check_out: nvidia-smi.txt
# (nvidia-smi -L), env.txt, one log per step (tests.log, throughput_resnet18.log, ...),
# results.json (the run's results) and summary.json (status, exit code and seconds per step).
# The script exits non-zero when a required step (1, 2, 4) failed, and at once, with a clear
# message, when torch sees no CUDA device.
#
# Fashion-MNIST is looked for in $SELFSUP_FMNIST, /usr/share/datasets/fashion-mnist, then
# ./data/fashion-mnist (the folder that must hold the four idx .gz files). ./data/ is git-ignored;
# to carry the data to a machine that lacks it, copy it there first (30 MB):
#
#   mkdir -p data/fashion-mnist && cp /usr/share/datasets/fashion-mnist/*.gz data/fashion-mnist/
#
# and send ./data along with the repository (e.g. the device tool's carry: ["data"]).
#
#   bash benchmarks/gpu_check.sh              # run it (needs CUDA)
#   bash benchmarks/gpu_check.sh --dry-run    # print the commands only (works anywhere)
#   OUT=/tmp/gc PYTHON=python3 bash benchmarks/gpu_check.sh
#
# Environment: PYTHON (default .venv/bin/python if present, else python3), OUT, SELFSUP_FMNIST,
# METHODS_RESNET / METHODS_VIT (methods of the throughput tables), STEPS / ROUNDS (throughput).
set -uo pipefail

DRY_RUN=0
for arg in "$@"; do
    case "$arg" in
        --dry-run | -n) DRY_RUN=1 ;;
        -h | --help)
            sed -n '2,/^set -uo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "gpu_check.sh: unknown argument '$arg' (use --dry-run or --help)" >&2
            exit 2
            ;;
    esac
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
OUT_DIR="${OUT:-$ROOT/gpu_check_out}"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
METHODS_RESNET="${METHODS_RESNET:-simclr moco_v2 byol dino}"
METHODS_VIT="${METHODS_VIT:-simclr dino mae}"
STEPS="${STEPS:-10}"
ROUNDS="${ROUNDS:-3}"

# The CUDA-marked tests: test functions right under a skipif decorator that mentions cuda.
cuda_tests() {
    grep -rlE "skipif\(.*cuda" tests --include='*.py' | sort | while read -r file; do
        awk -v f="$file" '
            /^[[:space:]]*@pytest\.mark\.skipif\(.*cuda/ { marked = 1; next }
            /^[[:space:]]*@/ { next }
            /^[[:space:]]*(async[[:space:]]+)?def[[:space:]]+test_/ {
                if (marked) { name = $0; sub(/^[[:space:]]*(async[[:space:]]+)?def[[:space:]]+/, "", name); sub(/\(.*/, "", name); print f "::" name }
                marked = 0; next
            }
            { marked = 0 }
        ' "$file"
    done
}

find_fmnist() {
    local dir
    for dir in "${SELFSUP_FMNIST:-}" /usr/share/datasets/fashion-mnist "$ROOT/data/fashion-mnist"; do
        if [[ -n "$dir" && -e "$dir/train-images-idx3-ubyte.gz" || -n "$dir" && -e "$dir/train-images-idx3-ubyte" ]]; then
            echo "$dir"
            return 0
        fi
    done
    return 1
}

STATUS_LINES=()
FAILED_REQUIRED=0

# step NAME TIMEOUT_S REQUIRED(1|0) CMD...: runs CMD with a timeout, its output in $OUT_DIR/NAME.log.
step() {
    local name="$1" limit="$2" required="$3"
    shift 3
    if ((DRY_RUN)); then
        printf '[%s, timeout %ss%s] %s\n' "$name" "$limit" "$( ((required)) || echo ', failure tolerated')" "$*"
        return 0
    fi
    echo "== $name (timeout ${limit}s): $*"
    local start rc seconds
    start=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1
    rc=$?
    seconds=$(($(date +%s) - start))
    tail -n 25 "$OUT_DIR/$name.log"
    local status=ok
    if ((rc != 0)); then
        status=failed
        ((rc == 124 || rc == 137)) && status=timeout
        if ((required)); then FAILED_REQUIRED=1; else status="$status (tolerated)"; fi
    fi
    echo "== $name: $status (exit $rc, ${seconds}s)"
    STATUS_LINES+=("\"$name\": {\"status\": \"$status\", \"exit_code\": $rc, \"seconds\": $seconds}")
}

FMNIST="$(find_fmnist || true)"
if [[ -z "$FMNIST" ]]; then
    FMNIST="$ROOT/data/fashion-mnist"
    if ((!DRY_RUN)); then
        echo "gpu_check.sh: Fashion-MNIST not found in \$SELFSUP_FMNIST, /usr/share/datasets/fashion-mnist or" \
            "$ROOT/data/fashion-mnist; copy its four idx .gz files into data/fashion-mnist (see --help)" >&2
        exit 1
    fi
fi

if ((DRY_RUN)); then
    echo "# dry run: nothing is executed; output would go to $OUT_DIR"
    echo "$PYTHON -c 'import torch; assert torch.cuda.is_available()'   # else: exit 1 with a message"
    echo "nvidia-smi -L > $OUT_DIR/nvidia-smi.txt"
else
    if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
        echo "gpu_check.sh: no CUDA device: '$PYTHON' cannot import torch or torch.cuda.is_available() is False;" \
            "run this on a machine with an NVIDIA GPU and a CUDA build of torch (or use --dry-run)" >&2
        exit 1
    fi
    mkdir -p "$OUT_DIR"
    nvidia-smi -L >"$OUT_DIR/nvidia-smi.txt" 2>&1 || echo "nvidia-smi not found" >"$OUT_DIR/nvidia-smi.txt"
    "$PYTHON" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))' \
        >"$OUT_DIR/env.txt" 2>&1
    git -C "$ROOT" rev-parse HEAD >>"$OUT_DIR/env.txt" 2>/dev/null || true
    cat "$OUT_DIR/nvidia-smi.txt" "$OUT_DIR/env.txt"
fi

mapfile -t TESTS < <(cuda_tests)
if ((${#TESTS[@]} == 0)); then
    echo "gpu_check.sh: found no CUDA-marked tests under tests/ (grep 'skipif(.*cuda')" >&2
    exit 1
fi

THROUGHPUT=("$PYTHON" benchmarks/throughput.py --device cuda --precision bf16 --channels-last
    --image-size 32 --channels 3 --batch-size 256 --steps "$STEPS" --rounds "$ROUNDS" --allow-noisy)
# shellcheck disable=SC2086  # the method lists are meant to split into words
{
    step tests 90 1 "$PYTHON" -m pytest -q -rs "${TESTS[@]}"
    step throughput_resnet18 90 1 "${THROUGHPUT[@]}" --backbone resnet18 --methods $METHODS_RESNET
    step throughput_vit_small 80 1 "${THROUGHPUT[@]}" --backbone vit_small --methods $METHODS_VIT
    step throughput_resnet18_compile 80 0 "${THROUGHPUT[@]}" --backbone resnet18 --methods simclr \
        --set train.compile=true
    step simclr_fashion_mnist 110 1 "$PYTHON" -m selfsup.cli pretrain configs/simclr/fashion_mnist.yaml \
        "data.root=$FMNIST" train.device=cuda train.epochs=1 train.threads=0 train.progress=false eval.baselines=false \
        "run.out_dir=$OUT_DIR/runs" run.name=simclr-fashion-mnist run.overwrite=true
}

if ((DRY_RUN)); then
    echo "cp $OUT_DIR/runs/simclr-fashion-mnist/results.json $OUT_DIR/results.json"
    exit 0
fi
cp "$OUT_DIR/runs/simclr-fashion-mnist/results.json" "$OUT_DIR/results.json" 2>/dev/null ||
    echo "gpu_check.sh: the SimCLR run wrote no results.json (see $OUT_DIR/simclr_fashion_mnist.log)" >&2
{
    echo "{"
    for i in "${!STATUS_LINES[@]}"; do
        sep=","
        ((i == ${#STATUS_LINES[@]} - 1)) && sep=""
        echo "  ${STATUS_LINES[$i]}$sep"
    done
    echo "}"
} >"$OUT_DIR/summary.json"
echo "gpu check output: $OUT_DIR (summary.json, results.json, *.log)"
if ((FAILED_REQUIRED)); then
    echo "gpu_check.sh: a required step failed (see summary.json)" >&2
    exit 1
fi
