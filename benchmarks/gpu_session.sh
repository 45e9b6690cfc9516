#!/usr/bin/env bash
# Issue 11's measurements as one command on a lent GPU machine (see /work/.library/device: the working
# tree travels there, files written under $OUT come back). Run from the repository root:
#
#   bash benchmarks/gpu_session.sh bench   # benchmarks/gpu.py: pre-training, decoding, RL (+ TRL), ~3 min
#   bash benchmarks/gpu_session.sh preset  # critical-tokens reproduce --preset gpu, then its report, ~9 min
#
# trl and datasets, which that machine lacks, travel as wheels in .whl/ (git-ignored) when present.
# Everything is written as it goes, so a command stopped at its limit still returns what it measured.
set -u
what=${1:?bench or preset}
OUT=${OUT:-/tmp/gpu-session}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
case "$what" in
bench)
    timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_generation.py -k "cuda or static" 2>&1 | tail -3 | tee "$OUT/cuda-tests.log"
    (cd benchmarks && timeout "${BENCH_TIMEOUT:-230}" python3 gpu.py --out "$OUT/bench.json" --deadline-s "${BENCH_DEADLINE:-150}" "${@:2}") \
        2>&1 | grep -v -E "it/s\]|s/it\]" | tee "$OUT/bench.log"
    ;;
preset)
    run=/tmp/gpu-preset
    timeout "${PRESET_TIMEOUT:-510}" python3 -m critical_tokens.cli reproduce --preset gpu --out "$run" "${@:2}" 2>&1 | tail -40
    python3 -m critical_tokens.cli report "$run" 2>&1 | tail -3
    # metrics, configs, logs, REPORT.md and plots; no weights (they cannot come back)
    tar czf "$OUT/gpu-preset.tar.gz" --exclude=model --exclude='*.safetensors' --exclude='*.pt' -C /tmp gpu-preset
    ls -la "$OUT"
    ;;
*)
    echo "usage: bash benchmarks/gpu_session.sh bench|preset [arguments]" >&2; exit 2 ;;
esac
