#!/usr/bin/env bash
# The GPU check: on a machine with an NVIDIA GPU, with no install step (torch, triton, numpy,
# click, safetensors, tqdm, matplotlib and pytest present; mlx not needed), run from the
# repository root:
#
#     bash scripts/gpu_check.sh [OUT_DIR]        (default: gpu_check/)
#
# It runs the conformance suite for torch (on CUDA) and triton, the kernel benchmark (with one
# training step at T=65,536), and a short `pntm train --backend triton`, and writes everything
# to OUT_DIR/report.md (plus bench_kernels.json and the training run). Record the report, with
# the device name, in docs/performance.md.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${1:-gpu_check}"
mkdir -p "$OUT"
REPORT="$OUT/report.md"
status=0

section() { printf '\n## %s\n\n```\n' "$1"; }
end() { printf '```\n'; }
run() {  # run a step, note its exit status and wall time in the report
    local start=$SECONDS
    "$@"
    local rc=$?
    echo "[exit $rc, $((SECONDS - start)) s]"
    [ "$rc" -eq 0 ] || status=1
}

{
    echo "# pntm GPU check"
    echo
    echo "$(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
    section "machine"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
    python3 -c 'import sys, torch, triton; print("python", sys.version.split()[0], "| torch", torch.__version__, "| triton", triton.__version__, "| cuda", torch.version.cuda, "|", torch.cuda.get_device_name())'
    python3 -m pntm.cli backends
    end
    section "conformance: torch on CUDA"
    run python3 -m pytest -o addopts="" -q -rs -p no:cacheprovider --backend=torch tests
    end
    section "conformance: triton (compiled kernels)"
    run python3 -m pytest -o addopts="" -q -rs -p no:cacheprovider --backend=triton tests
    end
    section "kernel benchmark (scripts/bench_kernels.py), training step at T=65,536"
    run python3 scripts/bench_kernels.py --train-step 65536 --json-out "$OUT/bench_kernels.json"
    end
    section "target: B=32 T=2048 K=4 N=64 D=64 fp32"
    run python3 scripts/bench_kernels.py --lengths 2048 --sizes 64x64 --batch 32 --heads 4 \
        --scans memory --json-out "$OUT/bench_target.json"
    end
    section "pntm train --backend triton (copy, 300 steps)"
    run python3 -m pntm.cli train --backend triton --task copy --steps 300 --out "$OUT/train-copy"
    end
    echo
    echo "overall: $([ "$status" -eq 0 ] && echo PASS || echo FAIL)"
    exit "$status"
} 2>&1 | tee "$REPORT"
exit "${PIPESTATUS[0]}"
