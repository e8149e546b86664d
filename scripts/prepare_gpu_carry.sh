#!/usr/bin/env bash
# Build, on this CPU machine, the two ignored folders a GPU call carries (scripts/gpu_session.sh; a fresh checkout
# has neither): `run` with carry [".whl", ".device_corpus"]. The testbed's finished runs travel as a tracked file,
# docs/records/testbed_pinned_runs.tar.xz, which a fresh GPU machine starts from (scripts/land_device_results.py
# writes it).
#   .whl            the wheels the GPU machine lacks (it has Python 3.12, torch and triton, and no network):
#                   DeepSpeed 0.19.8 built from its sdist, and pure or 3.12 binary wheels of what it and
#                   megatron-core 0.16.1 (tests/gpu/test_megatron_cuda.py) need
#   .device_corpus  the pinned corpus (python-code-pinned, 19.9M tokens, BPE of 16,384), its .idx and tokenizer and
#                   the .bin as xz, checked against docs/records/corpus_python_code_pinned.sha256: runs on two
#                   corpora are not comparable
# Each part is skipped when already there. About 3 minutes on a 2-core machine; 64 MiB is the carry limit.
#
#   bash scripts/prepare_gpu_carry.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}

if ! ls .whl/deepspeed-*.whl >/dev/null 2>&1; then
    mkdir -p .whl
    "$PYTHON" -m pip wheel -q --no-deps deepspeed==0.19.8 -w .whl
    "$PYTHON" -m pip download -q --python-version 3.12 --only-binary=:all: --no-deps -d .whl \
        hjson pydantic pydantic-core annotated-types typing-inspection megatron-core==0.16.1
fi

if [ ! -f .device_corpus/python_code_pinned.bin.xz ]; then
    [ -f .device_data/python_code_pinned.bin ] || "$PYTHON" scripts/preprocess_data.py --input python-code-pinned \
        --max_tokens 25e6 --vocab_size 16384 --output_prefix .device_data/python_code_pinned
    (cd .device_data && sha256sum --quiet -c ../docs/records/corpus_python_code_pinned.sha256) \
        || { echo "the corpus in .device_data is not the pinned one (docs/records/corpus_python_code_pinned.sha256)"
             exit 1; }
    mkdir -p .device_corpus
    cp .device_data/python_code_pinned.idx .device_data/python_code_pinned.tokenizer.json .device_corpus/
    xz -3 -T2 -c .device_data/python_code_pinned.bin > .device_corpus/python_code_pinned.bin.xz.part
    mv .device_corpus/python_code_pinned.bin.xz.part .device_corpus/python_code_pinned.bin.xz
fi

du -sh .whl .device_corpus
