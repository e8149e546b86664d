#!/usr/bin/env bash
# One call on a lent GPU machine (no network, Python 3.12, torch + triton preinstalled): install the carried
# wheels (.whl, built on the CPU machine: `pip wheel deepspeed==0.19.8 --no-deps` from its sdist, and
# `pip download --python-version 3.12 --only-binary=:all: --no-deps` of hjson, pydantic, pydantic-core,
# annotated-types, typing-inspection and megatron-core==0.16.1, which tests/gpu/test_megatron_cuda.py imports)
# and this checkout, then run the
# named stages in order, each logged under $OUT. State that later calls of the same lease reuse lives in /root:
# the installed packages, the tokenized corpus cache and the quality study's runs.
#
#   bash scripts/gpu_session.sh tests-bg bench-gpt-small quality:gpt-main:400 wait-tests
#
# Stages: corpus (in the background) | tests | tests-bg (in the background, alongside what follows) | wait-tests
#       (GPU_TESTS="<files or node ids>" runs a subset of tests/gpu)
#       | bench-compressor | bench-wire (the wire formats' encode + decode vs the bandwidth floor: fp8_e4m3,
#         fp4_e2m1 (and its stochastic encode) and fp6_e2m3, float32 and e8m0 scales, reference and fused, 16K tokens;
#         section wire_codec, the H200's: WIRE_SECTION names another, as an H100's run must; WIRE_ARGS adds
#         benchmark_wire.py's own, e.g. "--tile 8192 --kernels triton") | bench-layer | bench-gpt
#       | bench-gpt-small | profile-gpt-135m (VARIANTS="...": those beside stock) | quality:<study>:<seconds>
#       | bench-modelled-135m | bench-modelled-1.3b (GPT-MoE step times at modelled EP 8/16/64 over 100/200/400 Gb/s
#         and NVLink 4, one GPU, the link stand-in, on 8-GPU nodes (NVLink inside, one NIC per GPU: EP=8 crosses
#         no NIC); MODELLED_GPUS_PER_NODE=1 puts every peer behind the NIC, and the section name ends in _g1;
#         each stage fits one 10-minute call on its own: docs/link_model.md)
#       | bench-modelled-135m-fp8 | bench-modelled-1.3b-fp8 (the same modelled jobs for FP8 on the wire, alone and under
#         LSH: the variants stock lsh fp8 fp8_dispatch paper_fp8 (1.3b: without lsh, whose engine would not fit beside
#         four others), over 100/200/400 Gb/s only; each crossing is priced at its wire format's bytes; the section
#         name ends in _g<G>_<methods>)
#       | bench-modelled-135m-candidates (the frontier's fallback, lshmoe_pretrain/frontier.py: stock and the
#         candidates VARIANTS="..." (any benchmark_gpt_moe.py variant, quality-study names included; default the
#         screen's: lsh fp8_both fp8_both_e8m0 fp8_dispatch fp4_both fp8_fwd_fp4_grad bounded_0.1 bounded_0.1_fp8)
#         at modelled EP=16 over 100/200/400 Gb/s, 8 GPUs per node, MICRO_BATCH sequences per rank (default 32);
#         the section name ends in _g<G>_<variants>)
#       | bench-modelled-1.3b-candidates (stock and VARIANTS, default the default method, at 1.3b: modelled EP=16 over
#         100/200/400 Gb/s, 8 GPUs per node; two engines, which fit an H100)
#       | check-link-nvlink | check-link-socket (2 GPUs, nvidia-h200-x2: the link model against NCCL over NVLink
#         and over the emulated socket link, scripts/check_link_model.py)
#       | quality-bg:<study>:<seconds> (in the background, alongside what follows; waited for at the end)
#       | mps-on | mps-off (CUDA MPS control daemon, so concurrent runs share the GPU's SMs; mps-on says if it cannot)
#       | throughput:<testbed>:<runs at once, comma-separated>:<steps> (compare_quality.py throughput)
#       | testbed-bg:<testbed>:<lengths, comma-separated>:<seconds> (the long-schedule study, started with setsid from
#         a frozen copy of this checkout so that it outlives this call and later calls' installs; TESTBED_VARIANTS,
#         TESTBED_SEEDS, CONCURRENCY, CAPTURE_AT ("0.1 0.5 1": the CAPTURE_RUN run, default stock/1, saves captures),
#         CAPTURE_EXPERTS (experts per captured layer; 2 at d_model 512), TESTBED_ROOT). <seconds> is the study's
#         deadline, which stops its runs where they are: make it outlast the call and poll in the next call (the
#         study runs on while the lease is held), since a lease's cut run is trained again from its first step
#         (thirteen gpt-25m-1pass runs needed 10.5 minutes on the fifteenth session's H100, and a 600 s deadline cut
#         them all)
#       | poll:<seconds> (wait while a testbed-bg study runs, at most that long; its records come back each time)
# The quality studies read the pinned corpus carried as .device_corpus (scripts/prepare_gpu_carry.sh builds it on the
# CPU machine: python-code-pinned, the same bytes in every session); otherwise they tokenize the python-code corpus
# here, whose runs compare with no other machine's.
set -uo pipefail
source "$(dirname "$0")/gpu_mps.sh"
OUT=${OUT:-/tmp/gpu_session_out}
mkdir -p "$OUT/logs"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
# Several studies' runs share one GPU: growable segments keep each process's cached-but-free memory small.
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
if [ ! -f /root/site/.installed ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /root/site .whl/*.whl \
        && touch /root/site/.installed || exit 1
fi
export PYTHONPATH=/root/site PATH=/root/site/bin:$PATH
# The checkout itself, installed as the README's layout (lshmoe_plugin.patches from patches/), every call.
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --upgrade --target /root/plugin . \
    >"$OUT/logs/install.log" 2>&1 || { cat "$OUT/logs/install.log"; exit 1; }
export PYTHONPATH=/root/plugin:/root/site
# A second call of this script in the same command keeps the sections the first one wrote.
[ -f "$OUT/benchmarks.md" ] || cp docs/benchmarks.md "$OUT/benchmarks.md"
[ -f "$OUT/link_model.md" ] || cp docs/link_model.md "$OUT/link_model.md"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv >"$OUT/logs/gpu.txt" 2>&1

nvidia-smi --query-gpu=timestamp,memory.used,utilization.gpu --format=csv -l 15 >"$OUT/logs/gpu_use.csv" 2>&1 &
# The study's records live in /root/$STUDY_NAME (quality: the 2026-12 protocol, with evaluation points of 262k
# tokens spread over the split and a final point on all of it).
STUDY_NAME=${STUDY_NAME:-quality}
QUALITY_ROOT=/root/$STUDY_NAME
BACKGROUND_PIDS=()
# A fresh machine continues a study from the records an earlier lease brought back (carry .device_state): runs
# found finished are skipped; unfinished ones start over (their checkpoints never come back).
if [ ! -d "$QUALITY_ROOT" ] && [ -f .device_state/quality_runs.tgz ]; then
    tar xzf .device_state/quality_runs.tgz -C /root
fi
# The study corpus: the pinned corpus's compressed copy (.device_corpus: the .bin as xz, so that it travels beside
# the wheels and a study's records within the carry limit), unpacked once per machine into /root/data and checked
# against its hashes (docs/records/corpus_python_code_pinned.sha256): runs on two corpora are not comparable, and
# every run records its corpus's digest (run.json data_sha256), which the reports check.
DATA=()
if [ -f .device_corpus/python_code_pinned.bin.xz ]; then
    if [ ! -f /root/data/python_code_pinned.bin ]; then
        mkdir -p /root/data && cp .device_corpus/python_code_pinned.idx .device_corpus/python_code_pinned.tokenizer.json \
                /root/data/ \
            && python3 -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], 'wb'))" \
                .device_corpus/python_code_pinned.bin.xz /root/data/python_code_pinned.bin.part \
            && mv /root/data/python_code_pinned.bin.part /root/data/python_code_pinned.bin || exit 1
    fi
    DATA=(--data_prefix /root/data/python_code_pinned)
    # (the hash file's path is taken before the cd: $PWD inside the subshell would be /root/data)
    hashes="$PWD/docs/records/corpus_python_code_pinned.sha256"
    (cd /root/data && sha256sum --quiet -c "$hashes") \
        || { echo "the corpus in /root/data is not the pinned one (docs/records/corpus_python_code_pinned.sha256)"; exit 1; }
fi
quality() {  # quality:<study>:<seconds>
    local study=$1 seconds=$2 common=(--root "$QUALITY_ROOT" --deadline_s "$seconds" "${DATA[@]}")
    case "$study" in
        timing) python3 scripts/compare_quality.py run --model gpt --preset gpt-moe-135m --variants stock lsh \
                    --seeds 1 --tokens 1.5e6 --evals 1 --eval_tokens 65536 --final_eval_tokens 65536 --concurrency 1 --root /root/quality_timing \
                    --deadline_s "$seconds" ;;
        gpt-main) python3 scripts/compare_quality.py run --model gpt --preset gpt-moe-135m \
                    --variants stock lsh lsh_no_ec --seeds 1 2 3 --tokens "${GPT_TOKENS:-10e6}" \
                    --evals "${EVALS:-8}" --eval_tokens "${EVAL_TOKENS:-262144}" --save_every "${SAVE_EVERY:-0}" \
                    --concurrency "${CONCURRENCY:-9}" "${common[@]}" ;;
        gpt-ablations) python3 scripts/compare_quality.py run --model gpt --preset gpt-moe-135m \
                    --variants rate_0.1 rate_0.3 rate_0.5 hashes_2 hashes_4 hashes_8 spherical --seeds 1 \
                    --tokens "${GPT_TOKENS:-10e6}" --evals "${EVALS:-8}" --eval_tokens "${EVAL_TOKENS:-262144}" \
                    --save_every "${SAVE_EVERY:-0}" --concurrency "${CONCURRENCY:-7}" "${common[@]}" ;;
        t5-main) python3 scripts/compare_quality.py run --model t5 --preset t5-moe-140m --variants stock lsh \
                    --seeds 1 2 --tokens "${T5_TOKENS:-6e6}" --evals "${T5_EVALS:-8}" --eval_tokens "${EVAL_TOKENS:-262144}" \
                    --save_every "${SAVE_EVERY:-0}" --concurrency "${T5_CONCURRENCY:-4}" "${common[@]}" ;;
        # Any variants of one model: STUDY_MODEL, STUDY_PRESET, STUDY_VARIANTS, STUDY_SEEDS, STUDY_TOKENS.
        custom) python3 scripts/compare_quality.py run --model "${STUDY_MODEL:-gpt}" \
                    --preset "${STUDY_PRESET:-gpt-moe-135m}" --variants ${STUDY_VARIANTS:-stock lsh} \
                    --seeds ${STUDY_SEEDS:-1} --tokens "${STUDY_TOKENS:-10e6}" --evals "${EVALS:-8}" \
                    --eval_tokens "${EVAL_TOKENS:-262144}" --save_every "${SAVE_EVERY:-0}" \
                    --concurrency "${CONCURRENCY:-5}" "${common[@]}" ;;
        *) echo "unknown study $study"; return 2 ;;
    esac
}

TESTBED_ROOT=${TESTBED_ROOT:-/root/testbed}
# Set once per lease, when the study folder is first filled (from the records or empty): a snapshot holds only the
# files written after it, so what comes back stays small however many runs the records hold (a file that comes
# back is at most 16 MB); land_device_results.py merges the snapshots into the records.
TESTBED_SINCE=/root/.testbed_since
TESTBED_RECORD=docs/records/testbed_pinned_runs.tar.xz
testbed_snapshot() {  # the testbed's new records (not checkpoints) and its captures, each in one file under $OUT
    [ -d "$TESTBED_ROOT" ] || return 0
    # The study logs travel inside it: what comes back from a call is at most 8 files.
    mkdir -p "$TESTBED_ROOT/study_logs" && cp /root/testbed_logs/*.log "$TESTBED_ROOT/study_logs/" 2>/dev/null
    local since=(); [ -f "$TESTBED_SINCE" ] && since=(--newer-mtime="@$(stat -c %Y "$TESTBED_SINCE")")
    # Exit status 1 is GNU tar's "a file changed as we read it" (a running study appends to its metrics): the
    # archive is whole, with that file as far as it had got, and it replaces the last one; 2 is a failure.
    tar czf "$OUT/.testbed_runs.tgz" --warning=no-file-changed "${since[@]}" --exclude=checkpoints \
        --exclude=monitor --exclude=captures -C "$(dirname "$TESTBED_ROOT")" "$(basename "$TESTBED_ROOT")"
    if [ $? -le 1 ]; then mv "$OUT/.testbed_runs.tgz" "$OUT/testbed_runs.tgz"; else rm -f "$OUT/.testbed_runs.tgz"; fi
    # Captures: one tar per capture file (step, layer), since a file that comes back is at most 16 MB and a file
    # with its output gradients takes up to 10 MB at d_model 256 (two layers of one step would not fit together).
    local file name
    for file in $(cd "$(dirname "$TESTBED_ROOT")" && find "$(basename "$TESTBED_ROOT")" -path '*/captures/step*_layer*.pt' | sort); do
        name=$(basename "$file" .pt)
        (cd "$(dirname "$TESTBED_ROOT")" && tar cf "$OUT/.captures.tar" "$file") && mv "$OUT/.captures.tar" "$OUT/captures_$name.tar"
    done
}
testbed_bg() {  # testbed-bg:<testbed>:<lengths>:<seconds>
    # A fresh machine continues the testbed from its records (docs/records, tracked, so every call carries them):
    # finished runs are skipped. Python reads the xz: the machine's tar may lack xz.
    if [ ! -d "$TESTBED_ROOT" ]; then
        mkdir -p "$(dirname "$TESTBED_ROOT")"
        if [ -f "$TESTBED_RECORD" ]; then
            python3 -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter='data')" \
                "$TESTBED_RECORD" "$(dirname "$TESTBED_ROOT")" || return 1
        fi
        mkdir -p "$TESTBED_ROOT" && sleep 1 && touch "$TESTBED_SINCE"
    fi
    local bed=$1 lengths=${2//,/ } seconds=$3 tag; tag=$1_$(date +%s%N); local frozen=/root/frozen/$tag
    # The study runs from its own copy of the checkout and of the plugin install: a later call re-syncs this
    # checkout and reinstalls the plugin, and the study's later runs must not import another version.
    rm -rf "$frozen" && mkdir -p "$frozen" /root/testbed_logs && cp -a . "$frozen/src" || return 1
    python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target "$frozen/plugin" "$frozen/src" \
        >>"$OUT/logs/install.log" 2>&1 || return 1
    local capture=(); [ -n "${CAPTURE_AT:-}" ] && capture=(--capture_at $CAPTURE_AT --capture_run "${CAPTURE_RUN:-stock/1}"
        ${CAPTURE_EXPERTS:+--capture_experts $CAPTURE_EXPERTS})
    (cd "$frozen/src" && PYTHONPATH="$frozen/plugin:/root/site" setsid nohup python3 scripts/compare_quality.py run \
        --testbed "$bed" --lengths $lengths --variants ${TESTBED_VARIANTS:-stock lsh} --seeds ${TESTBED_SEEDS:-1} \
        ${CONCURRENCY:+--concurrency $CONCURRENCY} --root "$TESTBED_ROOT" --deadline_s "$seconds" "${DATA[@]}" \
        "${capture[@]}" >"/root/testbed_logs/study_$tag.log" 2>&1 < /dev/null &)
    # The study prints its run count once it has read its records: with other runs loading the CPU that takes more
    # than five seconds, and a fixed wait printed nothing (2026-12-07).
    local waited=0; while [ $waited -lt 60 ] && ! grep -q "run(s) in all\|Traceback" "/root/testbed_logs/study_$tag.log" 2>/dev/null; do
        sleep 2; waited=$((waited + 2)); done
    tail -8 "/root/testbed_logs/study_$tag.log"
}
poll() {  # poll:<seconds>: wait while a testbed study runs; snapshot its records every 30 s
    local until=$(( $(date +%s) + $1 ))
    while [ "$(date +%s)" -lt "$until" ] && pgrep -f "compare_quality.py run --testbed" >/dev/null; do
        sleep 30; testbed_snapshot
    done
    testbed_snapshot
    pgrep -f "compare_quality.py run --testbed" >/dev/null && echo "testbed study still running" || echo "no testbed study running"
    tail -15 /root/testbed_logs/study_*.log 2>/dev/null
}

snapshot_records() {  # the quality runs' records (not their checkpoints), in one file
    if [ -d "$QUALITY_ROOT" ] || [ -d /root/quality_timing ]; then
        tar czf "$OUT/.quality_runs.tgz" --exclude=checkpoints --exclude=monitor -C /root \
            $(cd /root && ls -d "$STUDY_NAME" quality_timing 2>/dev/null) 2>/dev/null && mv "$OUT/.quality_runs.tgz" "$OUT/quality_runs.tgz"
    fi
}

for stage in "$@"; do
    echo "=== $stage ($(date -u +%H:%M:%S))"
    case "$stage" in
        # pytest's entry point, not `python -m pytest`: that would put the checkout's lshmoe_plugin (which has no
        # patches subpackage until installed) ahead of the installed one.
        # GPU_TESTS: the test files or node ids to run (default: all of tests/gpu)
        # One line a test in the log (-v), so that a run its timeout stops still names what failed before it.
        tests) timeout "${TESTS_TIMEOUT:-540}" pytest -v -rfE --tb=short -p no:cacheprovider ${GPU_TESTS:-tests/gpu} \
                >"$OUT/logs/tests.log" 2>&1; echo "pytest exit $? (124: stopped by TESTS_TIMEOUT)"
                grep -E "FAILED|ERROR|[0-9]+ (passed|failed)" "$OUT/logs/tests.log" | tail -25 ;;
        tests-bg) timeout "${TESTS_TIMEOUT:-300}" pytest -q -p no:cacheprovider ${GPU_TESTS:-tests/gpu} >"$OUT/logs/tests.log" 2>&1 &
                TESTS_PID=$! ;;
        wait-tests) [ -n "${TESTS_PID:-}" ] && wait "$TESTS_PID"; echo "gpu tests exit $?"; tail -25 "$OUT/logs/tests.log" ;;
        bench-gpt-small) python3 scripts/benchmark_gpt_moe.py --preset small --micro-batch 16 --steps 80 \
                --timed-from 20 --report "$OUT/benchmarks.md" 2>&1 | tee -a "$OUT/logs/bench_gpt.log" | tail -5 ;;
        bench-gpt-135m) python3 scripts/benchmark_gpt_moe.py --preset gpt-moe-135m --micro-batch 32 --steps 50 \
                --timed-from 15 --report "$OUT/benchmarks.md" 2>&1 | tee -a "$OUT/logs/bench_gpt.log" | tail -5 ;;
        # VARIANTS="..." profiles those beside stock (default: stock and lsh), e.g. the wire formats' step overhead
        profile-gpt-135m) python3 scripts/benchmark_gpt_moe.py --preset gpt-moe-135m --micro-batch 32 --steps 30 \
                ${VARIANTS:+--variants stock $VARIANTS} \
                --timed-from 10 --report "$OUT/profile_run.md" --profile "$OUT/profile_gpt_135m.txt" 2>&1 \
                | tee -a "$OUT/logs/profile.log" | tail -5 ;;
        bench-compressor) python3 scripts/benchmark_compressor.py --breakdown --rates 0.2 --kernels triton triton+graphs \
                --d-models 512 1024 2048 4096 --tokens 16384 40960 \
                --report "$OUT/benchmarks.md" --plot "$OUT/compressor_vs_floor.png" 2>&1 \
                | tee "$OUT/logs/bench_compressor.log" | tail -30 ;;
        bench-wire) python3 scripts/benchmark_wire.py --tokens 16384 --report "$OUT/benchmarks.md" \
                --section "${WIRE_SECTION:-wire_codec}" ${WIRE_ARGS:-} 2>&1 \
                | tee "$OUT/logs/bench_wire.log" | tail -55 ;;
        bench-layer) python3 scripts/benchmark_moe_layer.py --rates 0.2 --eager-too --report "$OUT/benchmarks.md" \
                --plot "$OUT/moe_layer_ep1.png" 2>&1 | tee "$OUT/logs/bench_layer.log" | tail -15 ;;
        bench-gpt) for preset in "small 16" "gpt-moe-135m 32"; do set -- $preset
                    python3 scripts/benchmark_gpt_moe.py --preset "$1" --micro-batch "$2" --steps 120 --timed-from 20 \
                        --report "$OUT/benchmarks.md" 2>&1 | tee -a "$OUT/logs/bench_gpt.log" | tail -5; done ;;
        bench-modelled-135m|bench-modelled-1.3b)
                # One process, one rank's shapes (1 expert per rank: the job has K experts), all 12 (EP, link) pairs
                # and the variants round-robin (lsh_decide: decide_by_cost, each layer deciding once per pair);
                # the timeout keeps the call's logs coming back.
                # 1.3b: MICRO_BATCH and VARIANTS (beside stock; default lsh lsh_decide) fit the stage to an H100: its
                # three engines at micro-batch 8 need an H200; stock and lsh at 4 fit 78 GiB as two engines did in
                # bench-modelled-1.3b-candidates (the section name then ends in _mb<N>).
                if [ "$stage" = bench-modelled-135m ]; then
                    model=(--preset gpt-moe-135m --micro-batch 32 --steps 30 --timed-from 10); variants=(lsh lsh_decide)
                else model=(--preset gpt-moe-1.3b --micro-batch "${MICRO_BATCH:-8}" ${MICRO_BATCH:+--section-suffix _mb$MICRO_BATCH}
                            --steps 10 --timed-from 3); variants=(${VARIANTS:-lsh lsh_decide}); fi
                timeout "${MODELLED_TIMEOUT:-540}" python3 scripts/benchmark_gpt_moe.py "${model[@]}" --variants stock "${variants[@]}" \
                    --experts-per-rank 1 --modelled-ep 8 16 64 --modelled-link 100gbps 200gbps 400gbps nvlink4 \
                    --modelled-gpus-per-node "${MODELLED_GPUS_PER_NODE:-8}" --report "$OUT/benchmarks.md" 2>&1 \
                    | tee -a "$OUT/logs/bench_modelled.log" | tail -30 ;;
        bench-modelled-135m-fp8|bench-modelled-1.3b-fp8)
                # FP8 alone (fp8, fp8_dispatch) and stacked under LSH (paper_fp8), beside stock and the paper's lsh.
                # Five 1.3b engines (about 21 GB of weights and Adam state each) leave too little of the H200 for
                # activations: its run drops lsh, whose rows are in bench-modelled-1.3b's section.
                if [ "$stage" = bench-modelled-135m-fp8 ]; then
                    model=(--preset gpt-moe-135m --micro-batch 32 --steps 30 --timed-from 10); variants=(stock lsh fp8 fp8_dispatch paper_fp8)
                else model=(--preset gpt-moe-1.3b --micro-batch 8 --steps 10 --timed-from 3); variants=(stock fp8 fp8_dispatch paper_fp8); fi
                timeout "${MODELLED_TIMEOUT:-540}" python3 scripts/benchmark_gpt_moe.py "${model[@]}" --variants "${variants[@]}" \
                    --experts-per-rank 1 --modelled-ep 8 16 64 --modelled-link 100gbps 200gbps 400gbps \
                    --modelled-gpus-per-node "${MODELLED_GPUS_PER_NODE:-8}" --report "$OUT/benchmarks.md" 2>&1 \
                    | tee -a "$OUT/logs/bench_modelled.log" | tail -30 ;;
        bench-modelled-135m-candidates)
                # 3 rows (links) per variant at one EP degree, round-robin: with the default 9 engines 27 rows x 24
                # steps = 648 engine steps, half of bench-modelled-135m-fp8's 45 x 30 (not timed yet: bounded runs
                # eagerly and e8m0/FP4 encode in PyTorch, so a step of those costs more than lsh's; 16 timed steps
                # per row keep the call well inside its 10 minutes).
                # MICRO_BATCH (default 32): more rows per step, so that the device, not the host, paces the step
                # (docs/benchmarks.md step_overlap: at 32 the host does).
                timeout "${MODELLED_TIMEOUT:-540}" python3 scripts/benchmark_gpt_moe.py --preset gpt-moe-135m \
                    --micro-batch "${MICRO_BATCH:-32}" ${MICRO_BATCH:+--section-suffix _mb$MICRO_BATCH} --steps 24 --timed-from 8 --experts-per-rank 1 --modelled-ep 16 --modelled-link 100gbps 200gbps 400gbps \
                    --modelled-gpus-per-node "${MODELLED_GPUS_PER_NODE:-8}" --variants stock \
                    ${VARIANTS:-lsh fp8_both fp8_both_e8m0 fp8_dispatch fp4_both fp8_fwd_fp4_grad bounded_0.1 bounded_0.1_fp8} \
                    --report "$OUT/benchmarks.md" 2>&1 | tee -a "$OUT/logs/bench_modelled.log" | tail -30 ;;
        bench-modelled-1.3b-candidates)
                # The 1.3b step at modelled EP=16, 8 GPUs per node: stock and VARIANTS (default the default method),
                # two engines, which fit an H100 (bench-modelled-1.3b's three ran it out of memory, 2026-12-06). At
                # this size the device paces the step, unlike the 135m one (docs/benchmarks.md step_overlap).
                timeout "${MODELLED_TIMEOUT:-540}" python3 scripts/benchmark_gpt_moe.py --preset gpt-moe-1.3b \
                    --micro-batch "${MICRO_BATCH:-8}" ${MICRO_BATCH:+--section-suffix _mb$MICRO_BATCH} --steps 10 --timed-from 3 \
                    --experts-per-rank 1 --modelled-ep 16 --modelled-link 100gbps 200gbps 400gbps \
                    --modelled-gpus-per-node "${MODELLED_GPUS_PER_NODE:-8}" --variants stock ${VARIANTS:-fp6_fwd_fp4sr_grad} \
                    --report "$OUT/benchmarks.md" 2>&1 | tee -a "$OUT/logs/bench_modelled.log" | tail -30 ;;
        check-link-nvlink) torchrun --nproc_per_node 2 scripts/check_link_model.py --report "$OUT/link_model.md" \
                --section nccl_check_nvlink 2>&1 | tee -a "$OUT/logs/check_link.log" | tail -30 ;;
        check-link-socket) NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1 NCCL_IB_DISABLE=1 NCCL_SOCKET_IFNAME=lo \
                torchrun --nproc_per_node 2 scripts/check_link_model.py --report "$OUT/link_model.md" \
                --section nccl_check_socket 2>&1 | tee -a "$OUT/logs/check_link.log" | tail -30 ;;
        corpus) # tokenize the code corpus on the CPUs while the GPU stages run; quality stages wait for it
                python3 -c "from lshmoe_pretrain.data import cached_preprocess as c; print(c('python-code', 16384))" \
                    >"$OUT/logs/corpus.log" 2>&1 &
                CORPUS_PID=$! ;;
        quality:*|quality-bg:*) [ -n "${CORPUS_PID:-}" ] && wait "$CORPUS_PID"
                IFS=: read -r kind study seconds <<<"$stage"
                # Snapshots of the records, so a call cut off by its time limit still brings them back.
                [ -z "${SNAPSHOT_PID:-}" ] && { ( while sleep 40; do snapshot_records; done ) & SNAPSHOT_PID=$!; }
                if [ "$kind" = quality-bg ]; then
                    quality "$study" "$seconds" >"$OUT/logs/quality_$study.log" 2>&1 &
                    BACKGROUND_PIDS+=("$!")
                else
                    quality "$study" "$seconds" 2>&1 | tee -a "$OUT/logs/quality_$study.log" | tail -20
                fi ;;
        mps-on) mkdir -p /tmp/nvidia-mps /tmp/nvidia-log
                # The daemon must not hold this call's stdout: a pipe reading it would never see its end.
                # A warm machine keeps the daemon an earlier call started (scripts/gpu_mps.sh): starting a second one
                # fails, and quitting it then would leave this call's runs time-sliced: four gpt-25m-1pass runs took
                # about 150 ms a step so, where twelve and sixteen at once under MPS took 84-129 ms (2026-12-07).
                if mps_daemon_running; then mps="CUDA MPS on (the daemon was running)"
                elif nvidia-cuda-mps-control -d >/dev/null 2>&1; then mps="CUDA MPS on"; else mps=; fi
                if [ -n "$mps" ] && python3 -c "import torch; torch.ones(1, device='cuda').sum().item()"; then
                    echo "$mps"; export LSHMOE_MPS="CUDA MPS on"
                else
                    echo quit | nvidia-cuda-mps-control 2>/dev/null; echo "CUDA MPS could not start here: running without"
                fi ;;
        mps-off) echo quit | nvidia-cuda-mps-control 2>/dev/null; unset LSHMOE_MPS; echo "CUDA MPS off" ;;
        throughput:*) IFS=: read -r _ bed runs steps <<<"$stage"
                python3 scripts/compare_quality.py throughput --testbed "$bed" --concurrency ${runs//,/ } \
                    --steps "${steps:-300}" --root /root/throughput "${DATA[@]}" --label "${LSHMOE_MPS:-CUDA MPS off}" \
                    --report "$OUT/benchmarks.md" 2>&1 | tee -a "$OUT/logs/throughput.log" | tail -25 ;;
        testbed-bg:*) IFS=: read -r _ bed lengths seconds <<<"$stage"; testbed_bg "$bed" "$lengths" "$seconds" ;;
        poll:*) poll "${stage#poll:}" ;;
        *) echo "unknown stage $stage" ;;
    esac
done
for pid in "${BACKGROUND_PIDS[@]}"; do wait "$pid"; echo "background study exit $?"; done
[ -n "${SNAPSHOT_PID:-}" ] && kill "$SNAPSHOT_PID" 2>/dev/null
snapshot_records
# At most 8 files come back from a call: every invocation's logs go into one archive (logs/, then logs.1/, ...), and
# the docs copies go unless a stage wrote into them.
if [ -f "$OUT/logs.tgz" ]; then
    merged=$(mktemp -d) && tar xzf "$OUT/logs.tgz" -C "$merged"
    n=1; while [ -e "$merged/logs.$n" ]; do n=$((n + 1)); done
    mv "$OUT/logs" "$merged/logs.$n" && tar czf "$OUT/logs.tgz" -C "$merged" . && rm -rf "$merged"
else
    tar czf "$OUT/logs.tgz" -C "$OUT" logs && rm -rf "$OUT/logs"
fi
for doc in benchmarks.md link_model.md; do cmp -s "$OUT/$doc" "docs/$doc" && rm -f "$OUT/$doc"; done
echo "=== done ($(date -u +%H:%M:%S))"
