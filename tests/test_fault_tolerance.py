"""Multi-process training, exact resume after SIGTERM/SIGKILL, and the non-finite guard."""

import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from dgia_jax import checkpointing, inference, optim, parallel, rundir, train
from dgia_jax import step as step_lib
from dgia_jax.data import datasets
from tests import helpers

_CONFIG_FILE = """
from tests import helpers

def get_config():
  c = helpers.tiny_config({data_dir!r})
  c.train.epochs = {epochs}
  c.checkpoint.every_steps = 1
  c.checkpoint.keep = 2
  return c
"""


def _write_config(tmp_path, data_dir, epochs):
  path = tmp_path / f"tiny_{epochs}.py"
  path.write_text(_CONFIG_FILE.format(data_dir=data_dir, epochs=epochs))
  return str(path)


def _env(devices):
  return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
          "PYTHONPATH": helpers.ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "PYTHONUNBUFFERED": "1"}


def _main(config, workdir, *extra, devices=1):
  return subprocess.Popen([sys.executable, "-m", "dgia_jax.main", "--config", config, "--workdir", workdir, *extra],
                          cwd=helpers.ROOT, env=_env(devices), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)


def _finish(proc, timeout=300):
  try:
    out, _ = proc.communicate(timeout=timeout)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.communicate()
  return proc.returncode, out


def _latest_step(workdir):
  names = os.listdir(os.path.join(workdir, "checkpoints")) if os.path.isdir(os.path.join(workdir, "checkpoints")) else []
  steps = [int(n) for n in names if n.isdigit()]
  return max(steps, default=0)


def _interrupt(config, workdir, sig, after_step):
  proc = _main(config, workdir)
  try:
    deadline = time.time() + 300
    while _latest_step(workdir) < after_step and proc.poll() is None and time.time() < deadline:
      time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be interrupted"
    proc.send_signal(sig)
  finally:
    code, out = _finish(proc)
  return code, out


def _final_state(workdir):
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), 1, None)
  try:
    return ckpt.restore_raw()
  finally:
    ckpt.close()


def _without_key_bias(path, x):
  """Drops the key third of attention `in_proj` biases (params and their Adam moments).

  The loss is invariant to the key bias (it adds q·b to every logit of a softmax row), so
  its true gradient is zero and what an optimizer does with it is float rounding noise.
  """
  if jax.tree_util.keystr(path).endswith("['in_proj']['bias']"):
    width = x.shape[0] // 3
    return np.concatenate([x[:width], x[2 * width:]])
  return x


def _assert_same_state(a, b, tol=0.0):
  (step_a, raw_a), (step_b, raw_b) = a, b
  assert step_a == step_b
  flat_a, tree_a = jax.tree_util.tree_flatten_with_path(raw_a)
  flat_b, tree_b = jax.tree_util.tree_flatten_with_path(raw_b)
  assert tree_a == tree_b
  for (path, x), (_, y) in zip(flat_a, flat_b):
    x, y = np.asarray(x), np.asarray(y)
    if tol:
      x, y = _without_key_bias(path, x), _without_key_bias(path, y)
    np.testing.assert_allclose(x, y, rtol=tol, atol=tol, err_msg=jax.tree_util.keystr(path))


def test_resume_after_sigterm_and_sigkill_equals_an_uninterrupted_run(tmp_path, data_dir):
  config = _write_config(tmp_path, data_dir, epochs=6)  # 24 steps, the global loss on from step 5
  code, out = _finish(_main(config, str(tmp_path / "reference")))
  assert code == 0, out
  reference = _final_state(str(tmp_path / "reference"))
  assert reference[0] == 24 and "bank" in reference[1]

  term = str(tmp_path / "sigterm")
  code, out = _interrupt(config, term, signal.SIGTERM, after_step=6)
  assert code == 143, out
  saved = int(out.split("SIGTERM: saved step ")[1].split()[0])
  assert 6 <= saved < 24 and _latest_step(term) == saved
  code, out = _finish(_main(config, term))
  assert code == 0 and f"resuming at step {saved}" in out, out

  kill = str(tmp_path / "sigkill")
  code, _ = _interrupt(config, kill, signal.SIGKILL, after_step=9)
  assert code == -signal.SIGKILL
  code, out = _finish(_main(config, kill))
  assert code == 0 and "resuming at step" in out, out

  for workdir in (term, kill):
    _assert_same_state(_final_state(workdir), reference)  # params, optimizer moments, banks: bit for bit
    steps = [r["step"] for r in rundir.RunDir(workdir).records("train")]
    assert steps == list(range(1, 25))  # every step logged once, none lost or repeated
    assert len([n for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit()]) <= 2  # keep=2


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_of_two_devices_equal_one_process_of_four(tmp_path, data_dir):
  config = _write_config(tmp_path, data_dir, epochs=2)  # crosses into epoch 2: the global loss is on
  reference = str(tmp_path / "one")
  code, out = _finish(_main(config, reference, devices=4))
  assert code == 0, out

  multi = str(tmp_path / "two")
  address = f"127.0.0.1:{_free_port()}"
  procs = [_main(config, multi, f"--coordinator_address={address}", "--num_processes=2", f"--process_id={i}",
                 devices=2) for i in range(2)]
  outs = []
  try:
    for proc in procs:
      outs.append(_finish(proc, timeout=400))
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  for code, out in outs:
    assert code == 0, out
  assert "4 devices × 2 processes" in outs[0][1]
  # Every process printed the same evaluation.
  finals = [next(line for line in out.splitlines() if line.startswith("final")) for _, out in outs]
  assert finals[0] == finals[1]
  # Parameters, optimizer state and banks equal the single-process run to 1e-4 (the float32
  # reduction order differs between 2×2 and 1×4 devices; seen: 9e-5 on Adam moments), except
  # the attention key biases, which the loss cannot see (see `_without_key_bias`).
  _assert_same_state(_final_state(multi), _final_state(reference), tol=1e-4)
  # ... and the two models compute the same embeddings.
  feats = []
  for workdir in (multi, reference):
    _, tokenizer, model, params, _ = inference.load_trained(workdir)
    _, splits = datasets.load(helpers.tiny_config(data_dir).data, ("test",))
    mesh = parallel.make_mesh()
    feats.append(inference.extract_features(inference.make_encoders(model, mesh), params, splits["test"], mesh, 16))
  for x, y in zip(*feats):
    np.testing.assert_allclose(x, y, atol=1e-4)


def test_non_finite_steps_are_skipped_or_stop_the_run(tmp_path, tiny_config):
  tiny_config.loss.temperature = 0.0  # cos / 0: every loss is NaN
  tiny_config.train.epochs = 1
  workdir = str(tmp_path / "skip")
  train.train_and_evaluate(tiny_config, workdir)
  records = rundir.RunDir(workdir).records("train")
  assert sum(r["skipped_steps"] for r in records) == 4
  _, raw = _final_state(workdir)
  tokenizer, _ = datasets.load(tiny_config.data, ("test",))
  tx, _ = optim.make_optimizer(tiny_config.train, 4)
  init = step_lib.init_state(inference.build_model(tiny_config, tokenizer), tx, tiny_config.seed, 64,
                          parallel.make_mesh())
  for x, y in zip(jax.tree.leaves(raw["params"]), jax.tree.leaves(init.params)):
    np.testing.assert_array_equal(x, y)  # never poisoned

  tiny_config.train.on_nonfinite = "stop"
  with pytest.raises(FloatingPointError, match=r"non-finite loss or gradients in 1 of steps 1..1"):
    train.train_and_evaluate(tiny_config, str(tmp_path / "stop"))
