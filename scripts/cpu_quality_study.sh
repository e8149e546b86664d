#!/usr/bin/env bash
# The CPU quality study of docs/quality.md: GPT-MoE and T5-MoE `mini-moe` (8 experts, top-2, MoE in every other
# block, 3.2M parameters) trained on 1M tokens of the python-code corpus, every run to the end of its schedule,
# two at a time, EP=1 (compression is local to a rank). About 15 minutes per pair of runs on a quiet 2-core machine.
#
#   bash scripts/cpu_quality_study.sh [BATCH ...]      # batches below; default: all, in this order
#   python scripts/compare_quality.py report --model gpt --root runs/cpu_quality --variants ... --section ...
#
# Runs found finished are skipped, so the script can be stopped and run again. The corpus is built first if
# it is missing (~2 minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1
# Its own JIT build of DeepSpeed's CPU comm op: other checkouts' environments rebuild (and lock) the default one.
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/runs/torch_extensions}
DATA=.device_data/python_code_4k
[ -f "$DATA.bin" ] || python scripts/preprocess_data.py --input python-code --max_tokens 12e6 --vocab_size 4096 \
    --output_prefix "$DATA"
common=(--preset mini-moe --data_prefix "$DATA" --vocab_size 4096 --micro_batch 16 --lr 2e-3 --tokens 1e6
        --evals 8 --eval_tokens 65536 --final_eval_tokens 0 --root runs/cpu_quality --concurrency 2)
gpt() { python scripts/compare_quality.py run --model gpt --base_config configs/gpt_moe_cpu.json "${common[@]}" "$@"; }
t5() { python scripts/compare_quality.py run --model t5 --base_config configs/t5_moe_cpu.json "${common[@]}" "$@"; }

batch() {
    case "$1" in
        main) gpt --seeds 1 2 3 --variants stock lsh ;;
        mechanism) gpt --seeds 1 --variants diag_forward diag_backward diag_expert_grads diag_token_grads \
                       diag_identity_grad ;;
        compensation) gpt --seeds 1 --variants lsh_no_ec linear_map ;;
        methods) gpt --seeds 1 --variants exact_tail_0.15 refine_2 redraw rate_1.0 ;;
        t5) t5 --seeds 1 --variants stock lsh lsh_no_ec diag_identity_grad ;;
        controls) gpt --seeds 1 --variants rate_1.0 random_clusters
                  gpt --seeds 2 --variants random_clusters lsh_no_ec
                  gpt --seeds 1 --variants diag_skip
                  gpt --seeds 1 --variants diag_forward_random diag_backward_random ;;
        seeds) gpt --seeds 2 --variants diag_identity_grad lsh_no_ec exact_tail_0.15 refine_2 ;;
        exact) gpt --seeds 1 --variants exact_tokens_8 exact_tokens_16 ;;
        rates) gpt --seeds 1 --variants rate_0.1 rate_0.3 rate_0.5 lsh_no_ec_refine_2 ;;
        lr) # is either side's learning rate tuned? (a root of its own per rate; 2e-3 is the study's)
            for run in "4e-3 stock" "1e-3 stock" "4e-3 lsh"; do
                set -- $run
                python scripts/compare_quality.py run --model gpt --base_config configs/gpt_moe_cpu.json \
                    "${common[@]/runs\/cpu_quality/runs/cpu_quality_lr$1}" --lr "$1" --seeds 1 --variants "$2"
            done ;;
        tokens) # LSH-MoE on longer schedules of its own: the tokens it needs to reach stock's final loss
            for tokens in 1.25e6 1.5e6; do
                python scripts/compare_quality.py run --model gpt --base_config configs/gpt_moe_cpu.json \
                    "${common[@]/runs\/cpu_quality/runs/cpu_quality_tokens$tokens}" --tokens "$tokens" --seeds 1 \
                    --variants lsh
            done ;;
        *) echo "unknown batch $1; allowed: main mechanism compensation methods controls t5 seeds rates exact lr tokens"
           return 2 ;;
    esac
}

for name in "${@:-main mechanism compensation methods controls t5 seeds rates exact lr tokens}"; do
    for b in $name; do batch "$b"; done
done
