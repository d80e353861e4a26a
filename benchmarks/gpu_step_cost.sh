#!/usr/bin/env bash
# benchmarks/step_cost.py --device cuda --bf16 for every model family (or MODELS), one JSON per family in OUT
# (default build/gpu); then benchmarks/wide_step_cost.py --device cuda --bf16 (LLaVA-1.5-7B widths, batches 1, 2, 4
# and 8) with WIDE_LAYERS language layers (default 2; 0 skips it) into OUT/wide_step_cost.json.
# Run from the repository root on a machine with one CUDA GPU and the project's pins installed. Where only torch is
# installed, put the other wheels of constraints.txt and the repository on PYTHONPATH first (step_cost.py applies
# the plugin's patches itself when the .pth activation is missing).
set -uo pipefail
out=${OUT:-build/gpu}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"
for model in ${MODELS:-llava-576 qwen2vl qwen2_5vl qwen3vl internvl gemma3 llava_next}; do
    start=$(date +%s)
    python3 benchmarks/step_cost.py --model "$model" --device cuda --bf16 --repeats "${REPEATS:-10}" \
        --out "$out/step_cost_$model.json" >"$out/step_cost_$model.log" 2>&1
    echo "$model: exit $? in $(($(date +%s) - start)) s"
    python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print({k: (v['fast_over_reference'], v['fast_over_sft'], v['peak_mem_fast_over_sft']) for k, v in r.items() if k.startswith('stride')})" "$out/step_cost_$model.json" 2>/dev/null || tail -5 "$out/step_cost_$model.log"
done
wide_layers=${WIDE_LAYERS:-2}
if [ "$wide_layers" != 0 ]; then
    start=$(date +%s)
    python3 benchmarks/wide_step_cost.py --device cuda --bf16 --layers "$wide_layers" --repeats "${REPEATS:-10}" \
        --out "$out/wide_step_cost.json" >"$out/wide_step_cost.log" 2>&1
    echo "wide ($wide_layers layers): exit $? in $(($(date +%s) - start)) s"
    python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print({e['batch']: (e['fast_over_reference'], e['fast_over_sft'], e['peak_mem_fast_over_sft']) for e in r['batches']})" "$out/wide_step_cost.json" 2>/dev/null || tail -5 "$out/wide_step_cost.log"
fi
