#!/usr/bin/env bash
# The GPU benchmarks, prepared to run unattended in one call of the device tool on a lent H100/H200, in under 8
# minutes (its time boxes on one GPU add up to 430 s): a randomly initialised Llama-2-7B-size model (speed and memory depend on the shapes only), LoRA r 8 on
# q_proj, v_proj, built from its config on the device (the machine has neither the hub nor ../shared; the tokenizer
# is trained in memory and the questions are the demo's packaged ARC-Easy ones). Parts, each time-boxed with
# `timeout` and printed (and saved to $out/<part>.txt) as soon as it ends, so a later failure loses nothing:
#   train_step     AdamW and IVON steps side by side: the IVON / AdamW step-time ratio and each one's peak memory;
#   sampled_eval   IVON's 10-sample evaluation batched (all at once, and in chunks of 5: eval.samples_per_forward)
#                  and sequential, against 10 evaluations at the mean, with each one's peak memory;
#   qlora_step     an IVON step on the same model quantised to 4 bits as it loads (bitsandbytes), time and peak;
#   fsdp_step      a 2-process `varlora train` run of 2 IVON steps with FSDP2-sharded weights (--model.sharding
#                  fsdp) where there are 2 GPUs (skipped with the reason otherwise).
#
# Its image has torch but not the transformers/peft versions varlora needs, nor bitsandbytes: carry them as wheels
# in .whl/ (ignored by git; bitsandbytes trimmed to its CUDA 13 library, the image's, to fit the 64 MiB a call
# carries). Here, once:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_17_x86_64 --platform manylinux_2_24_x86_64 -d .whl \
#       transformers==5.25.0 peft==0.22.0 bitsandbytes==0.50.2
#   zip -qd .whl/bitsandbytes-*.whl 'bitsandbytes/libbitsandbytes_cuda1[12]*' 'bitsandbytes/libbitsandbytes_rocm*'
# then the device tool's run with carry [".whl"], timeout_s 600 and command "bash benchmarks/gpu.sh"; the outputs
# come back from $OUT (copy them to results/benchmarks/). Elsewhere the outputs go to results/benchmarks/.
# Dry run on a CPU (a tiny model, the same code paths; bitsandbytes' CPU backend for the QLoRA part):
#   SHAPE=smollm2-135m LAYERS=2 DEVICE=cpu bash benchmarks/gpu.sh
set -uo pipefail  # no -e: a failing part is reported and the next one runs
cd "$(dirname "$0")/.."
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:src
else
    export PYTHONPATH=src
fi
PY=${PYTHON:-$( [ -x .venv/bin/python ] && [ ! -d .whl ] && echo .venv/bin/python || echo python3)}
SHAPE=${SHAPE:-llama-2-7b}
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-$( [ "$DEVICE" = cpu ] && echo float32 || echo bfloat16)}
LAYERS=${LAYERS:-}
layers=${LAYERS:+--layers $LAYERS}
if [ "$DEVICE" = cpu ]; then  # the dry run: the same parts and options, a few steps and questions
    steps="--steps 2 --warmup 1" qsteps="--steps 1 --warmup 1" eval_size="--samples 4 --samples-per-forward 2 --examples 4 --batch-size 2 --repeats 1"
else
    steps="--steps 10 --warmup 3" qsteps="--steps 4 --warmup 2" eval_size="--samples 10 --samples-per-forward 5 --examples 32 --batch-size 8 --repeats 2"
fi
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
out=${OUT:-results/benchmarks}
tag=$( [ "$DEVICE" = cpu ] && echo cpu-dry-run || echo gpu)
mkdir -p "$out"
model_dir=$(mktemp -d /tmp/varlora-random-model.XXXX)
trap 'rm -rf "$model_dir"' EXIT
script_start=$SECONDS

# part NAME LIMIT_S COMMAND...: run COMMAND under `timeout`, tee its output to $out/NAME_$tag.txt, report its status
part() {
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    echo "=== $name (limit ${limit} s)"
    timeout --kill-after=15 "$limit" "$@" 2>&1 | tee "$out/${name}_$tag.txt"
    local rc=${PIPESTATUS[0]}
    local status=ok
    [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && status="TIMED OUT"
    [ "$rc" -ne 0 ] && [ "$status" = ok ] && status="FAILED (exit $rc)"
    echo "=== $name: $status in $((SECONDS - start)) s"
}

echo "=== device"
$PY -c "
import torch, transformers, peft
dev = '$DEVICE'
name = torch.cuda.get_device_name() if dev.startswith('cuda') else 'CPU (dry run)'
gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
print(f'card: {name}; GPUs: {gpus}; torch {torch.__version__} | transformers {transformers.__version__} | '
      f'peft {peft.__version__}')" 2>&1 | tee "$out/device_$tag.txt"
echo "shape $SHAPE${LAYERS:+ ($LAYERS layers)}, $DTYPE on $DEVICE"

part train_step 140 $PY benchmarks/train_step.py --shape "$SHAPE" $layers --dtype "$DTYPE" --device "$DEVICE" \
    --methods adamw ivon $steps

part sampled_eval 100 $PY benchmarks/sampled_eval.py --shape "$SHAPE" $layers --dtype "$DTYPE" --device "$DEVICE" \
    $eval_size

# the quantised base must be loaded from files (bitsandbytes quantises as the weights load): write the random model
if $PY -c "import bitsandbytes" 2>/dev/null; then
    part save_random_model 80 $PY benchmarks/save_random_model.py "$model_dir" --shape "$SHAPE" $layers \
        --dtype "$DTYPE" --device "$DEVICE"
    if [ -f "$model_dir/config.json" ]; then
        part qlora_step 110 $PY benchmarks/train_step.py --model "$model_dir" --quantization 4bit --dtype "$DTYPE" \
            --device "$DEVICE" --methods ivon $qsteps
    else
        echo "=== qlora_step: skipped (no saved model)"
    fi
else
    echo "=== qlora_step: skipped (bitsandbytes does not import: carry its wheel in .whl/, see the header)"
fi

gpus=$($PY -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)" 2>/dev/null || echo 0)
flag=$($PY -m varlora.cli train --help 2>/dev/null | grep -o -- '--[a-z]*\.sharding' | head -1)
if [ "$gpus" -lt 2 ]; then
    echo "=== fsdp_step: skipped ($gpus GPU(s) on this machine; a 2-process sharded step needs 2)"
elif [ -z "$flag" ]; then
    echo "=== fsdp_step: skipped (varlora train offers no --<section>.sharding option in this version)"
elif [ ! -f "$model_dir/config.json" ]; then
    echo "=== fsdp_step: skipped (no saved model to load)"
else
    data=$($PY -c "from varlora.assets import find_demo_data; print(find_demo_data())")
    part fsdp_step 120 $PY -m torch.distributed.run --standalone --nproc-per-node 2 -m varlora.cli train \
        --run-dir "$model_dir/run" --model.name "$model_dir" --model.dtype "$DTYPE" "$flag" fsdp \
        --method.name ivon --data.task arc_easy --data.data_dir "$data" --data.train_limit 16 \
        --data.eval_limit 8 --train.steps 2 --train.batch_size 4 --train.eval_every 0
fi
echo "=== all parts done in $((SECONDS - script_start)) s"
