"""benchmarks.timing: FLOPs of the lowered step, timing the compiled one, trace summaries."""

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import timing


@jax.jit
def _toy_step(state, batch, pair_pids):
  """A 'train step' shaped like ours: (state, batch, pids) -> (state, metrics, extras)."""
  out = state @ batch  # [32, 48] @ [48, 16]: 2·32·48·16 FLOPs
  return state + pair_pids, {"loss": out.sum()}, out


def test_compile_step_counts_matmul_flops_and_runs():
  state, batch, pids = jnp.ones((32, 48)), jnp.ones((48, 16)), jnp.float32(1.0)
  compiled, flops = timing.compile_step(_toy_step, state, batch, pids)
  assert 2 * 32 * 48 * 16 <= flops < 1.2 * 2 * 32 * 48 * 16  # the matmul, plus a few element-wise ops
  seconds, new_state = timing.seconds_per_step(compiled, state, batch, pids, steps=3, warmup=1)
  assert seconds > 0
  np.testing.assert_allclose(new_state, 5.0)  # 1 warm-up + 3 timed steps, each adding 1


def test_trace_top_ops_reports_the_traced_program(tmp_path):
  x = jnp.ones((256, 256))
  jax.block_until_ready(_toy_step(x, x, jnp.float32(0)))
  with jax.profiler.trace(str(tmp_path), create_perfetto_trace=True):
    jax.block_until_ready(_toy_step(x, x, jnp.float32(0)))
  summary = timing.trace_top_ops(str(tmp_path), top=50)
  host = summary["/host:CPU"]
  assert host["busy_ms"] > 0
  names = [name for name, _, _ in host["top"]]
  assert any("_toy_step" in name for name in names), names
  assert all(0 <= share <= 1 for _, _, share in host["top"])
