#!/usr/bin/env bash
# On the device machine, from the repository root (the device tool's `run`, carrying `.whl`):
# installs the wheels benchmarks/device_wheels.sh gathered, records the machine and versions,
# then runs benchmarks.accelerator with the given arguments. Its JSON line (accelerator.json),
# progress (progress.log) and the versions (machine.txt) are written under $OUT.
#   bash benchmarks/device_run.sh --batches 64 --attention cudnn
set -uo pipefail
OUT=${OUT:-device_out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,driver_version,power.limit,memory.total --format=csv,noheader 2>/dev/null
  python3 -c "import sys, jax, flax, optax, orbax.checkpoint as ocp, grain, tensorflow_datasets as tfds
print('python', sys.version.split()[0], 'jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__,
      'orbax', ocp.__version__, 'grain', grain.__version__, 'tfds', tfds.__version__, jax.devices())"
} 2>&1 | tee "$OUT/machine.txt"
python3 -m benchmarks.accelerator "$@" 2> >(tee "$OUT/progress.log" >&2) | tee "$OUT/accelerator.json"
