"""Official PyTorch tensor names <-> our NNX tree paths (docs/method.md §3.3).

The official DiT (MDLM/DUO/DiDi-Instruct) names its tensors `blocks.3.mlp.0.weight`; our tree holds
the same tensor at `('blocks', 3, 'mlp_0', 'kernel')`. Rules:

* `nn.Sequential` children `mlp.0`, `mlp.2`, `main.0`, `main.2` <-> `mlp_0`, `mlp_2`, `main_0`,
  `main_2`; `blocks.{i}` <-> `('blocks', i)` with an int index.
* Linear `weight` (out, in) <-> `kernel` (in, out), transposed; `bias`, LayerNorm `weight`
  (`norm1`, `norm2`, `norm_final`) and `vocab_embed.embedding` (V, D) unchanged.
* Spectral norm (discriminator head): `weight_orig` <-> `kernel` (transposed), `weight_u` <-> `u`,
  `weight_v` <-> `v`; u and v live in the separate `spectral` collection.
* `rotary_emb.inv_freq` is a buffer we recompute (`inv_freq`); importers check stored copies.

Roles: `'dit'` (teacher / student / student EMA) and `'discriminator'` (trunk + spectral head).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

DIT = 'dit'
DISCRIMINATOR = 'discriminator'
ROLES = (DIT, DISCRIMINATOR)

PARAMS = 'params'       # trainable tensors (nnx.Param)
SPECTRAL = 'spectral'   # power-iteration vectors (models.discriminator.Spectral)

INV_FREQ = 'rotary_emb.inv_freq'
ROTARY_BASE = 10000.0

_SEQUENTIAL = ('mlp', 'main')                 # nn.Sequential parents: `mlp.0` <-> `mlp_0`
_LAYER_NORMS = ('norm1', 'norm2', 'norm_final')


@dataclasses.dataclass(frozen=True)
class Mapped:
  """Where one official tensor lives in our state."""
  path: tuple          # path inside the pure dict of `collection`
  collection: str      # PARAMS | SPECTRAL
  transpose: bool      # official (out, in) <-> our (in, out)


def official_to_path(name: str) -> Mapped:
  """`'blocks.3.mlp.0.weight'` -> Mapped(('blocks', 3, 'mlp_0', 'kernel'), 'params', True)."""
  parts = name.split('.')
  if len(parts) < 2 or any(not p for p in parts):
    raise ValueError(f'{name!r} is not an official DiT tensor name')
  path: list = []
  i = 0
  body, leaf = parts[:-1], parts[-1]
  while i < len(body):
    p = body[i]
    if p == 'blocks' and i + 1 < len(body) and body[i + 1].isdigit():
      path += ['blocks', int(body[i + 1])]
      i += 2
    elif p in _SEQUENTIAL and i + 1 < len(body) and body[i + 1].isdigit():
      path.append(f'{p}_{body[i + 1]}')
      i += 2
    else:
      if p.isdigit():
        raise ValueError(f'{name!r} has an index {p!r} after {".".join(body[:i])!r}, which is '
                         'not a known sequential container (blocks, mlp, main)')
      path.append(p)
      i += 1
  parent = path[-1] if path else ''
  if leaf == 'weight' and parent not in _LAYER_NORMS:
    return Mapped(tuple(path + ['kernel']), PARAMS, True)
  if leaf == 'weight_orig':
    return Mapped(tuple(path + ['kernel']), PARAMS, True)
  if leaf == 'weight_u':
    return Mapped(tuple(path + ['u']), SPECTRAL, False)
  if leaf == 'weight_v':
    return Mapped(tuple(path + ['v']), SPECTRAL, False)
  return Mapped(tuple(path + [leaf]), PARAMS, False)


def path_to_official(path: Sequence, collection: str = PARAMS) -> tuple[str, bool]:
  """Inverse of `official_to_path`: returns (official name, transpose)."""
  path = list(path)
  parts: list[str] = []
  spectral_head = any(isinstance(p, str) and p.startswith('main_') for p in path)
  for p in path[:-1]:
    if isinstance(p, int) or (isinstance(p, str) and p.isdigit()):
      parts.append(str(int(p)))
    elif isinstance(p, str) and '_' in p and p.split('_', 1)[0] in _SEQUENTIAL \
        and p.split('_', 1)[1].isdigit():
      parts += p.split('_', 1)
    else:
      parts.append(str(p))
  leaf = path[-1]
  if collection == SPECTRAL:
    if leaf not in ('u', 'v'):
      raise ValueError(f'spectral leaf {path} must end in u or v')
    return '.'.join(parts + [f'weight_{leaf}']), False
  if leaf == 'kernel':
    return '.'.join(parts + ['weight_orig' if spectral_head else 'weight']), True
  return '.'.join(parts + [str(leaf)]), False


def _block_param_names(i: int) -> list[str]:
  b = f'blocks.{i}.'
  return [b + 'norm1.weight', b + 'attn_qkv.weight', b + 'attn_out.weight', b + 'norm2.weight',
          b + 'mlp.0.weight', b + 'mlp.0.bias', b + 'mlp.2.weight', b + 'mlp.2.bias',
          b + 'adaLN_modulation.weight', b + 'adaLN_modulation.bias']


_TRUNK_HEAD = ['vocab_embed.embedding', 'sigma_map.mlp.0.weight', 'sigma_map.mlp.0.bias',
               'sigma_map.mlp.2.weight', 'sigma_map.mlp.2.bias']
_DIT_OUTPUT = ['output_layer.norm_final.weight', 'output_layer.linear.weight',
               'output_layer.linear.bias', 'output_layer.adaLN_modulation.weight',
               'output_layer.adaLN_modulation.bias']
# After torch.nn.utils.spectral_norm, `weight` is re-registered as `weight_orig` after `bias`.
_DISC_OUTPUT_PARAMS = ['output_layer.main.0.bias', 'output_layer.main.0.weight_orig',
                       'output_layer.main.2.bias', 'output_layer.main.2.weight_orig']
_DISC_OUTPUT_STATE = ['output_layer.main.0.bias', 'output_layer.main.0.weight_orig',
                      'output_layer.main.0.weight_u', 'output_layer.main.0.weight_v',
                      'output_layer.main.2.bias', 'output_layer.main.2.weight_orig',
                      'output_layer.main.2.weight_u', 'output_layer.main.2.weight_v']


def registration_order(n_blocks: int, role: str = DIT) -> list[str]:
  """Parameter names in `nn.Module.parameters()` order (EMA shadow lists): 130 for the small DiT."""
  _check_role(role)
  names = list(_TRUNK_HEAD)
  for i in range(n_blocks):
    names += _block_param_names(i)
  names += _DIT_OUTPUT if role == DIT else _DISC_OUTPUT_PARAMS
  return names


def state_dict_order(n_blocks: int, role: str = DIT) -> list[str]:
  """Names in `state_dict()` order (each module: parameters, buffers, then children)."""
  _check_role(role)
  names = list(_TRUNK_HEAD) + [INV_FREQ]
  for i in range(n_blocks):
    names += _block_param_names(i)
  names += _DIT_OUTPUT if role == DIT else _DISC_OUTPUT_STATE
  return names


def official_shapes(model_cfg, role: str = DIT) -> dict[str, tuple]:
  """Official (PyTorch-layout) shape of every state_dict entry for `model_cfg` (docs/method.md §3.3)."""
  _check_role(role)
  d, c, m, v = model_cfg.hidden_size, model_cfg.cond_dim, model_cfg.mlp_dim, model_cfg.vocab_size
  head_dim = d // model_cfg.n_heads
  shapes = {'vocab_embed.embedding': (v, d), 'sigma_map.mlp.0.weight': (c, 256),
            'sigma_map.mlp.0.bias': (c,), 'sigma_map.mlp.2.weight': (c, c),
            'sigma_map.mlp.2.bias': (c,), INV_FREQ: (head_dim // 2,)}
  for i in range(model_cfg.n_blocks):
    b = f'blocks.{i}.'
    shapes.update({b + 'norm1.weight': (d,), b + 'attn_qkv.weight': (3 * d, d),
                   b + 'attn_out.weight': (d, d), b + 'norm2.weight': (d,),
                   b + 'mlp.0.weight': (m, d), b + 'mlp.0.bias': (m,),
                   b + 'mlp.2.weight': (d, m), b + 'mlp.2.bias': (d,),
                   b + 'adaLN_modulation.weight': (6 * d, c),
                   b + 'adaLN_modulation.bias': (6 * d,)})
  if role == DIT:
    shapes.update({'output_layer.norm_final.weight': (d,), 'output_layer.linear.weight': (v, d),
                   'output_layer.linear.bias': (v,),
                   'output_layer.adaLN_modulation.weight': (2 * d, c),
                   'output_layer.adaLN_modulation.bias': (2 * d,)})
  else:
    shapes.update({'output_layer.main.0.bias': (d,), 'output_layer.main.0.weight_orig': (d, d),
                   'output_layer.main.0.weight_u': (d,), 'output_layer.main.0.weight_v': (d,),
                   'output_layer.main.2.bias': (1,), 'output_layer.main.2.weight_orig': (1, d),
                   'output_layer.main.2.weight_u': (1,), 'output_layer.main.2.weight_v': (d,)})
  return {k: shapes[k] for k in state_dict_order(model_cfg.n_blocks, role)}


def inv_freq(head_dim: int) -> np.ndarray:
  """`rotary_emb.inv_freq` as the official Rotary computes it, float32: 10000^(−2j/Dh)."""
  exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
  return (np.float32(1.0) / (np.float32(ROTARY_BASE) ** exponent)).astype(np.float32)


def _check_role(role: str):
  if role not in ROLES:
    raise ValueError(f'role={role!r} is not known: use one of {list(ROLES)}')
