import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dgia_jax.models import clip, presets


def _model(preset, image_size=(32, 16), vocab=100, ctx=16, eot=3):
  return clip.CLIP(clip.config_from_dict(preset, image_size, vocab, eot, ctx))


@pytest.fixture(scope="module")
def small():
  p = presets.small()
  p.vision.update(dict(width=32, layers=2, heads=2))
  p.text.update(dict(width=32, layers=2, heads=2))
  p.embed_dim = 24
  model = _model(p)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 16, 3)), jnp.zeros((1, 16), jnp.int32))["params"]
  return model, params


def test_vit_b16_has_openai_clip_shapes():
  model = _model(presets.vit_b16(), image_size=(224, 224), vocab=49408, ctx=77, eot=49407)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)),
                          jnp.zeros((1, 77), jnp.int32))["params"]
  # OpenAI CLIP ViT-B/16 has 149,620,737 parameters including the learnable logit scale,
  # which this project fixes (tau = 0.02).
  assert clip.count_params(shapes) == 149_620_736
  assert shapes["visual"]["conv1"]["kernel"].shape == (16, 16, 3, 768)
  assert shapes["visual"]["positional_embedding"].shape == (197, 768)
  assert shapes["visual"]["proj"].shape == (768, 512)
  assert shapes["text"]["token_embedding"]["embedding"].shape == (49408, 512)
  assert shapes["text"]["positional_embedding"].shape == (77, 512)
  assert shapes["text"]["text_projection"].shape == (512, 512)
  block = shapes["visual"]["transformer"]["resblocks_11"]
  assert block["in_proj"]["kernel"].shape == (768, 2304) and block["c_fc"]["kernel"].shape == (768, 3072)


def test_pedestrian_input_size_sets_the_position_grid():
  model = _model(presets.vit_b16(), image_size=(384, 128), vocab=49408, ctx=77, eot=49407)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 384, 128, 3)),
                          jnp.zeros((1, 77), jnp.int32))["params"]
  assert shapes["visual"]["positional_embedding"].shape == (24 * 8 + 1, 768)


@pytest.mark.slow  # compiles both towers
def test_outputs_are_l2_normalised(small):
  model, params = small
  rng = np.random.default_rng(0)
  img, txt = jax.jit(model.apply)({"params": params}, jnp.asarray(rng.normal(size=(3, 32, 16, 3)), jnp.float32),
                         jnp.asarray(rng.integers(4, 100, size=(3, 16)), jnp.int32))
  assert img.shape == (3, 24) and txt.shape == (3, 24)
  np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1.0, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(txt, axis=1), 1.0, atol=1e-5)


@pytest.mark.slow  # compiles both towers
def test_text_feature_is_read_at_end_of_text_and_is_causal(small):
  model, params = small
  enc = jax.jit(lambda t: model.apply({"params": params}, jnp.asarray(t, jnp.int32), method=clip.CLIP.encode_text))
  base = np.array([[1, 10, 11, 12, 3] + [0] * 11])
  after = base.copy()
  after[0, 6:9] = [50, 51, 52]  # tokens after EOT must not matter (causal attention)
  before = base.copy()
  before[0, 2] = 60
  np.testing.assert_allclose(enc(base), enc(after), atol=1e-6)
  assert np.abs(enc(base) - enc(before)).max() > 1e-3


@pytest.mark.slow  # compiles a tower per variant
@pytest.mark.parametrize("causal", [False, True])
def test_block_computing_one_row_per_sequence_matches_the_full_block(causal):
  block = clip.ResidualAttentionBlock(16, 2, 2, causal, "quick_gelu", jnp.float32)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(4, 7, 16)), jnp.float32)
  index = jnp.asarray([0, 6, 3, 5], jnp.int32)
  params = jax.jit(block.init)(jax.random.key(0), x)["params"]
  full = lambda p: block.apply({"params": p}, x)[jnp.arange(4), index]  # noqa: E731
  rows = lambda p: block.apply({"params": p}, x, index)  # noqa: E731
  np.testing.assert_allclose(jax.jit(rows)(params), jax.jit(full)(params), atol=1e-5)
  weights = jnp.asarray(rng.normal(size=(4, 16)), jnp.float32)
  grads = [jax.jit(jax.grad(lambda p, f=f: jnp.sum(f(p) * weights)))(params) for f in (full, rows)]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), *grads)


@pytest.mark.slow  # compiles a tower per variant
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("length", [7, 8])
def test_padded_attention_matches_unpadded_attention(causal, length):
  """The padding cuDNN's kernel is given (`padded_attention`) changes no value or gradient; here
  through XLA's implementation, which takes the same padding lengths."""
  rng = np.random.default_rng(1)
  q, k, v = (jnp.asarray(rng.normal(size=(3, length, 2, 8)), jnp.float32) for _ in range(3))
  weights = jnp.asarray(rng.normal(size=(3, length, 2, 8)), jnp.float32)
  plain = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal)  # noqa: E731
  padded = lambda q, k, v: clip.padded_attention(q, k, v, causal, None)  # noqa: E731
  np.testing.assert_allclose(jax.jit(padded)(q, k, v), jax.jit(plain)(q, k, v), atol=1e-6)
  grads = [jax.jit(jax.grad(lambda *a, f=f: jnp.sum(f(*a) * weights), argnums=(0, 1, 2)))(q, k, v)
           for f in (plain, padded)]
  for a, b in zip(*grads):
    np.testing.assert_allclose(b, a, atol=1e-5)


@pytest.mark.slow  # compiles a tower per variant
def test_cudnn_attention_off_a_gpu_gives_the_xla_features():
  """A model configured for cuDNN attention (trained on a GPU) evaluates on a CPU with XLA's
  attention: same parameters, same features."""
  p = presets.small()
  p.dtype = "bfloat16"
  images, tokens = jnp.ones((2, 32, 16, 3)), jnp.asarray([[1, 5, 3] + [0] * 13] * 2, jnp.int32)
  xla = _model(p)
  p.attention = "cudnn"
  cudnn = _model(p)
  assert cudnn.cfg.attention == "cudnn" and jax.default_backend() != "gpu"
  params = jax.jit(xla.init)(jax.random.key(0), images, tokens)
  for a, b in zip(jax.jit(xla.apply)(params, images, tokens), jax.jit(cudnn.apply)(params, images, tokens)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow  # compiles both towers
def test_bfloat16_compute_keeps_float32_params():
  p = presets.small()
  p.dtype = "bfloat16"
  model = _model(p)
  variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 16, 3)), jnp.zeros((1, 16), jnp.int32))
  assert {x.dtype for x in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  img, _ = jax.jit(model.apply)(variables, jnp.zeros((2, 32, 16, 3)), jnp.ones((2, 16), jnp.int32))
  assert img.dtype == jnp.float32 and np.isfinite(np.asarray(img)).all()


def test_invalid_shapes_are_refused():
  p = presets.small()
  with pytest.raises(ValueError, match="not a multiple of patch size"):
    clip.config_from_dict(p, (30, 16), 100, 3, 16)
  p.text.heads = 3
  with pytest.raises(ValueError, match="model.text.width=128 is not divisible by heads=3"):
    clip.config_from_dict(p, (32, 16), 100, 3, 16)
  p.vision.layers = 0
  with pytest.raises(ValueError, match="model.vision.layers=0: a tower needs at least one block"):
    clip.config_from_dict(p, (32, 16), 100, 3, 16)


def test_attention_option_is_checked():
  p = presets.small()
  p.attention = "flash"
  with pytest.raises(ValueError, match=r"model.attention='flash': expected one of \('xla', 'cudnn'\)"):
    clip.config_from_dict(p, (32, 16), 100, 3, 16)
  p.attention = "cudnn"
  with pytest.raises(ValueError, match="needs a 16-bit model.dtype"):
    clip.config_from_dict(p, (32, 16), 100, 3, 16)
  del p.attention  # a config saved before the option: XLA's attention
  assert clip.config_from_dict(p, (32, 16), 100, 3, 16).attention == "xla"
