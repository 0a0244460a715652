"""The ESM-2 / DPLM masked-LM denoiser in Flax NNX, with the DiT call interface.

Architecture = HF `transformers` `EsmForMaskedLM` (ESM-2), which DPLM (`EsmForDPLM`) subclasses
without changing any weight:

    e   = word_embeddings[x]                                    (V, D), pad row 1
    e   = token_dropout(e)                  (if cfg.token_dropout; below)
    e   = LN(e)                             (only if cfg.emb_layer_norm_before; ESM-2: no)
    e   = e · valid                         (valid = x != <pad>, if cfg.pad_attention_mask)
    per layer:  h = h + attention.output.dense(MHA(attention.LayerNorm(h)))
                h = h + output.dense(gelu_erf(intermediate.dense(LayerNorm(h))))
    f   = encoder.emb_layer_norm_after(h)                       ("features", the LM head's input)
    out = lm_head.decoder(LN(gelu_erf(lm_head.dense(f)))) + lm_head.bias
          (decoder weight tied to word_embeddings: no separate parameter)

MHA: q, k, v = query/key/value(h) (with biases); q is scaled by head_dim^-½ BEFORE rotary (as ESM);
rotary on q and k in float32, non-interleaved rotate-half `cat(−x2, x1)` with cos/sin of
`cat(θ, θ)`, θ[p, j] = p · inv_freq[j], positions p = 0..L−1 (pad tokens included: HF and DPLM use
arange(L) for rotary whatever the padding), inv_freq = 1/rope_theta^(2j/Dh), or the checkpoint's
stored buffer where it differs (`cfg.rope_inv_freq`, a static tuple: the model holds only
`nnx.Param`s, so `nnx.split(model, nnx.Param)` works as for the DiT); softmax with no further
scale; PAD keys masked (−inf) when `cfg.pad_attention_mask`.

Token dropout (ESM-2's `token_dropout=True`, exactly HF `EsmEmbeddings`): embeddings of `<mask>`
are zeroed and all embeddings of a sequence are scaled by (1 − 0.12) / max(1 − m, 1e-6) (the
floor only acts on all-<mask> rows, where HF gives NaN and we give zero embeddings), m = (#<mask>) /
(#valid tokens) (valid = non-pad with the pad attention mask, else L). Soft input (B, L, V), read
as probabilities p (after a softmax for 'logits'): e = Σ_v p_v E_v with the `<mask>` row zeroed,
m = Σ_l p_l(<mask>) / #valid (the expected mask fraction, differentiable), and the pad mask is
the hard decision p(<pad>) > ½ (no gradient). A one-hot soft input therefore gives exactly the
ids path.

Padding (decision): `pad_attention_mask=True` (default) follows DPLM, which always calls the net
with attention_mask = input_ids != <pad>: pad embeddings are zeroed, pad keys are masked and the
token-dropout ratio counts only non-pad tokens. HF `EsmForMaskedLM(input_ids)` without an
attention_mask equals `pad_attention_mask=False`. In our 'eos' row layout (`data.protein`) rows
hold no pad token, so both agree.

No time conditioning: `sigma_B` is accepted and ignored (DPLM is time-agnostic), and `trunk`
returns an empty (B, 0) conditioning. Precision as `models.dit`: parameters, embeddings,
LayerNorm statistics (with bias, eps = cfg.layer_norm_eps) and the residual stream float32; dense
layers run in `compute_dtype`; logits come back in `compute_dtype`.

Parameter paths mirror the HF names one-to-one: `esm.encoder.layer.3.attention.self.query.weight`
<-> ('esm', 'encoder', 'layer', 3, 'attention', 'self', 'query', 'kernel') (Linear kernels (in,
out) = weightᵀ; Embedding 'weight' -> 'embedding'; LayerNorm 'weight', 'bias' unchanged;
`lm_head.bias` -> ('lm_head', 'bias')). `checkpoint.esm_hf` converts both ways.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from didi_jax.errors import ConfigError
from didi_jax.models.dit import Linear, check_soft_input, dropout
from didi_jax.models.discriminator import DiscriminatorHead, PrefixShared
from didi_jax.models.layers import LayerNorm

Array = jax.Array

MASK_RATIO_TRAIN = 0.15 * 0.8      # hard-coded in ESM / HF: the ratio of all ESM training runs


@dataclasses.dataclass(frozen=True)
class EsmConfig:
  """Sizes and switches; field names follow HF `EsmConfig` where one exists."""
  vocab_size: int = 33                 # the ESM-2 alphabet (33 tokens, <mask> = 32)
  hidden_size: int = 320               # width d (ESM-2 8M: 320; DPLM 150M: 640)
  num_hidden_layers: int = 6           # transformer layers (DPLM 150M: 30)
  num_attention_heads: int = 20        # heads; head dim = hidden_size / heads, even
  intermediate_size: int = 1280        # MLP width (4 d)
  layer_norm_eps: float = 1e-5
  mask_token_id: int = 32              # <mask>: the diffusion [MASK]
  pad_token_id: int = 1                # <pad>: embedding row zeroed, masked as attention key
  token_dropout: bool = True           # ESM's <mask>-embedding rescale (on in every ESM-2)
  emb_layer_norm_before: bool = False  # ESM-1b only; ESM-2 has LayerNorm after the layers
  rope_theta: float = 10000.0          # rotary base
  rope_inv_freq: Optional[tuple] = None   # a checkpoint's stored inv_freq (None: from rope_theta)
  hidden_dropout_prob: float = 0.0     # dropout after attention.output and output dense (training)
  # ours
  compute_dtype: str = 'float32'
  pad_attention_mask: bool = True
  attention_impl: str = 'auto'
  remat: bool = False

  def __post_init__(self):
    if self.hidden_size % self.num_attention_heads:
      raise ConfigError(f'hidden_size={self.hidden_size} is not divisible by num_attention_heads='
                        f'{self.num_attention_heads}: pick sizes with hidden % heads == 0')
    if (self.hidden_size // self.num_attention_heads) % 2:
      raise ConfigError('ESM head dim (hidden_size / num_attention_heads) must be even for rotary')
    ids = (self.mask_token_id, self.pad_token_id)
    if not all(0 <= i < self.vocab_size for i in ids):
      raise ConfigError(f'mask_token_id={self.mask_token_id} / pad_token_id={self.pad_token_id} '
                        f'must be ids below vocab_size={self.vocab_size}')
    if not 0.0 <= self.hidden_dropout_prob < 1.0:
      raise ConfigError(f'hidden_dropout_prob={self.hidden_dropout_prob} must lie in [0, 1)')

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  def inv_freq(self) -> np.ndarray:
    """(head_dim / 2,) float32: the stored table if any, else 1 / theta^(2j / head_dim)."""
    if self.rope_inv_freq is not None:
      return np.asarray(self.rope_inv_freq, np.float32)
    return default_inv_freq(self.head_dim, self.rope_theta)

  def replace(self, **kw) -> 'EsmConfig':
    return dataclasses.replace(self, **kw)


# ESM-2 sizes (facebook/esm2_*; DPLM 150M / 650M / 3B reuse the last three).
ESM2_SIZES = {
    '8m': dict(hidden_size=320, num_hidden_layers=6, num_attention_heads=20,
               intermediate_size=1280),
    '35m': dict(hidden_size=480, num_hidden_layers=12, num_attention_heads=20,
                intermediate_size=1920),
    '150m': dict(hidden_size=640, num_hidden_layers=30, num_attention_heads=20,
                 intermediate_size=2560),
    '650m': dict(hidden_size=1280, num_hidden_layers=33, num_attention_heads=20,
                 intermediate_size=5120),
    '3b': dict(hidden_size=2560, num_hidden_layers=36, num_attention_heads=40,
               intermediate_size=10240),
}


class WordEmbeddings(nnx.Module):

  def __init__(self, vocab: int, dim: int, *, rngs: nnx.Rngs):
    self.embedding = nnx.Param(jax.random.normal(rngs.params(), (vocab, dim)) * 0.02)


def rotary_tables(length: int, inv_freq: np.ndarray):
  """cos, sin (L, Dh) float32 of cat(θ, θ), θ[p, j] = p · inv_freq[j]."""
  inv = jnp.asarray(inv_freq, jnp.float32)
  ang = jnp.arange(length, dtype=jnp.float32)[:, None] * inv[None]
  emb = jnp.concatenate([ang, ang], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def default_inv_freq(head_dim: int, theta: float = 10000.0) -> np.ndarray:
  """1 / theta^(2j / head_dim) in float32, as torch computes it (float32 arange / dim, pow)."""
  exps = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
  return (np.float32(1.0) / (np.float32(theta) ** exps)).astype(np.float32)


def rotate_half(x: Array) -> Array:
  half = x.shape[-1] // 2
  return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rotary(x_BxLxHxD: Array, cos: Array, sin: Array) -> Array:
  x = x_BxLxHxD.astype(jnp.float32)
  out = x * cos[None, :, None, :] + rotate_half(x) * sin[None, :, None, :]
  return out.astype(x_BxLxHxD.dtype)


class EsmEmbeddings(nnx.Module):

  def __init__(self, cfg: EsmConfig, *, rngs: nnx.Rngs):
    self.word_embeddings = WordEmbeddings(cfg.vocab_size, cfg.hidden_size, rngs=rngs)
    self.layer_norm = (LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)
                       if cfg.emb_layer_norm_before else None)


class _Dense(nnx.Module):
  """A holder with one `dense` Linear (HF's `attention.output`, `intermediate`, `output`)."""

  def __init__(self, d_in: int, d_out: int, *, dtype, rngs: nnx.Rngs):
    self.dense = Linear(d_in, d_out, dtype=dtype, rngs=rngs)


class EsmSelfAttention(nnx.Module):

  def __init__(self, d: int, *, dtype, rngs: nnx.Rngs):
    self.query = Linear(d, d, dtype=dtype, rngs=rngs)
    self.key = Linear(d, d, dtype=dtype, rngs=rngs)
    self.value = Linear(d, d, dtype=dtype, rngs=rngs)


class EsmAttention(nnx.Module):

  def __init__(self, cfg: EsmConfig, *, dtype, rngs: nnx.Rngs):
    d = cfg.hidden_size
    # `self` as an attribute name is what HF calls it (attention.self.query ...).
    self.self = EsmSelfAttention(d, dtype=dtype, rngs=rngs)
    self.output = _Dense(d, d, dtype=dtype, rngs=rngs)
    self.LayerNorm = LayerNorm(d, cfg.layer_norm_eps)  # pylint: disable=invalid-name


class EsmLayer(nnx.Module):

  def __init__(self, cfg: EsmConfig, *, dtype, rngs: nnx.Rngs):
    self.n_heads = cfg.num_attention_heads
    self.attention_impl = cfg.attention_impl
    self.attention = EsmAttention(cfg, dtype=dtype, rngs=rngs)
    self.intermediate = _Dense(cfg.hidden_size, cfg.intermediate_size, dtype=dtype, rngs=rngs)
    self.output = _Dense(cfg.intermediate_size, cfg.hidden_size, dtype=dtype, rngs=rngs)
    self.LayerNorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)  # pylint: disable=invalid-name

  def __call__(self, h, key_mask_BxL, cos, sin, rate: float, key: Optional[Array]):
    B, L, D = h.shape
    H = self.n_heads
    Dh = D // H
    k1 = k2 = None
    if key is not None:
      k1, k2 = jax.random.split(key)
    att = self.attention
    u = att.LayerNorm(h)
    q = att.self.query(u).reshape(B, L, H, Dh)
    q = q * jnp.asarray(Dh ** -0.5, q.dtype)
    k = att.self.key(u).reshape(B, L, H, Dh)
    v = att.self.value(u).reshape(B, L, H, Dh)
    q = apply_rotary(q, cos, sin)
    k = apply_rotary(k, cos, sin)
    mask = None if key_mask_BxL is None else key_mask_BxL[:, None, None, :]
    impl = None if self.attention_impl == 'auto' else self.attention_impl
    if q.dtype == jnp.float32:
      # float32 parity path: explicit HIGHEST-precision softmax attention.
      s = jnp.einsum('blhd,bmhd->bhlm', q, k, precision=jax.lax.Precision.HIGHEST)
      if mask is not None:
        s = jnp.where(mask, s, jnp.finfo(jnp.float32).min)   # HF: + finfo.min
      p = jax.nn.softmax(s, axis=-1)
      a = jnp.einsum('bhlm,bmhd->blhd', p, v, precision=jax.lax.Precision.HIGHEST)
    else:
      a = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=1.0, implementation=impl)
    a = a.reshape(B, L, D)
    h = h + dropout(att.output.dense(a), rate, k1).astype(jnp.float32)
    m = self.intermediate.dense(self.LayerNorm(h))
    m = jax.nn.gelu(m, approximate=False)
    return h + dropout(self.output.dense(m), rate, k2).astype(jnp.float32)


class EsmEncoder(nnx.Module):

  def __init__(self, cfg: EsmConfig, *, dtype, rngs: nnx.Rngs):
    self.layer = nnx.List([EsmLayer(cfg, dtype=dtype, rngs=rngs)
                           for _ in range(cfg.num_hidden_layers)])
    self.emb_layer_norm_after = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)


class EsmModel(nnx.Module):

  def __init__(self, cfg: EsmConfig, *, dtype, rngs: nnx.Rngs):
    self.embeddings = EsmEmbeddings(cfg, rngs=rngs)
    self.encoder = EsmEncoder(cfg, dtype=dtype, rngs=rngs)


class EsmLMHead(nnx.Module):
  """dense -> GELU(erf) -> LayerNorm -> decoder (tied: word_embeddingsᵀ) + bias."""

  def __init__(self, cfg: EsmConfig, *, dtype, rngs: nnx.Rngs):
    self.dense = Linear(cfg.hidden_size, cfg.hidden_size, dtype=dtype, rngs=rngs)
    self.layer_norm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)
    self.bias = nnx.Param(jnp.zeros((cfg.vocab_size,), jnp.float32))
    self.dtype = dtype

  def __call__(self, f: Array, embedding_VxD: Array) -> Array:
    x = jax.nn.gelu(self.dense(f), approximate=False)
    x = self.layer_norm(x)
    precision = jax.lax.Precision.HIGHEST if self.dtype == jnp.float32 else None
    y = jnp.dot(x.astype(self.dtype), embedding_VxD.T.astype(self.dtype), precision=precision)
    return y + self.bias[...].astype(self.dtype)


def from_model_config(model_cfg) -> EsmConfig:
  """EsmConfig of a didi_jax model config with kind='esm' (`config.model_config` names: hidden_size,
  n_blocks -> num_hidden_layers, n_heads -> num_attention_heads, mlp_dim -> intermediate_size,
  dropout -> hidden_dropout_prob; [MASK] = vocab_size - 1; the rest from `model.esm`)."""
  e = model_cfg.get('esm') or {}
  get = e.get if hasattr(e, 'get') else (lambda k, d=None: d)
  inv = get('rope_inv_freq', None)
  return EsmConfig(
      vocab_size=int(model_cfg.vocab_size), hidden_size=int(model_cfg.hidden_size),
      num_hidden_layers=int(model_cfg.n_blocks), num_attention_heads=int(model_cfg.n_heads),
      intermediate_size=int(model_cfg.mlp_dim),
      layer_norm_eps=float(get('layer_norm_eps', 1e-5)),
      mask_token_id=int(model_cfg.vocab_size) - 1, pad_token_id=int(get('pad_token_id', 1)),
      token_dropout=bool(get('token_dropout', True)),
      emb_layer_norm_before=bool(get('emb_layer_norm_before', False)),
      rope_theta=float(get('rope_theta', 10000.0)),
      rope_inv_freq=None if inv is None else tuple(float(v) for v in inv),
      hidden_dropout_prob=float(model_cfg.get('dropout', 0.0)),
      compute_dtype=str(model_cfg.get('compute_dtype', 'float32')),
      attention_impl=str(model_cfg.get('attention_impl', 'auto')),
      remat=bool(model_cfg.get('remat', False)))


def model_config_fields(cfg: EsmConfig) -> dict:
  """The didi_jax model-config fields (kind='esm') that rebuild `cfg` (`from_model_config`);
  precision / attention / length stay the caller's."""
  if cfg.mask_token_id != cfg.vocab_size - 1:
    raise ConfigError(f'this ESM has <mask>={cfg.mask_token_id}, not vocab_size - 1 = '
                      f'{cfg.vocab_size - 1}: the diffusion [MASK] must be the last id')
  return dict(kind='esm', hidden_size=cfg.hidden_size, n_blocks=cfg.num_hidden_layers,
              n_heads=cfg.num_attention_heads, mlp_dim=cfg.intermediate_size,
              vocab_size=cfg.vocab_size, dropout=cfg.hidden_dropout_prob,
              esm=dict(pad_token_id=cfg.pad_token_id, token_dropout=cfg.token_dropout,
                       layer_norm_eps=cfg.layer_norm_eps, rope_theta=cfg.rope_theta,
                       emb_layer_norm_before=cfg.emb_layer_norm_before,
                       rope_inv_freq=None if cfg.rope_inv_freq is None
                       else [float(v) for v in cfg.rope_inv_freq]))


def _as_config(cfg: Any) -> EsmConfig:
  if isinstance(cfg, EsmConfig):
    return cfg
  if hasattr(cfg, 'get') and cfg.get('kind') == 'esm':
    return from_model_config(cfg)
  fields = {f.name for f in dataclasses.fields(EsmConfig)}
  d = cfg.to_dict() if hasattr(cfg, 'to_dict') else dict(cfg)
  return EsmConfig(**{k: v for k, v in d.items() if k in fields})


class EsmTrunk(nnx.Module):
  """Embeddings and transformer layers (everything but emb_layer_norm_after's use and the head);
  `trunk` is the `DiTTrunk.trunk` equivalent a discriminator reuses."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    cfg = _as_config(cfg)
    self.cfg = cfg
    self.dropout_rate = float(cfg.hidden_dropout_prob)
    self.esm = EsmModel(cfg, dtype=jnp.dtype(cfg.compute_dtype), rngs=rngs)

  # ------------------------------------------------------------------------- embeddings

  def embed(self, x: Array, soft_input: str = 'logits'):
    """(e (B, L, D) float32, key mask (B, L) bool or None) as HF EsmEmbeddings (docstring)."""
    check_soft_input(soft_input)
    cfg = self.cfg
    table = jnp.asarray(self.esm.embeddings.word_embeddings.embedding[...])
    if jnp.issubdtype(x.dtype, jnp.integer):
      e = jnp.take(table, x, axis=0)
      is_mask = (x == cfg.mask_token_id).astype(jnp.float32)
      valid = (x != cfg.pad_token_id) if cfg.pad_attention_mask else None
    else:
      p = x.astype(jnp.float32)
      if soft_input == 'logits':
        p = jax.nn.softmax(p, axis=-1)
      if cfg.token_dropout:
        table = table.at[cfg.mask_token_id].set(0.0)
      e = jnp.einsum('blv,vd->bld', p, table, precision=jax.lax.Precision.HIGHEST)
      is_mask = p[..., cfg.mask_token_id]
      valid = None
      if cfg.pad_attention_mask:
        valid = jax.lax.stop_gradient(p[..., cfg.pad_token_id]) <= 0.5
    if cfg.token_dropout:
      if jnp.issubdtype(x.dtype, jnp.integer):
        e = e * (1.0 - is_mask)[..., None]        # <mask> embeddings zeroed (soft: row zeroed)
      if valid is None:
        n_valid = jnp.float32(x.shape[1])
        n_mask = is_mask.sum(-1)
      else:
        n_valid = valid.sum(-1).astype(jnp.float32)
        n_mask = is_mask.sum(-1)   # HF counts every <mask>, pad or not (a <mask> is never pad)
      observed = n_mask / n_valid
      # An all-<mask> row (a sampler's first step) has observed = 1: HF divides 0 embeddings by
      # 0 (NaN); the floor keeps them 0 and equals HF wherever one valid token is unmasked
      # (1 − observed >= 1 / #valid > 1e-6).
      keep = jnp.maximum(1.0 - observed, 1e-6)
      e = e * ((1.0 - MASK_RATIO_TRAIN) / keep)[:, None, None]
    if self.esm.embeddings.layer_norm is not None:
      e = self.esm.embeddings.layer_norm(e)
    if valid is not None:
      e = e * valid[..., None].astype(jnp.float32)
    return e, valid

  # ------------------------------------------------------------------------- trunk

  def trunk(self, x, sigma_B=None, *, soft_input: str = 'logits',
            dropout_key: Optional[Array] = None, num_blocks=None):
    """(hidden (B, L, D) float32 after the first `num_blocks` layers (all by default), before
    emb_layer_norm_after; cond (B, 0) float32, empty: ESM has no time conditioning).
    `sigma_B` is ignored."""
    carry = self.trunk_carry(x, sigma_B, soft_input=soft_input)
    return self.trunk_output(self.run_blocks(carry, 0, num_blocks, dropout_key))

  def trunk_carry(self, x, sigma_B=None, *, soft_input: str = 'logits'):
    """The first layer's inputs: (embeddings (B, L, D), key mask (B, L) or None)."""
    del sigma_B
    return self.embed(x, soft_input)

  def run_blocks(self, carry, start: int = 0, stop: Optional[int] = None,
                 dropout_key: Optional[Array] = None):
    """Encoder layers [start, stop) applied to `carry` = (h, key mask); returns the same pair.
    Layer i's dropout key is `split(dropout_key, stop)[i]`."""
    h, valid = carry
    layers = self.esm.encoder.layer
    stop = len(layers) if stop is None else stop
    cos, sin = rotary_tables(h.shape[1], self.cfg.inv_freq())
    keys = [None] * stop
    if dropout_key is not None and self.dropout_rate > 0:
      keys = list(jax.random.split(dropout_key, stop))
    rate = self.dropout_rate
    for i in range(start, stop):
      layer, key = layers[i], keys[i]
      if self.cfg.remat:
        h = nnx.remat(lambda m, h_, v_, k_: m(h_, v_, cos, sin, rate, k_))(layer, h, valid, key)
      else:
        h = layer(h, valid, cos, sin, rate, key)
    return h, valid

  def trunk_output(self, carry):
    """(hidden, empty conditioning (B, 0)) of a `run_blocks` carry."""
    h = carry[0]
    return h, jnp.zeros((h.shape[0], 0), jnp.float32)


class EsmProjection(nnx.Module):
  """features (..., D) -> logits (..., V): the LM head with its tied decoder, as one module
  (shares the model's `lm_head` and `word_embeddings`; `nnx.split` of it holds just those)."""

  def __init__(self, lm_head: EsmLMHead, word_embeddings: WordEmbeddings):
    self.lm_head = lm_head
    self.word_embeddings = word_embeddings

  def __call__(self, f: Array) -> Array:
    return self.lm_head(f, self.word_embeddings.embedding[...])


class EsmForMaskedLM(EsmTrunk):
  """Denoiser: (ids (B, L) or soft input (B, L, V), σ_B ignored) -> logits (B, L, V).

  Implements `models.interface.Denoiser` like `models.dit.DiT` (`__call__`, `features`,
  `projection`, `trunk_modules`, and `trunk` for a discriminator): `projection(features(x, σ))
  == self(x, σ)` (`project` is the same as a method).
  """
  trunk_modules = ('esm',)

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    super().__init__(cfg, rngs=rngs)
    self.lm_head = EsmLMHead(self.cfg, dtype=jnp.dtype(self.cfg.compute_dtype), rngs=rngs)

  @property
  def projection(self) -> EsmProjection:
    """features (B, L, D) -> logits (B, L, V), position by position."""
    return EsmProjection(self.lm_head, self.esm.embeddings.word_embeddings)

  def features(self, x, sigma_B=None, *, soft_input: str = 'logits',
               dropout_key: Optional[Array] = None) -> Array:
    """The LM head's input (B, L, D) float32: the last layer's output after emb_layer_norm_after."""
    h, _ = self.trunk(x, sigma_B, soft_input=soft_input, dropout_key=dropout_key)
    return self.esm.encoder.emb_layer_norm_after(h)

  def project(self, f: Array) -> Array:
    """LM head on features (..., D) -> logits (..., V) in compute_dtype."""
    return self.lm_head(f, self.esm.embeddings.word_embeddings.embedding[...])

  def __call__(self, x, sigma_B=None, *, soft_input: str = 'logits',
               dropout_key: Optional[Array] = None) -> Array:
    return self.project(self.features(x, sigma_B, soft_input=soft_input,
                                      dropout_key=dropout_key))


def trainable_mask(params_tree, n_layers: int, unfreeze_layers: int):
  """Bool pytree over an ESM-trunk discriminator's Param state: the last `unfreeze_layers`
  encoder layers and any head outside `esm` (the `discriminator.trainable_mask` equivalent)."""
  first = n_layers - unfreeze_layers

  def is_trainable(path, _):
    keys = [getattr(p, 'key', getattr(p, 'idx', None)) for p in path]
    if not keys or keys[0] != 'esm':
      return True
    if keys[1:3] == ['encoder', 'layer']:
      return int(keys[3]) >= first
    return False
  return jax.tree_util.tree_map_with_path(is_trainable, params_tree)


class EsmDiscriminator(PrefixShared, EsmTrunk):
  """(ids (B, L) or soft input (B, L, V), σ_B ignored) -> per-token logits (B, L), float32: the
  ESM trunk (copied from the teacher, `trunk_modules`) read after its last layer, before
  emb_layer_norm_after (as the DiT discriminator reads the last block's residual stream), and the
  spectral-normalised head of `models.discriminator`. Trainable: the last
  `distill.disc_unfreeze_blocks` encoder layers and the head (`block_path`, `head_modules`)."""
  block_path = ('esm', 'encoder', 'layer')
  head_modules = ('output_layer',)

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    super().__init__(cfg, rngs=rngs)
    self.output_layer = DiscriminatorHead(self.cfg.hidden_size, rngs=rngs)


def init_model(cfg, seed: int = 0) -> EsmForMaskedLM:
  return EsmForMaskedLM(cfg, rngs=nnx.Rngs(seed))
