#!/usr/bin/env bash
# The Metal check, the Mac twin of scripts/gpu_check.sh: on Apple silicon, after
#
#     python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[mlx,dev]"
#
# run from the repository root:
#
#     bash scripts/metal_check.sh [OUT_DIR [SECTION ...]]   (default: metal_check/, all sections)
#
# Sections, in order: conformance (pytest on mlx and on metal: the real Metal kernels against
# the float64 NumPy reference), bench (the kernel benchmark, metal against MLX's chunked scans
# and the plain loop, the sizes of the Triton benchmark, with one training step at T=65,536),
# train (a short `pntm train --backend metal`), models (`pntm bench`: every model's training
# step over T and decoding speed, on metal and on mlx). Each section appends to OUT_DIR/report.md:
# attach that file to an issue. Without Metal, PNTM_METAL_EMULATE=1 runs the same steps on the
# C++ emulator (a check of the script; its times mean nothing).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${1:-metal_check}"
shift || true
SECTIONS=("$@")
[ "${#SECTIONS[@]}" -gt 0 ] || SECTIONS=(conformance bench train models)
mkdir -p "$OUT"
REPORT="$OUT/report.md"
PYTHON="${PYTHON:-python3}"
status=0

. scripts/check_run.sh  # run TITLE COMMAND...

{
    printf '\n# pntm Metal check: %s\n\n' "${SECTIONS[*]}"
    echo "$(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
    run "machine" "$PYTHON" -c 'import platform, mlx.core as mx; info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info(); print(platform.platform(), platform.machine(), "| metal", mx.metal.is_available(), "|", {k: info[k] for k in sorted(info) if k in ("device_name", "architecture", "memory_size", "max_buffer_length")})'
    run "versions" "$PYTHON" -c 'import sys, mlx.core as mx, numpy; print("python", sys.version.split()[0], "| mlx", mx.__version__, "| numpy", numpy.__version__)'
    for section in "${SECTIONS[@]}"; do
        case "$section" in
            conformance)
                run "backends" "$PYTHON" -m pntm.cli backends
                run "conformance: mlx (MLX operations)" "$PYTHON" -m pytest -o addopts="" -q -rs \
                    -p no:cacheprovider --backend=mlx tests
                run "conformance: metal (the Metal kernels)" "$PYTHON" -m pytest -o addopts="" \
                    -q -rs -p no:cacheprovider --backend=metal tests
                ;;
            bench)
                run "kernel benchmark: metal vs MLX chunked vs sequential, training step at T=65,536" \
                    "$PYTHON" scripts/bench_kernels.py --framework mlx --train-step 65536 \
                    --json-out "$OUT/bench_kernels.json"
                ;;
            train)
                run "pntm train --backend metal (copy, 300 steps)" "$PYTHON" -m pntm.cli train \
                    --backend metal --task copy --steps 300 --out "$OUT/train-copy"
                ;;
            models)
                for backend in metal mlx; do
                    run "pntm bench --backend $backend (every model, T = 64..2048)" "$PYTHON" \
                        -m pntm.cli bench --backend "$backend" --out "$OUT/models-$backend" --quiet
                done
                ;;
            *)
                echo "unknown section '$section': conformance, bench, train or models"
                status=2
                ;;
        esac
    done
    printf '\nsections %s: %s\n' "${SECTIONS[*]}" "$([ "$status" -eq 0 ] && echo PASS || echo FAIL)"
    exit "$status"
} 2>&1 | tee -a "$REPORT"
exit "${PIPESTATUS[0]}"
