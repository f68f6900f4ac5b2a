#!/usr/bin/env bash
# The GPU benchmarks, in one call of the device tool on a lent H100/H200 (a few minutes): at Llama-2-7B's size
# (random weights, bf16; speed and memory depend on the shapes only), side by side in each script,
#   train_step.py   one training step of AdamW, IVON and BLoB (the cpu preset's settings), time and peak memory;
#   sampled_eval.py IVON's 10-sample evaluation, batched and sequential, against 10 evaluations at the mean.
# The machine has neither ../shared nor the hub: the model is built on the GPU, the tokenizer is trained in memory,
# the questions are the demo's packaged ARC-Easy ones.
#
# Its image has torch but an older transformers than varlora needs; carry these two wheels (.whl/ is ignored by
# git). Here, once:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_17_x86_64 -d .whl transformers==5.24.0 peft==0.21.2
# then the device tool's run with carry [".whl"] and command "bash benchmarks/gpu.sh"; the outputs come back
# from $OUT (copy them to results/benchmarks/). Elsewhere the outputs go to results/benchmarks/.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:src
else
    export PYTHONPATH=src
fi
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
out=${OUT:-results/benchmarks}
mkdir -p "$out"
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, '| transformers', \
transformers.__version__, '| peft', peft.__version__, '|', torch.cuda.get_device_name())"
python3 benchmarks/train_step.py --shape llama-2-7b --dtype bfloat16 --device cuda --steps 12 --warmup 3 \
    2>&1 | tee "$out/train_step_gpu.txt"
python3 benchmarks/sampled_eval.py --shape llama-2-7b --dtype bfloat16 --device cuda --examples 32 \
    --batch-size 8 --repeats 3 2>&1 | tee "$out/sampled_eval_gpu.txt"
