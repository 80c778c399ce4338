"""The structure holds: packages import one way, and the inference path stands without the trainer."""

import ast
import glob
import os
import subprocess
import sys

import pytest

from tests import helpers

# What the inference path may never load: the loop and what only training needs.
TRAINING_MODULES = ("dgia_jax.train", "dgia_jax.build", "dgia_jax.step", "dgia_jax.objective", "dgia_jax.optim",
                    "dgia_jax.hooks", "dgia_jax.evaluators")

_RUN_AND_LIST_TRAINING_MODULES = """
import runpy, sys
sys.argv = sys.argv[1:]
try:
  runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
except SystemExit as e:
  code = e.code or 0
else:
  code = 0
print("EXIT", code)
print("LOADED", sorted(m for m in {modules!r} if m in sys.modules))
"""


def run_listing_training_modules(module: str, *args: str) -> tuple[str, list[str]]:
  """Runs `python -m module args` in a fresh process; (its output, the training modules it loaded)."""
  code = _RUN_AND_LIST_TRAINING_MODULES.format(modules=TRAINING_MODULES)
  env = {**os.environ, "PYTHONPATH": helpers.ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
  proc = subprocess.run([sys.executable, "-c", code, module, *args], cwd=helpers.ROOT, env=env, capture_output=True,
                        text=True, timeout=300)
  loaded = proc.stdout.rsplit("LOADED", 1)[1].strip()
  return proc.stdout + proc.stderr, eval(loaded)  # a list literal of module names


@pytest.mark.parametrize("module", ["dgia_jax.gallery", "dgia_jax.inference", "dgia_jax.report", "dgia_jax.serving"])
def test_inference_libraries_import_without_the_trainer(module):
  code = f"import sys, {module}; print(sorted(m for m in {TRAINING_MODULES!r} if m in sys.modules))"
  out = helpers.run_python(code).stdout.strip().splitlines()[-1]
  assert out == "[]", f"{module} loads {out}"


def _imports(path: str) -> set[str]:
  tree = ast.parse(open(path).read())
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module:
      names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
  return names


def test_data_prep_never_imports_dgia_jax():
  for path in glob.glob(os.path.join(helpers.ROOT, "data_prep", "*.py")):
    bad = sorted(n for n in _imports(path) if n.split(".")[0] == "dgia_jax")
    assert not bad, f"{path} imports {bad}"
  code = "import sys, data_prep.benchmarks, data_prep.synthetic_persons; print(any(m.startswith('dgia_jax') for m in sys.modules))"
  assert helpers.run_python(code).stdout.strip().splitlines()[-1] == "False"


def test_libraries_never_import_the_programs():
  """Programs (`dgia_jax.main`, `dgia_jax.tools.*`) import libraries, never the other way round."""
  for path in glob.glob(os.path.join(helpers.ROOT, "dgia_jax", "**", "*.py"), recursive=True):
    rel = os.path.relpath(path, helpers.ROOT)
    if rel.startswith(os.path.join("dgia_jax", "tools")) or rel == os.path.join("dgia_jax", "main.py"):
      continue
    bad = sorted(n for n in _imports(path) if n == "dgia_jax.main" or n.startswith("dgia_jax.tools"))
    assert not bad, f"{rel} imports the programs {bad}"
