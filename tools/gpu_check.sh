#!/usr/bin/env bash
# The GPU checks on a CUDA machine without network access, from a kit made where there is one
# (tools/gpu_kit.py): the kit's wheels are unpacked into a folder put first on PYTHONPATH, over the image's
# own packages (no resolver, nothing downloaded), danlu runs from this checkout's src/, then
#   1. tests/gpu (the CUDA-graph decode, CUDA training and serving, quantized loading),
#   2. benchmarks/chat_gpu.py (HF generate, its static cache, generate_batch and danlu's engine, 1/16/64
#      streams, the SmolLM2-135M and SmolLM2-1.7B shapes),
# each under its own time limit, their output also written to OUT (default /tmp/gpu-check).
#
#   tools/gpu_check.sh [KIT] [OUT]        (KIT default .gpu-kit; PYTHON: the image's python3)
#   GPU_TESTS_S / GPU_BENCH_S: the time limits in seconds (default 240 / 420)
set -uo pipefail
cd "$(dirname "$0")/.."
KIT=${1:-.gpu-kit}
OUT=${2:-${OUT:-/tmp/gpu-check}}
PYTHON=${PYTHON:-python3}
SITE=${SITE:-/tmp/danlu-gpu-site}
mkdir -p "$OUT" "$SITE"
[ -d "$KIT/wheels" ] || { echo "gpu_check: no $KIT/wheels: run tools/gpu_kit.py where there is network" >&2; exit 2; }

# a wheel is a zip of what goes into site-packages: unpacked as it is
"$PYTHON" - "$KIT/wheels" "$SITE" <<'EOF' || exit 1
import pathlib, sys, zipfile
wheels, site = pathlib.Path(sys.argv[1]), sys.argv[2]
for wheel in sorted(wheels.glob("*.whl")):
    zipfile.ZipFile(wheel).extractall(site)
print(f"unpacked {len(list(wheels.glob('*.whl')))} wheels into {site}")
EOF
export PYTHONPATH="$SITE:$PWD/src:$PWD" PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

"$PYTHON" -c "
import torch, transformers, danlu
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else 'none (tests/gpu will skip)'
print('GPU:', gpu, '| torch', torch.__version__, '| transformers', transformers.__version__,
      '| danlu from', danlu.__file__)
" 2>&1 | tee "$OUT/versions.txt"
[ "${PIPESTATUS[0]}" = 0 ] || exit 1

status=0
timeout "${GPU_TESTS_S:-240}" "$PYTHON" -m pytest -p no:cacheprovider -q -rs tests/gpu 2>&1 | tee "$OUT/tests.txt"
[ "${PIPESTATUS[0]}" = 0 ] || status=1
tokenizer=()
[ -d "$KIT/tokenizer" ] && tokenizer=(--tokenizer "$KIT/tokenizer")
# BENCH_ARGS: more arguments (a rehearsal on a CPU: --device cpu --shapes 135m --streams 1,4 --max-tokens 8)
# shellcheck disable=SC2086
timeout "${GPU_BENCH_S:-420}" "$PYTHON" benchmarks/chat_gpu.py "${tokenizer[@]}" ${BENCH_ARGS:-} 2>&1 |
	tee "$OUT/chat_gpu.txt"
[ "${PIPESTATUS[0]}" = 0 ] || status=1
exit $status
