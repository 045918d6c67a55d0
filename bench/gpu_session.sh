#!/usr/bin/env bash
# The GPU benchmark session in three steps (issue: GPU throughput and latency).
#
# The lent GPU machine has PyTorch, numpy, peft's and transformers' usual
# neighbours, but an older transformers and none of mistral-common,
# websockets, soundfile, soxr or webrtcvad, and it cannot reach PyPI. So:
#
#   here, with PyPI:      bench/gpu_session.sh fetch     # wheels into .whl/ (~33 MB, git-ignored)
#   there (device run, carry [".whl"], one call each, each under 10 min):
#                         bench/gpu_session.sh kernels   # encoder+prefill and decode per token
#                         bench/gpu_session.sh load COMMIT [more gpu_load.py args]
#
# Both device steps write into $OUT (the device tool's output folder) and
# print their tables; copy them into bench/RESULTS.md with the device, commit,
# date and command.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=(transformers==5.24.0 peft==0.21.2 mistral-common==1.13.1 pydantic==2.14.4
        pydantic-core==2.50.5 annotated-types typing-inspection pydantic-extra-types pycountry
        jsonschema referencing rpds-py jsonschema-specifications websockets==17.4 soundfile
        cffi pycparser soxr webrtcvad-wheels)

setup_device() {
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch, transformers; print('torch', torch.__version__, \
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
kernels)
    setup_device
    python3 bench/voxtral_kernels.py --json "${OUT:-.}/voxtral_kernels.json" 2>&1 \
        | tee "${OUT:-.}/voxtral_kernels.log"
    ;;
load)
    commit=${2:?usage: gpu_session.sh load COMMIT [gpu_load.py args]}
    shift 2
    setup_device
    python3 bench/gpu_load.py --streams 1,25,50,100,150 --reference-streams 1,5 --seconds 20 \
        --modes continuous,slots,batch,reference --max-batch 64 --commit "$commit" \
        --json "${OUT:-.}/gpu_load.json" --markdown "${OUT:-.}/gpu_load.md" \
        --plot "${OUT:-.}/gpu_load.png" "$@" 2>&1 | tee "${OUT:-.}/gpu_load.log"
    ;;
*)
    sed -n '2,15p' "$0"
    exit 2
    ;;
esac
