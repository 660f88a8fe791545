#!/usr/bin/env bash
# Fills bench/wheels/ (git-ignored, never committed) with what bench/gpu.sh installs on a GPU machine that has no
# network. Run it on a machine with registry access, then carry bench/wheels/ over with the working tree.
#
#     bash bench/fetch_wheels.sh
#
# The GPU machine has torch, transformers 5.17, accelerate, peft, pyarrow, pyyaml, tqdm and numpy; missing are
# datasets and what it imports, jsonschema (config validation) and liger-kernel. Wheels for CPython 3.12 on
# manylinux x86_64, each without its dependencies: those the GPU machine lacks are listed here one by one, so nothing
# it already has (torch, triton, numpy, pyarrow, ...) is downloaded again. At most 60 MB in all.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=bench/wheels
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
LIMIT_MB=60

packages=(
    datasets==5.0.0  # the newest whose huggingface-hub range (<2) admits the one transformers 5.17 needs (<2)
    dill==0.4.1 multiprocess==0.70.19 xxhash  # datasets: dill<0.4.2, multiprocess<0.70.20
    pandas==2.3.3 python-dateutil six pytz tzdata  # pandas 2.3 runs on numpy 1.26 and 2.x alike
    requests urllib3 idna charset-normalizer certifi  # datasets imports requests; transformers 5 does not need it
    jsonschema attrs referencing rpds-py jsonschema-specifications
    liger-kernel==0.8.5  # the HF Trainer's use_liger_kernel (best row); needs torch and triton, which it has
)
mkdir -p "$DEST"
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    --platform any -d "$DEST" "${packages[@]}"

ls -1 "$DEST"
total=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
echo "bench/wheels: $(ls "$DEST"/*.whl | wc -l) wheels, $((total / 1000000)) MB"
if ((total > LIMIT_MB * 1000000)); then
    echo "bench/wheels holds more than $LIMIT_MB MB: remove old versions (rm -r $DEST) and run again" >&2
    exit 1
fi
