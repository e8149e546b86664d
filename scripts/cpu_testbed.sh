#!/usr/bin/env bash
# The CPU proxies of the long-schedule testbed (lshmoe_pretrain/testbed.py): `gpt-mini-long-cpu` (GPT-MoE
# `mini-moe` in bf16, 1,024 tokens per step over gpt-25m-long's 3,663 steps) and `t5-mini-long-cpu` (T5-MoE
# `mini-moe`, 1,024 input tokens per step over t5-26m-long's 3,663 steps); two runs at once, EP=1. About 10-15
# minutes per pair of runs on a quiet 2-core machine. What they find orders what the GPU testbed screens first;
# they are not a quality claim (docs/quality.md says which sections are the proxies').
#
#   bash scripts/cpu_testbed.sh [BATCH ...]                             # GPT proxy; default: all, in this order
#   TESTBED=t5-mini-long-cpu bash scripts/cpu_testbed.sh [BATCH ...]    # the same batches on the T5 proxy
#
# Runs found finished are skipped, so the script can be stopped and run again. The corpus is built first if it is
# missing (~1 minute).
set -euo pipefail
cd "$(dirname "$0")/.."
export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1
# Its own JIT build of DeepSpeed's CPU comm op: other checkouts' environments rebuild (and lock) the default one.
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/runs/torch_extensions}
# The pinned corpus (lshmoe_pretrain/data/corpus.py): the same bytes in every session, checked against its hashes.
DATA=.device_data/python_code_pinned_4k
[ -f "$DATA.bin" ] || python scripts/preprocess_data.py --input python-code-pinned --max_tokens 12e6 \
    --vocab_size 4096 --output_prefix "$DATA"
(cd "$(dirname "$DATA")" && sha256sum --quiet -c ../docs/records/corpus_python_code_pinned_4k.sha256) \
    || { echo "$DATA is not the proxy's corpus (docs/records/corpus_python_code_pinned_4k.sha256)"; exit 1; }
ROOT=${ROOT:-runs/cpu_testbed}
# The candidates within reach of stock after seed 1 (docs/quality.md, section proxy_gpt_mini_x1)
CANDIDATES=${CANDIDATES:-fp4_both fp8_fwd_fp4_grad}
TESTBED=${TESTBED:-gpt-mini-long-cpu}
bed() { python scripts/compare_quality.py run --testbed "$TESTBED" --data_prefix "$DATA" --vocab_size 4096 \
            --root "$ROOT" "$@"; }

batch() {
    case "$1" in
        paper) bed --seeds 1 --variants stock lsh ;;
        candidates) bed --seeds 1 --variants fp8_both_e8m0 fp8_fwd_fp4_grad fp4_both bounded_0.1 ;;
        seeds) bed --seeds 2 3 --variants stock ;;
        lengths) bed --lengths 0.125 0.5 --seeds 1 --variants stock lsh ;;
        controls) bed --seeds 1 --variants rate_1.0 lsh_no_ec ;;
        more) bed --seeds 1 --variants fp8_dispatch fp4_dispatch bounded_0.2 bounded_0.1_fp8 fp8_both ;;
        # the formats the GPU screen runs, beyond the candidates: seeds 1-3 of FP8 both ways (float32 and e8m0
        # scales), seeds 1-2 of FP8 to the experts only, FP4 to the experts only
        formats) bed --seeds 1 --variants fp8_dispatch fp4_dispatch
                 bed --seeds 2 --variants fp8_dispatch fp8_both_e8m0
                 bed --seeds 1 3 --variants fp8_both fp8_both_e8m0 ;;
        # issue 24's other candidates: compensation without its identity backward (none at all, or the fitted
        # linear map) and schedules that compress only the first half or 85% of the steps
        compensation) bed --seeds 1 --variants lsh_no_ec exact_tail_0.5 linear_map exact_tail_0.15 ;;
        # compensation's forward with its backward path cut (lsh_moe.residual_grad "stop"), the paper's and the
        # fitted map's: beside lsh, lsh_no_ec and linear_map, which half of compensation moves the final loss
        residual-grad) bed --seeds 1 --variants lsh_stop_grad linear_map_stop_grad ;;
        # the fitted map differentiated (residual_grad "through_map"): forward and backward of one function
        through-map) bed --seeds 1 --variants linear_map_through ;;
        # the same question where compression ended below stock (the T5 proxy): no compensation, and compensation's
        # forward without its backward path
        compensation-halves) bed --seeds 1 --variants lsh_no_ec lsh_stop_grad ;;
        # seed 2 of the compensation rows (their seed 1 ordered them: no compensation, the differentiated map, the
        # paper's, the stopped residual)
        compensation-seed2) bed --seeds 2 --variants lsh_no_ec linear_map_through lsh_stop_grad ;;
        # where a compressed variant ends below stock (T5): stock at 1.5x and 2x the peak learning rate, and the
        # paper's at 1.5x, beside the control rate 1.0 (= stock bit for bit)
        lr-controls) bed --seeds 1 --variants rate_1.0 stock_lr1.5x stock_lr2x lsh_lr1.5x ;;
        # where the paper's configuration ends below stock (T5): stock plus compensation's backward path alone (no
        # compression: each token's output gradient minus its LSH cluster's mean, added in the backward), and stock
        # with a residual connection around every expert (x + E(x), value and gradient)
        backward-path) bed --seeds 1 --variants diag_residual_grad diag_skip ;;
        # seed 1 of the candidates alone (a new shape's first screen)
        screen) bed --seeds 1 --variants $CANDIDATES ;;
        # what the frontier's rule asks of a candidate beyond seed 1: seeds 2 and 3, and the shorter schedules
        candidate-seeds) bed --seeds 2 3 --variants $CANDIDATES ;;
        candidate-lengths) bed --lengths 0.125 0.5 --seeds 1 --variants $CANDIDATES ;;
        # a stock run of its own that saves its MoE layers' dispatched tokens and experts at 10%, 50% and the
        # end, for scripts/compressibility.py (docs/compressibility.md)
        captures) bed --seeds 4 --variants stock --capture_at 0.1 0.5 1 --capture_run stock/4 ;;
        *) echo "unknown batch $1; allowed: paper seeds candidates lengths captures controls more formats compensation candidate-seeds candidate-lengths residual-grad through-map compensation-halves compensation-seed2 lr-controls backward-path screen"; return 2 ;;
    esac
}

for name in "${@:-paper seeds candidates lengths captures controls more formats compensation candidate-seeds candidate-lengths residual-grad}"; do
    for b in $name; do batch "$b"; done
done
