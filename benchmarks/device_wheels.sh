#!/usr/bin/env bash
# Fills .whl/ (git-ignored) with the wheels the device machine's image lacks, for its Python 3.12
# on manylinux x86_64, each at the version this project's .venv runs with (`make venv` first).
# The image's own jax/jaxlib (with their CUDA plugin) are used as they are. On the device:
# benchmarks/device_run.sh (docs/BENCHMARKS.md §5).
set -euo pipefail
cd "$(dirname "$0")/.."
# Our dependencies the image lacks or holds at another version, and what those need beyond it.
NAMES="array_record dm-tree docstring_parser flax googleapis-common-protos grain immutabledict importlib_resources
ml_collections optax orbax-checkpoint portpicker promise simple-parsing tensorflow-datasets tensorflow-metadata
termcolor toml"
rm -rf .whl && mkdir .whl
for name in $NAMES; do
  version=$(.venv/bin/python -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")
  if [ "$name" = promise ]; then  # published as an sdist only: built into a (pure Python) wheel here
    .venv/bin/python -m pip wheel -q --no-deps --disable-pip-version-check -w .whl "promise==$version"
  else
    .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --disable-pip-version-check \
      --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "$name==$version"
  fi
done
du -sh .whl
