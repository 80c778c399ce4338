"""The structure holds: the folders are the layers of docs/ARCHITECTURE.md and import one way, and
the inference path stands without the trainer."""

import ast
import glob
import os

import pytest

from tests import helpers

# Each folder of dgia_jax (a layer) and the folders it may import from; the programs (main.py, cli.py,
# tools/) may import any. `data_prep` imports nothing of dgia_jax.
LAYERS = {
    "training": {"method", "evaluation", "inference", "run", "common", "data", "models"},
    "method": {"evaluation", "run", "common", "data", "models"},
    "gallery": {"evaluation", "inference", "run", "common", "data", "models"},
    "evaluation": {"inference", "run", "common", "data", "models"},
    "inference": {"run", "common", "data", "models"},
    "run": {"common"},
    "data": {"common"},
    "models": {"common"},
    "common": set(),
}
PROGRAMS = ("main.py", "cli.py", "tools")
# What the inference path may never load: the loop and what only training needs.
TRAINING_PACKAGES = ("dgia_jax.training", "dgia_jax.method")


def _imports(path: str) -> set[str]:
  tree = ast.parse(open(path).read())
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module:
      names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
  return names


def _layer_of(module: str) -> str | None:
  """The folder of `dgia_jax.<folder>...`, or None for the package root and the programs."""
  parts = module.split(".")
  return parts[1] if len(parts) > 1 and parts[0] == "dgia_jax" and parts[1] in LAYERS else None


def test_every_folder_of_dgia_jax_is_a_layer_or_the_programs():
  root = os.path.join(helpers.ROOT, "dgia_jax")
  entries = {e for e in os.listdir(root) if not e.startswith(("_", "."))}
  assert entries == set(LAYERS) | set(PROGRAMS), entries ^ (set(LAYERS) | set(PROGRAMS))


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_each_layer_imports_only_the_layers_below_it(layer):
  for path in glob.glob(os.path.join(helpers.ROOT, "dgia_jax", layer, "**", "*.py"), recursive=True):
    for name in _imports(path):
      if name.split(".")[0] != "dgia_jax":
        continue
      target = _layer_of(name)
      assert target is not None and (target == layer or target in LAYERS[layer]), \
          f"{os.path.relpath(path, helpers.ROOT)} imports {name}"


def test_data_prep_never_imports_dgia_jax():
  for path in glob.glob(os.path.join(helpers.ROOT, "data_prep", "*.py")):
    bad = sorted(n for n in _imports(path) if n.split(".")[0] == "dgia_jax")
    assert not bad, f"{path} imports {bad}"
  code = ("import sys, data_prep.benchmarks, data_prep.synthetic_persons; "
          "print(any(m.startswith('dgia_jax') for m in sys.modules))")
  assert helpers.run_python(code).stdout.strip().splitlines()[-1] == "False"


@pytest.mark.parametrize("module", ["dgia_jax.gallery.exports", "dgia_jax.gallery.searcher", "dgia_jax.gallery.report",
                                    "dgia_jax.gallery.serving", "dgia_jax.evaluation.evaluators"])
@pytest.mark.slow  # starts a program per library
def test_inference_libraries_import_without_the_trainer(module):
  code = f"import sys, {module}; print(sorted({{m.split('.')[1] for m in sys.modules if m.startswith({TRAINING_PACKAGES!r})}}))"
  out = helpers.run_python(code).stdout.strip().splitlines()[-1]
  assert out == "[]", f"{module} loads {out}"


def test_configs_and_the_checkpoint_loader_load_no_program_plumbing():
  """Config files and library leaves import config_files (no flag, no jax), never the programs' cli."""
  code = ("import sys; from dgia_jax.common import config_files; "
          "config_files.load_config('configs/default.py'); import dgia_jax.models.checkpoint_io; "
          "print('dgia_jax.cli' in sys.modules)")
  assert helpers.run_python(code).stdout.strip().splitlines()[-1] == "False"


def test_inference_programs_run_without_loading_the_trainer(tiny_run, exported, tmp_path):
  """export, search, report and evaluate, each run in a fresh process, never load a training module."""
  programs = {
      "export": ["--workdir", tiny_run, "--out", str(tmp_path / "emb")],
      "search": ["--emb", exported[0], "--query", "a man in red trousers", "-k", "2"],
      "report": ["--emb", exported[0], "--out", str(tmp_path / "report"), "--num_queries", "2", "-k", "2"],
      "evaluate": ["--workdir", tiny_run, "--out", str(tmp_path / "figures.json")],
  }
  for name, args in programs.items():
    out, loaded = helpers.run_listing_training_modules(f"dgia_jax.tools.{name}", *args)
    assert "EXIT 0" in out, out[-3000:]
    assert loaded == [], f"tools.{name} loaded {loaded}"
