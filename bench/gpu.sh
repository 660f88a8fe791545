#!/usr/bin/env bash
# The whole GPU check in one command, at most 9 minutes: the gpu-marked tests (at most 2 minutes), then the throughput
# benchmark in the time left (bench/throughput.py: vectorlm compiled and eager against the HF Trainer at its best and
# by default, 1B shape, ~6.5 minutes on an H100 with compilation; a row that would not fit is skipped and said so;
# every vectorlm row shows rule estimate's traced peak beside torch.cuda.max_memory_allocated, which calibrates it).
#
#     bash bench/gpu.sh
#
# For a GPU machine without network that has torch, transformers, accelerate and peft: the other packages the
# project imports (datasets, ...) are installed from bench/wheels/, which bench/fetch_wheels.sh fills beforehand on a
# machine with registry access, and only where they do not import already. They go to bench/wheels/site (on
# PYTHONPATH), not into the machine's Python, and the repository is used in place, not installed. With $OUT set (the
# device runner's output folder), the log and the benchmark's results file are copied there.
set -uo pipefail
cd "$(dirname "$0")/.."
TOTAL_SECONDS=540
PYTHON=${PYTHON:-python3}
SITE=bench/wheels/site
export PYTHONPATH="$PWD:$PWD/$SITE${PYTHONPATH:+:$PYTHONPATH}"
if [ -n "${OUT:-}" ]; then
    exec > >(tee -a "$OUT/gpu.log") 2>&1
fi

# Module and distribution of everything the tests and the benchmark import beyond what the machine has.
needed=(
    datasets:datasets dill:dill multiprocess:multiprocess xxhash:xxhash
    pandas:pandas dateutil:python-dateutil six:six pytz:pytz tzdata:tzdata
    requests:requests urllib3:urllib3 idna:idna charset_normalizer:charset-normalizer certifi:certifi
    jsonschema:jsonschema attrs:attrs referencing:referencing rpds:rpds-py
    jsonschema_specifications:jsonschema-specifications liger_kernel:liger-kernel
)
missing=$("$PYTHON" - "${needed[@]}" <<'PY'
import importlib.util, sys
print(" ".join(pair.split(":")[1] for pair in sys.argv[1:] if importlib.util.find_spec(pair.split(":")[0]) is None))
PY
)
if [ -n "$missing" ]; then
    echo "== installing from bench/wheels: $missing"
    if ! ls bench/wheels/*.whl >/dev/null 2>&1; then
        echo "bench/wheels/ is empty: run bash bench/fetch_wheels.sh on a machine with network first" >&2
        exit 1
    fi
    # Without dependencies: they are in the list above, and pip must not replace torch, numpy or pyarrow.
    # shellcheck disable=SC2086
    "$PYTHON" -m pip install --quiet --no-index --find-links bench/wheels --no-deps --upgrade --target "$SITE" \
        $missing || exit 1
fi

echo "== versions"
"$PYTHON" - <<'PY'
import platform
from importlib.metadata import PackageNotFoundError, version
import torch
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda})")
for name in ("transformers", "accelerate", "peft", "datasets", "pyarrow", "numpy", "liger-kernel", "flash-attn"):
    try:
        print(f"{name} {version(name)}")
    except PackageNotFoundError:
        print(f"{name}: not installed")
if torch.cuda.is_available():
    print(f"GPU: {torch.cuda.get_device_name(0)} x {torch.cuda.device_count()}")
else:
    print("GPU: none visible to torch")
PY

echo "== gpu-marked tests"
timeout 120 "$PYTHON" -m pytest -q -p no:cacheprovider -m gpu tests
tests_status=$?
if [ "$tests_status" -eq 5 ]; then
    echo "(no gpu-marked tests were collected)"
    tests_status=0
fi

# What is left, less the time to end the benchmark's last worker and write the results.
budget=$((TOTAL_SECONDS - SECONDS - 15))
budget=$((budget > 480 ? 480 : budget))
echo "== throughput benchmark (budget ${budget} s)"
stamp=$(mktemp)
timeout $((budget + 15)) "$PYTHON" bench/throughput.py --budget "$budget"
bench_status=$?
results=$(find bench/results -name '*-throughput-*.md' -newer "$stamp" | head -1)
rm -f "$stamp"
if [ -n "${OUT:-}" ] && [ -n "$results" ]; then
    cp "$results" "$OUT/"
fi
echo "== done in ${SECONDS} s: tests exit ${tests_status}, benchmark exit ${bench_status}"
echo "results: ${results:-none written}"
exit $((tests_status || bench_status))
