#!/usr/bin/env bash
# The GPU benchmark session (issue: GPU throughput and latency).
#
# The lent GPU machine has PyTorch, numpy, peft's and transformers' usual
# neighbours, but an older transformers and none of mistral-common,
# websockets, soundfile, soxr or webrtcvad, and it cannot reach PyPI. A task
# gets 15 minutes of device time in all, the machine's start included, and
# one command may run 10 minutes. So, in one device call:
#
#   here, with PyPI:      bench/gpu_session.sh fetch        # wheels into .whl/ (~34 MB, git-ignored)
#   there (device run, carry [".whl"], timeout_s 600):
#                         bench/gpu_session.sh all COMMIT   # load, then kernels; about 9 minutes
#
#   then, if the session has about 3 minutes of device time left, a second call
#   (carry [".whl"], timeout_s 200):
#                         bench/gpu_session.sh tests        # tests/engine/backends/test_gpu.py
#
#   a later session:      bench/gpu_session.sh levers COMMIT  # the load with the prefill levers on
#
# `all` runs gpu_load.py in the lookahead, slots and reference modes (1, 100
# and 150 streams; the reference at 1 and 5; the slot steps are compiled
# once first) and profiles the busiest level, then, in the last KERNELS_S
# seconds, voxtral_kernels.py's merged path at batches 8 and 64 with the
# merged prefill broken down part by part under the profiler (batches 1 and
# 8; with the encoder replayed as CUDA graphs, with its layers compiled and,
# at batch 1, with the prompt prefill replayed too: the levers
# model.voxtral.encoder_graphs, encoder_compile and prefill_graphs; written
# after each batch). The first run (2026-12-04, H200) measured every path at batch 1 and
# the continuous mode under load, the second the prefill's breakdown; it
# also found that compiling the slot step per bucket does not fit here
# (now one shared compile) and why the slot modes failed in the engine
# (fixed); bench/RESULTS.md has them. Each script
# writes its JSON after every row, so a cut-short run still brings back
# what it measured; $OUT gets 8 files. `kernels` and `load
# COMMIT` run one script each with its full default plan (each about 10
# minutes), for a later session with time for two calls.
#
# Every step writes into $OUT (the device tool's output folder) and prints
# its tables; copy them into bench/RESULTS.md with the device, commit, date
# and command.
set -euo pipefail
cd "$(dirname "$0")/.."

# `all` plans its steps to end this many seconds after it starts, and keeps
# the last KERNELS_S of them for the kernel rows.
ALL_DEADLINE_S=${ALL_DEADLINE_S:-550}
KERNELS_S=${KERNELS_S:-110}

WHEELS=(transformers==5.24.0 peft==0.21.2 mistral-common==1.13.1 pydantic==2.14.4
        pydantic-core==2.50.5 annotated-types typing-inspection pydantic-extra-types pycountry
        jsonschema referencing rpds-py jsonschema-specifications websockets==17.4 soundfile
        cffi pycparser soxr webrtcvad-wheels typing-extensions==4.16.0)
# The image has pytest (with pytest-timeout), tiktoken and hypothesis itself.

# PYTHON, KERNELS_ARGS and NO_WHEELS=1 let the test suite run `all` on the
# CPU with --tiny; a device session needs none of them.
PY=${PYTHON:-python3}

setup_device() {
    if [ "${NO_WHEELS:-0}" != 1 ]; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl
        export PYTHONPATH=/tmp/site:src
    fi
    export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    fi
    "$PY" -c "import torch, transformers; print('torch', torch.__version__, \
'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
}

case "${1:-}" in
fetch)
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"
    du -sh .whl
    ;;
all)
    commit=${2:?usage: gpu_session.sh all COMMIT [gpu_load.py args]}
    shift 2
    setup_device
    out=${OUT:-.}
    # The load levels first: the slot cache with and without lookahead (its
    # step compiles once, before the first level) and the reference beside
    # them. The scripts stop starting measurements at their own budgets; the
    # outer timeouts guard against a hang (in the second run a per-bucket
    # compile took all of the load's time), and one that fires still leaves
    # the kernel rows their time.
    left=$((ALL_DEADLINE_S - SECONDS))
    main=$((left - KERNELS_S))
    if [ "$main" -lt 60 ]; then main=60; fi
    echo "gpu_session: ${SECONDS} s used, ${main} s for the load levels"
    timeout -k 10 "$((main + 30))" "$PY" bench/gpu_load.py --streams 1,100,150 \
        --reference-streams 1,5 --seconds 20 --modes lookahead,slots,reference --max-batch 64 \
        --budget-s "$main" --commit "$commit" --json "$out/gpu_load.json" \
        --markdown "$out/gpu_load.md" --plot "$out/gpu_load.png" \
        --profile "$out/gpu_load_profile.txt" "$@" 2>&1 \
        | tee "$out/gpu_load.log" || echo "gpu_session: the load levels ended with status $?"
    # Then, in whatever time is left, what the merged prefill's time goes to
    # and the merged path at larger batches (batch 1 of every path was
    # measured on 2026-12-04; the slot paths would compile again here).
    left=$((ALL_DEADLINE_S - SECONDS))
    if [ "$left" -lt 60 ]; then
        echo "gpu_session: ${left} s left: no kernel rows"
        exit 0
    fi
    echo "gpu_session: ${SECONDS} s used, ${left} s for the kernel rows"
    # shellcheck disable=SC2086  # KERNELS_ARGS is a list of words
    timeout -k 10 "$((left + 30))" "$PY" bench/voxtral_kernels.py --batches 8,64 --paths merged \
        --profile "$out/prefill_profile.md" --profile-batches 1,8 --budget-s "$((left - 20))" \
        --json "$out/voxtral_kernels.json" ${KERNELS_ARGS:-} 2>&1 \
        | tee "$out/voxtral_kernels.log" || true
    ;;
levers)
    # The load levels again with the prefill levers on (encoder graphs,
    # compiled encoder layers, prefill graphs; LEVERS overrides the list):
    # for a session after one whose `all` profiled them, beside the same
    # reference. About 9 minutes.
    commit=${2:?usage: gpu_session.sh levers COMMIT [gpu_load.py args]}
    shift 2
    setup_device
    out=${OUT:-.}
    sets=()
    for lever in ${LEVERS:-encoder_graphs encoder_compile prefill_graphs}; do
        sets+=(--set "model.voxtral.$lever=true")
    done
    timeout -k 10 "$((ALL_DEADLINE_S + 30))" "$PY" bench/gpu_load.py --streams 1,100,150 \
        --reference-streams 1,5 --seconds 20 --modes lookahead,reference --max-batch 64 \
        --budget-s "$ALL_DEADLINE_S" --commit "$commit" "${sets[@]}" \
        --json "$out/gpu_load_levers.json" --markdown "$out/gpu_load_levers.md" \
        --plot "$out/gpu_load_levers.png" --profile "$out/gpu_load_levers_profile.txt" "$@" \
        2>&1 | tee "$out/gpu_load_levers.log"
    ;;
tests)
    # The GPU tests on the tiny checkpoint: the slot steps, the encoder and
    # the prompt prefill as CUDA graphs, replayed from threads other than
    # the one that compiled them, against the eager paths. No GPU has run
    # them yet. -v, so that a run cut short still says which passed.
    shift
    setup_device
    out=${OUT:-.}
    timeout -k 10 "${TESTS_S:-180}" "$PY" -m pytest tests/engine/backends/test_gpu.py -v \
        -p no:cacheprovider -rfEs --junitxml "$out/gpu_tests.xml" "$@" 2>&1 \
        | tee "$out/gpu_tests.log" || echo "gpu_session: the GPU tests ended with status $?"
    ;;
kernels)
    setup_device
    "$PY" bench/voxtral_kernels.py --json "${OUT:-.}/voxtral_kernels.json" 2>&1 \
        | tee "${OUT:-.}/voxtral_kernels.log"
    ;;
load)
    commit=${2:?usage: gpu_session.sh load COMMIT [gpu_load.py args]}
    shift 2
    setup_device
    "$PY" bench/gpu_load.py --streams 1,25,50,100,150 --reference-streams 1,5 --seconds 20 \
        --modes continuous,slots,lookahead,batch,reference --max-batch 64 --commit "$commit" \
        --json "${OUT:-.}/gpu_load.json" --markdown "${OUT:-.}/gpu_load.md" \
        --plot "${OUT:-.}/gpu_load.png" "$@" 2>&1 | tee "${OUT:-.}/gpu_load.log"
    ;;
*)
    sed -n '2,/^set -euo pipefail/{/^set -euo/!p}' "$0"
    exit 2
    ;;
esac
