#!/usr/bin/env bash
# One command for a lent GPU (issue 16): install what the device machine lacks, run the CUDA cases of the
# kernel tests, the greedy-token check of quantized files against the CPU reference, and the benchmarks;
# every step's log and a summary.json land in $OUT. Sized to finish in under 8 minutes, so a rerun fits
# the 15-minute device budget.
#
# Prepare here (once; .whl is ignored by git, see the device tool's README):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_31_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl gguf llguidance
# Run there:   device run  command="bash scripts/gpu_check.sh"  carry=[".whl"]  timeout_s=540
# Try here:    GPU_CHECK_DRY=1 bash scripts/gpu_check.sh    (the same steps, tiny and on the CPU)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$(mktemp -d)}"
export PYTHONUNBUFFERED=1
PYTHON="${PYTHON:-python3}"
DRY="${GPU_CHECK_DRY:-0}"
DEVICE=cuda
[ "$DRY" = 1 ] && DEVICE=cpu

# kilnlm is imported from this checkout: the package root is the repository itself (package-dir "kilnlm" = ".").
site=$(mktemp -d)
ln -s "$PWD" "$site/kilnlm"
if compgen -G ".whl/*.whl" > /dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
fi
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"

summary="$OUT/summary.jsonl"
: > "$summary"
step() {  # step NAME SECONDS COMMAND... : run with a time limit, log to $OUT/NAME.log, record the exit status
    local name=$1 limit=$2
    shift 2
    local started=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - started))}" | tee -a "$summary"
}

step environment 60 bash -c "nvidia-smi || true; $PYTHON -c 'import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.is_available())'"
if [ "$DRY" = 1 ]; then
    step kernel_tests 900 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_dequant_matmul.py -k "k_quant and cpu"
    step greedy 600 "$PYTHON" scripts/gpu_greedy_check.py --device cpu --tokens 8 --json "$OUT/greedy.json"
    step bench 300 "$PYTHON" -m kilnlm.cli bench --dry-run --json
    step kernel_bench 300 "$PYTHON" benchmarks/kernels.py --dry-run --json
else
    # conftest.py sets TRITON_INTERPRET only without CUDA: here the kernels compile for the GPU.
    step kernel_tests 240 "$PYTHON" -m pytest -q -p no:cacheprovider -x tests/test_dequant_matmul.py \
        tests/test_triton_kernels.py tests/test_ssm_kernels.py -k cuda
    step greedy 120 "$PYTHON" scripts/gpu_greedy_check.py --device cuda --json "$OUT/greedy.json"
    step bench 120 "$PYTHON" -m kilnlm.cli bench --shape llama-1b --device cuda --json
    step kernel_bench 120 "$PYTHON" benchmarks/kernels.py --json
fi
"$PYTHON" - "$summary" > "$OUT/summary.json" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
print(json.dumps({"steps": rows, "failed": [r["step"] for r in rows if r["rc"] != 0]}, indent=2))
EOF
cat "$OUT/summary.json"
