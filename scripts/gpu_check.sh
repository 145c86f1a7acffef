#!/usr/bin/env bash
# The GPU check: on a machine with an NVIDIA GPU, with no install step (torch, triton, numpy,
# click, safetensors, tqdm, matplotlib and pytest present; mlx not needed; pytest-xdist and
# pytest-timeout used where present), from the repository root:
#
#     bash scripts/gpu_check.sh [OUT_DIR [SECTION ...]]     (default: gpu_check/, all sections)
#
# Sections, in order: conformance (pytest on torch-on-CUDA and on triton), bench (the kernel
# benchmark with one training step at T=65,536), target (the issue's B=32 T=2048 K=4 N=64 D=64
# case alone), train (a short `pntm train --backend triton`), models (`pntm bench`: every
# model's training step over T and decoding speed, on triton and on torch). Each section appends to
# OUT_DIR/report.md, so that sections can run as separate commands where one command's time is
# limited. Record the report, with the device name, in docs/performance.md.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${1:-gpu_check}"
shift || true
SECTIONS=("$@")
[ "${#SECTIONS[@]}" -gt 0 ] || SECTIONS=(conformance bench target train models)
mkdir -p "$OUT"
REPORT="$OUT/report.md"
status=0

. scripts/check_run.sh  # run TITLE COMMAND...

# pytest-xdist, where installed, spreads the suite over 8 processes (they share the GPU), and
# pytest-timeout turns a hung test into a failure with its traceback
PYTEST=(python3 -m pytest -o addopts="" -q -rs -p no:cacheprovider)
python3 -c "import xdist" 2>/dev/null && PYTEST+=(-n "${GPU_CHECK_WORKERS:-8}")
python3 -c "import pytest_timeout" 2>/dev/null && PYTEST+=(--timeout 300)

{
    printf '\n# pntm GPU check: %s\n\n' "${SECTIONS[*]}"
    echo "$(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
    run "machine" nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    run "versions" python3 -c 'import sys, torch, triton; print("python", sys.version.split()[0], "| torch", torch.__version__, "| triton", triton.__version__, "| cuda", torch.version.cuda, "|", torch.cuda.get_device_name())'
    for section in "${SECTIONS[@]}"; do
        case "$section" in
            conformance)
                run "backends" python3 -m pntm.cli backends
                run "conformance: torch on CUDA" "${PYTEST[@]}" --backend=torch tests
                run "conformance: triton (compiled kernels)" "${PYTEST[@]}" --backend=triton tests
                ;;
            bench)
                run "kernel benchmark, training step at T=65,536" python3 \
                    scripts/bench_kernels.py --train-step 65536 --json-out "$OUT/bench_kernels.json"
                ;;
            target)
                run "target: B=32 T=2048 K=4 N=64 D=64 fp32" python3 scripts/bench_kernels.py \
                    --lengths 2048 --sizes 64x64 --batch 32 --heads 4 --scans memory \
                    --json-out "$OUT/bench_target.json"
                ;;
            train)
                run "pntm train --backend triton (copy, 300 steps)" python3 -m pntm.cli train \
                    --backend triton --task copy --steps 300 --out "$OUT/train-copy"
                ;;
            models)
                for backend in triton torch; do
                    run "pntm bench --backend $backend (every model, T = 64..2048)" python3 \
                        -m pntm.cli bench --backend "$backend" --out "$OUT/models-$backend" --quiet
                done
                ;;
            *)
                echo "unknown section '$section': conformance, bench, target, train or models"
                status=2
                ;;
        esac
    done
    printf '\nsections %s: %s\n' "${SECTIONS[*]}" "$([ "$status" -eq 0 ] && echo PASS || echo FAIL)"
    exit "$status"
} 2>&1 | tee -a "$REPORT"
exit "${PIPESTATUS[0]}"
