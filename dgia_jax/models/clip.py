"""CLIP two-tower in Flax linen: a ViT image tower and a causal text transformer.

Shapes and parameter layout follow OpenAI CLIP (pre-LayerNorm residual blocks, fused
`in_proj` attention, QuickGELU, class-token image feature, end-of-text-token text feature,
bias-free projections to the shared embedding), so pretrained checkpoints map 1:1.
Both encoders return L2-normalised features [B, D].

Compute dtype is configurable (`float32` or `bfloat16`); parameters are always float32
and LayerNorm runs in float32.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from dgia_jax.common import errors

# OpenAI CLIP's image normalisation (RGB).
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  image_size: tuple[int, int]  # height, width
  patch_size: int
  width: int
  layers: int
  heads: int

  @property
  def grid(self) -> tuple[int, int]:
    return self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size


@dataclasses.dataclass(frozen=True)
class TextConfig:
  vocab_size: int
  context_length: int
  width: int
  layers: int
  heads: int
  eot_token_id: int


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  embed_dim: int
  vision: VisionConfig
  text: TextConfig
  activation: str = "quick_gelu"  # OpenAI CLIP; "gelu" for other families
  dtype: str = "float32"  # compute dtype of activations
  # Rematerialise each residual block (`nn.remat`, jax.checkpoint's default policy: nothing inside a
  # block is saved; only its input is kept, and the block's forward runs again in the backward pass).
  # It saves activation memory where the compiler schedules for memory (GPUs; XLA CPU only with
  # --xla_cpu_enable_concurrency_optimized_scheduler=false, docs/BENCHMARKS.md §6).
  remat: bool = False
  attention: str = "xla"  # "xla", or "cudnn": cuDNN's fused kernel on GPUs (see `attention`)


def quick_gelu(x: jax.Array) -> jax.Array:
  return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": lambda x: jax.nn.gelu(x, approximate=False)}
ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn")


def padded_attention(q: jax.Array, k: jax.Array, v: jax.Array, causal: bool, implementation: str | None,
                     multiple: int = 8) -> jax.Array:
  """Attention over a sequence padded to a multiple of `multiple`, the padding masked by length.

  q, k, v [B, T, heads, d] -> [B, T, heads, d], the same values as unpadded attention. cuDNN's
  fused training kernels take an odd length only without a bias (the image tower has 193
  tokens, the text tower 77); lengths are a padding mask, not a bias.
  """
  b, t = q.shape[:2]
  widths = ((0, 0), (0, -t % multiple), (0, 0), (0, 0))
  lengths = jnp.full((b,), t, jnp.int32)
  out = jax.nn.dot_product_attention(*(jnp.pad(a, widths) for a in (q, k, v)), is_causal=causal,
                                     query_seq_lengths=lengths, key_value_seq_lengths=lengths,
                                     implementation=implementation)
  return out[:, :t]


def attention(q: jax.Array, k: jax.Array, v: jax.Array, causal: bool, implementation: str) -> jax.Array:
  """Multi-head attention, q, k, v [B, T, heads, d] -> [B, T, heads, d].

  "xla": XLA's unfused attention (logits materialised). "cudnn": cuDNN's fused (flash) kernel
  when running on a GPU, which needs a 16-bit compute dtype; elsewhere (a GPU-trained model
  evaluated on a CPU) XLA's, on the same parameters.
  """
  if implementation == "cudnn" and jax.default_backend() == "gpu":
    return padded_attention(q, k, v, causal, "cudnn")
  return jax.nn.dot_product_attention(q, k, v, is_causal=causal)


class LayerNorm(nn.Module):
  """LayerNorm computed in float32 whatever the input dtype (as OpenAI CLIP does)."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32, param_dtype=jnp.float32)(x.astype(jnp.float32))
    return y.astype(x.dtype)


class ResidualAttentionBlock(nn.Module):
  """x + attn(ln_1(x)); x + mlp(ln_2(x)). Input [B, T, W]; output [B, T, W], or [B, W] when
  `query_index` [B] asks for one position per sequence (see `Transformer`)."""

  width: int
  heads: int
  layers: int  # depth of the stack, for the init scale
  causal: bool
  activation: str
  dtype: jnp.dtype
  attention: str = "xla"

  @nn.compact
  def __call__(self, x: jax.Array, query_index: jax.Array | None = None) -> jax.Array:
    b, t, w = x.shape
    attn_std = self.width ** -0.5
    proj_std = attn_std * (2 * self.layers) ** -0.5
    fc_std = (2 * self.width) ** -0.5
    dense = lambda feats, std, name: nn.Dense(  # noqa: E731
        feats, dtype=self.dtype, kernel_init=nn.initializers.normal(std), name=name)

    # Dense layers see tokens flattened into rows [B·T, W]: on XLA CPU the weight gradient of a
    # 2-D matmul is ~1.5x faster than one contracting batch and token axes (docs/BENCHMARKS.md §1).
    x = x.reshape(b * t, w)
    h = LayerNorm(name="ln_1")(x)
    # in_proj's outputs are [q | k | v]; splitting them (not slicing a [.., 3, heads, d] view)
    # keeps each a contiguous block, which XLA CPU differentiates ~1.4x faster.
    q, k, v = (a.reshape(b, t, self.heads, w // self.heads)
               for a in jnp.split(dense(3 * w, attn_std, "in_proj")(h), 3, axis=-1))
    if query_index is None:
      h = attention(q, k, v, self.causal, self.attention).reshape(b * t, w)
    else:  # one query row per sequence: attention, residual and MLP for that row only (XLA's: tiny)
      rows = jnp.arange(b)
      mask = (jnp.arange(t) <= query_index[:, None])[:, None, None, :] if self.causal else None  # [B, 1, 1, T]
      h = jax.nn.dot_product_attention(q[rows, query_index][:, None], k, v, mask=mask).reshape(b, w)
      x = x.reshape(b, t, w)[rows, query_index]
    x = x + dense(w, proj_std, "out_proj")(h)

    h = LayerNorm(name="ln_2")(x)
    h = dense(4 * w, fc_std, "c_fc")(h)
    h = ACTIVATIONS[self.activation](h)
    x = x + dense(w, proj_std, "c_proj")(h)
    return x if query_index is not None else x.reshape(b, t, w)


class Transformer(nn.Module):
  """Tokens [B, T, W] -> the output at position `query_index[b]` of each sequence [B, W].

  Only that position is read downstream (the class token, the end-of-text token), so the last
  block computes attention, residual and MLP for it alone: the same features and gradients as
  running the block on every token, for ~3/4 less of that block's work.
  """

  width: int
  layers: int
  heads: int
  causal: bool
  activation: str
  dtype: jnp.dtype
  remat: bool
  attention: str

  @nn.compact
  def __call__(self, x: jax.Array, query_index: jax.Array) -> jax.Array:
    block = nn.remat(ResidualAttentionBlock) if self.remat else ResidualAttentionBlock
    for i in range(self.layers):
      x = block(self.width, self.heads, self.layers, self.causal, self.activation, self.dtype, self.attention,
                name=f"resblocks_{i}")(x, query_index if i == self.layers - 1 else None)
    return x


class VisionTransformer(nn.Module):
  """Images [B, H, W, 3] (normalised) -> class-token features [B, D] (not normalised)."""

  cfg: VisionConfig
  output_dim: int
  activation: str
  dtype: jnp.dtype
  remat: bool
  attention: str

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    c = self.cfg
    scale = c.width ** -0.5
    x = nn.Conv(c.width, (c.patch_size, c.patch_size), strides=c.patch_size, use_bias=False,
                padding="VALID", dtype=self.dtype, name="conv1")(images.astype(self.dtype))
    b = x.shape[0]
    x = x.reshape(b, -1, c.width)
    cls = self.param("class_embedding", nn.initializers.normal(scale), (c.width,))
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, c.width)), x], axis=1)
    gh, gw = c.grid
    pos = self.param("positional_embedding", nn.initializers.normal(scale), (gh * gw + 1, c.width))
    x = x + pos.astype(self.dtype)
    x = LayerNorm(name="ln_pre")(x)
    x = Transformer(c.width, c.layers, c.heads, False, self.activation, self.dtype, self.remat, self.attention,
                    name="transformer")(x, jnp.zeros((b,), jnp.int32))  # the class token
    x = LayerNorm(name="ln_post")(x)
    proj = self.param("proj", nn.initializers.normal(scale), (c.width, self.output_dim))
    return jnp.dot(x, proj.astype(self.dtype))


class TextTransformer(nn.Module):
  """Tokens int32 [B, L] -> end-of-text-token features [B, D] (not normalised)."""

  cfg: TextConfig
  output_dim: int
  activation: str
  dtype: jnp.dtype
  remat: bool
  attention: str

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    c = self.cfg
    x = nn.Embed(c.vocab_size, c.width, embedding_init=nn.initializers.normal(0.02),
                 name="token_embedding")(tokens).astype(self.dtype)
    pos = self.param("positional_embedding", nn.initializers.normal(0.01), (c.context_length, c.width))
    x = x + pos[: tokens.shape[1]].astype(self.dtype)
    eot = jnp.argmax(tokens == c.eot_token_id, axis=-1)  # first end-of-text position
    x = Transformer(c.width, c.layers, c.heads, True, self.activation, self.dtype, self.remat, self.attention,
                    name="transformer")(x, eot)
    x = LayerNorm(name="ln_final")(x)
    proj = self.param("text_projection", nn.initializers.normal(c.width ** -0.5), (c.width, self.output_dim))
    return jnp.dot(x, proj.astype(self.dtype))


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """Row-wise L2 normalisation in float32: [B, D] -> [B, D]."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def normalize_images(images: jax.Array) -> jax.Array:
  """uint8 [B, H, W, 3] -> float32 CLIP-normalised [B, H, W, 3]."""
  return (images.astype(jnp.float32) / 255.0 - CLIP_MEAN) / CLIP_STD


class CLIP(nn.Module):
  """The two towers. `encode_image`/`encode_text` return L2-normalised float32 [B, D]."""

  cfg: CLIPConfig

  def setup(self):
    c, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
    self.visual = VisionTransformer(c.vision, c.embed_dim, c.activation, dtype, c.remat, c.attention)
    self.text = TextTransformer(c.text, c.embed_dim, c.activation, dtype, c.remat, c.attention)

  def encode_image(self, images: jax.Array) -> jax.Array:
    """Normalised float images [B, H, W, 3] -> [B, D]."""
    return l2_normalize(self.visual(images))

  def encode_text(self, tokens: jax.Array) -> jax.Array:
    """Tokens int32 [B, L] -> [B, D]."""
    return l2_normalize(self.text(tokens))

  def __call__(self, images: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    return self.encode_image(images), self.encode_text(tokens)

  def raw_features(self, images: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Image and text features before L2 normalisation, float32 [B, D] each."""
    return self.visual(images).astype(jnp.float32), self.text(tokens).astype(jnp.float32)


def config_from_dict(model_cfg, image_size: tuple[int, int], vocab_size: int, eot_token_id: int,
                     context_length: int) -> CLIPConfig:
  """Builds a `CLIPConfig` from the `config.model` ConfigDict, the input size and the tokenizer's facts."""
  v, t = model_cfg.vision, model_cfg.text
  h, w = image_size
  if h % v.patch_size or w % v.patch_size:
    raise errors.ConfigError(f"image size {h}x{w} is not a multiple of patch size {v.patch_size}")
  for name, tower in (("vision", v), ("text", t)):
    if tower.layers < 1:
      raise errors.ConfigError(f"model.{name}.layers={tower.layers}: a tower needs at least one block")
    if tower.width % tower.heads:
      raise errors.ConfigError(f"model.{name}.width={tower.width} is not divisible by heads={tower.heads}")
  attention = model_cfg.get("attention", "xla")  # configs saved before the option read as "xla"
  if attention not in ATTENTION_IMPLEMENTATIONS:
    raise errors.ConfigError(f"model.attention={attention!r}: expected one of {ATTENTION_IMPLEMENTATIONS}")
  if attention == "cudnn" and model_cfg.dtype not in ("bfloat16", "float16"):
    raise errors.ConfigError(f"model.attention='cudnn' needs a 16-bit model.dtype (bfloat16), not {model_cfg.dtype}")
  return CLIPConfig(
      embed_dim=model_cfg.embed_dim,
      vision=VisionConfig((h, w), v.patch_size, v.width, v.layers, v.heads),
      text=TextConfig(vocab_size, context_length, t.width, t.layers, t.heads, eot_token_id),
      activation=model_cfg.activation,
      dtype=model_cfg.dtype,
      remat=model_cfg.remat,
      attention=attention,
  )


def count_params(params) -> int:
  return sum(math.prod(p.shape) for p in jax.tree_util.tree_leaves(params))
