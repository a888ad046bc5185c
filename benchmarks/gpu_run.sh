#!/usr/bin/env bash
# One-shot run of benchmarks/gpu_suite.py on a lent H100/H200 (the device tool), from the repository root.
#
# 1. Here (where PyPI is reachable), once: fetch the wheels the GPU image lacks into .whl/ (git-ignored, ~55 MB;
#    never commit them):
#        bash benchmarks/gpu_run.sh --fetch-wheels
#    The image has torch, transformers, accelerate, pyarrow, PyYAML, Pillow, fsspec, safetensors, peft and
#    huggingface_hub, but not diffusers, pydantic or pylance (/work/.library/device/KINDS.md). pylance 0.36 is
#    the newest wheel small enough to travel beside diffusers inside the 64 MiB carry limit (14.x is 85 MB); the
#    suite patches in the one attribute it lacks. lancedb is not carried: the generation rows then append to
#    Lance datasets instead of LanceDB's merge_insert and say so in their note.
# 2. On the device, in one call:
#        run(command="bash benchmarks/gpu_run.sh", carry=[".whl"], timeout_s=590)
#    Extra arguments go to the suite (e.g. --quick). Output: $OUT/gpu_suite.json, $OUT/gpu_suite.log and
#    $OUT/nvidia-smi.txt; copy the printed table into benchmarks/RESULTS.md with the date and the device.
#    The family rows alone (an SDXL and a FLUX.1 reflow step at real width, each beside the memory formula of
#    training/memory.py; ~2 minutes with the builds): bash benchmarks/gpu_run.sh --sections family
set -o pipefail
cd "$(dirname "$0")/.." || exit 1
WHEELS=(diffusers==0.42.1 pydantic==2.14.4 pydantic_core==2.50.5 annotated_types==0.8.0 typing_inspection==0.4.5
        importlib_metadata==9.1.0 zipp==4.1.2 pylance==0.36.0)
if [ "${1:-}" = "--fetch-wheels" ]; then
    exec python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "${WHEELS[@]}"
fi
OUT="${OUT:-benchmarks/out}"
mkdir -p "$OUT"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site:${PYTHONPATH}"
fi
export PYTHONPATH="${PWD}:${PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1 | tee "$OUT/nvidia-smi.txt"
python3 -c "import torch, diffusers, lance, pydantic; print('torch', torch.__version__, 'diffusers',
diffusers.__version__, 'lance', lance.__version__, 'cuda', torch.cuda.is_available())" || exit 1
# the suite keeps to its --time-budget (440 s); the timeout is a last resort that still leaves the log
timeout 560 python3 benchmarks/gpu_suite.py -v --print-profiles --out "$OUT/gpu_suite.json" "$@" 2>&1 \
    | grep -v "kept in float32" | tee "$OUT/gpu_suite.log"
