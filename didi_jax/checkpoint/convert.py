"""Convert checkpoints between the official layouts and ours, in either direction.

  python -m didi_jax.checkpoint.convert SRC DST [--role R] [--format F] [--size S] [--vocab-size N]

SRC: a file, a directory or hf:ORG/NAME in any layout `importer` reads (HF mdlm-owt, DUO mdlm.ckpt,
the DiDi-Instruct .ckpt, the HF didi-instruct-small directory, or our own flat .npz/.safetensors).

DST, by --format (auto: .npz -> ours; .ckpt or a directory -> official; .safetensors -> ours from
an official SRC, official from ours):
  ours      DST.npz or DST.safetensors: keys <group>/<tree path>, the model config in the metadata.
  official  DST.safetensors  one network, un-prefixed official names (the HF release's files);
            DST.ckpt         Lightning: a teacher in DUO's layout (state_dict backbone.* + ema),
                             or a DiDi state (backbone.*, student_ema.*, discriminator.*);
            DST/ (directory) the HF layout: model.safetensors (+ discriminator.safetensors).

--role picks the networks: teacher, student (the student EMA, the released denoiser), discriminator,
didi (student, student EMA, discriminator), or auto (from SRC). Sizes are inferred from the tensors
unless --size / --vocab-size / --n-heads say otherwise; every import is checked one-to-one.
SRC may also be a didi_jax run directory (orbax checkpoints of `pretrain` or `distill`): its latest
checkpoint is exported (a teacher: EMA weights unless --weights raw; a distillation: the roles above).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional, Sequence

from flax import nnx
import numpy as np

from didi_jax import config as config_lib
from didi_jax.checkpoint import loader
from didi_jax.checkpoint import exporter
from didi_jax.checkpoint import importer
from didi_jax.checkpoint import names

ROLES = ('auto', 'teacher', 'student', 'discriminator', 'didi')


def _auto_role(src: importer.Source) -> str:
  if src.kind == 'hf_dir' and 'model' not in src.files:
    return 'discriminator'
  if importer.is_didi(src):
    return 'didi'
  if src.kind == 'ours':
    for group, role in (('teacher', 'teacher'), ('student_ema', 'student'),
                        ('discriminator', 'discriminator')):
      if group in src.groups:
        return role
  if src.kind == 'flat' and importer.is_discriminator(src.tensors):
    return 'discriminator'
  return 'teacher'


def model_config_for(src: importer.Source, role: str, size: Optional[str] = None,
                     vocab_size: Optional[int] = None, n_heads: Optional[int] = None):
  """The model config: a preset (--size) or inferred from SRC, then the explicit overrides."""
  net = names.DISCRIMINATOR if role == 'discriminator' else names.DIT
  inferred = importer.source_model_config(src, net)
  if size:
    cfg = config_lib.model_config(size, vocab_size=inferred.vocab_size)
  else:
    cfg = inferred
  if vocab_size:
    cfg.vocab_size = vocab_size
  if n_heads:
    cfg.n_heads = n_heads
  return cfg


def read_groups(src: importer.Source, role: str, cfg, weights: str = 'ema') -> dict:
  """Imports the networks `role` names -> {group: pure dict} (importer.OURS_GROUPS)."""
  if role == 'teacher':
    return {'teacher': importer.import_teacher(src, cfg, weights=weights)}
  if role == 'student':
    return {'student_ema': importer.import_dit(src, cfg, network='student_ema')}
  if role == 'discriminator':
    params, spectral = importer.import_discriminator(src, cfg)
    return {'discriminator': params, 'discriminator_spectral': spectral}
  if role == 'didi':
    return importer.import_didi(src, cfg)
  raise ValueError(f'--role {role!r}: choose one of {list(ROLES)}')


def write_official(groups: dict, dst: str, cfg) -> str:
  """Writes `groups` in the official layout chosen by DST's form; returns a description."""
  dit_group = next((g for g in ('student_ema', 'teacher') if g in groups), None)
  has_disc = 'discriminator' in groups
  if dst.endswith('.ckpt'):
    if has_disc and 'student_ema' in groups:
      exporter.export_didi_ckpt(dst, student=groups.get('student'),
                                student_ema=groups['student_ema'],
                                discriminator=groups['discriminator'],
                                discriminator_spectral=groups.get('discriminator_spectral'),
                                model_cfg=cfg)
      return 'DiDi-Instruct Lightning checkpoint'
    if set(groups) == {'teacher'}:
      exporter.export_teacher_ckpt(dst, groups['teacher'], model_cfg=cfg)
      return 'DUO/MDLM Lightning checkpoint (state_dict backbone.* + ema)'
    raise importer.CheckpointError(
        f'a .ckpt holds a teacher (--role teacher) or a whole DiDi state (--role didi); this '
        f'conversion has {sorted(groups)}: write .safetensors instead')
  if dst.endswith('.safetensors'):
    if len([g for g in groups if g != 'discriminator_spectral']) != 1:
      raise importer.CheckpointError(
          f'a .safetensors file holds one network but there are {sorted(groups)}: pick one with '
          '--role, or write a directory (HF layout) or a .ckpt')
    if has_disc:
      exporter.export_discriminator_safetensors(dst, groups['discriminator'],
                                                groups.get('discriminator_spectral'),
                                                model_cfg=cfg)
      return 'official discriminator safetensors'
    exporter.export_dit_safetensors(dst, groups[dit_group], model_cfg=cfg)
    return 'official DiT safetensors (un-prefixed)'
  if os.path.splitext(dst)[1] and not os.path.isdir(dst):
    raise importer.CheckpointError(
        f'{dst}: official outputs are .safetensors, .ckpt or a directory')
  os.makedirs(dst, exist_ok=True)
  if dit_group:
    exporter.export_dit_safetensors(os.path.join(dst, 'model.safetensors'), groups[dit_group],
                                    model_cfg=cfg)
  if has_disc:
    exporter.export_discriminator_safetensors(os.path.join(dst, 'discriminator.safetensors'),
                                              groups['discriminator'],
                                              groups.get('discriminator_spectral'), model_cfg=cfg)
  return 'HF directory layout'


def auto_format(src: importer.Source, dst: str) -> str:
  """.npz -> ours; .ckpt or a directory -> official; .safetensors -> the other one than SRC's."""
  if dst.endswith('.npz'):
    return 'ours'
  if dst.endswith('.safetensors'):
    return 'official' if src.kind == 'ours' else 'ours'
  return 'official'


def _count(groups: dict) -> str:
  parts = []
  for g, tree in groups.items():
    leaves = importer.flatten_tree(tree).values()
    parts.append(f'{g}: {len(leaves)} tensors, {sum(int(np.size(v)) for v in leaves):,} values')
  return '; '.join(parts)


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog='python -m didi_jax.checkpoint.convert',
      description=__doc__.split('\n\n', 1)[0],
      epilog=__doc__.split('\n\n', 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('src', metavar='SRC', help='file, directory or hf:ORG/NAME')
  p.add_argument('dst', metavar='DST', help='output file (.npz/.safetensors/.ckpt) or directory')
  p.add_argument('--role', choices=ROLES, default='auto', help='networks to convert (default auto)')
  p.add_argument('--format', choices=('auto', 'ours', 'official'), default='auto',
                 help='output layout (auto: by DST; .safetensors: the other one than SRC)')
  p.add_argument('--size', choices=sorted(config_lib.MODEL_SIZES), default=None,
                 help='model size preset (default: inferred from the tensors)')
  p.add_argument('--vocab-size', type=int, default=None, help='vocabulary incl. [MASK]')
  p.add_argument('--n-heads', type=int, default=None,
                 help='attention heads (default: from rotary_emb.inv_freq, else hidden/64)')
  p.add_argument('--weights', choices=('ema', 'raw'), default='ema',
                 help="Lightning teacher: 'ema' shadow list (default) or 'raw' state_dict")
  return p


def read_run_groups(path: str, role: str, weights: str):
  """(role, model config, groups) from a didi_jax run directory, or None if `path` is not one."""
  if loader.checkpoint_dir(path) is None:
    return None
  cfg, mngr = loader.read_workdir_config(path)
  job = mngr.read_meta().get('job')
  mngr.close()
  if job == 'pretrain':
    if role not in ('auto', 'teacher'):
      raise importer.CheckpointError(f'{path} is a pre-training run: it holds a teacher only')
    net = loader.load(path, 'teacher', weights=weights)
    return 'teacher', net.model_cfg, {'teacher': nnx.to_pure_dict(net.params)}
  role = 'didi' if role == 'auto' else role
  groups = {}
  if role in ('student', 'didi'):
    groups['student_ema'] = nnx.to_pure_dict(loader.load(path, 'student_ema').params)
  if role == 'didi':
    groups['student'] = nnx.to_pure_dict(loader.load(path, 'student').params)
  if role in ('discriminator', 'didi'):
    disc = loader.load(path, 'discriminator')
    groups['discriminator'] = nnx.to_pure_dict(disc.params)
    groups['discriminator_spectral'] = nnx.to_pure_dict(disc.spectral)
  if role == 'teacher':
    raise importer.CheckpointError(f'{path} is a distillation run: its teacher came from '
                                   f'{cfg.teacher.checkpoint!r}, convert that instead')
  model_cfg = loader._model_cfg(cfg.model.to_dict())  # pylint: disable=protected-access
  return role, model_cfg, groups


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = parser().parse_args(argv)
  logging.basicConfig(level=logging.INFO, format='%(levelname)s %(message)s')
  for noisy in ('absl', 'orbax', 'jax'):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  try:
    run = read_run_groups(args.src, args.role, args.weights)
    if run is not None:
      role, cfg, groups = run
      fmt = args.format if args.format != 'auto' else (
          'ours' if args.dst.endswith(('.npz', '.safetensors')) else 'official')
    else:
      src = importer.open_source(args.src)
      role = _auto_role(src) if args.role == 'auto' else args.role
      cfg = model_config_for(src, role, args.size, args.vocab_size, args.n_heads)
      groups = read_groups(src, role, cfg, args.weights)
      fmt = args.format if args.format != 'auto' else auto_format(src, args.dst)
    if fmt == 'ours':
      if not args.dst.endswith(('.npz', '.safetensors')):
        raise importer.CheckpointError(f'{args.dst}: our format is .npz or .safetensors')
      exporter.save_ours(args.dst, groups, model_cfg=cfg)
      what = 'didi_jax flat format'
    else:
      what = write_official(groups, args.dst, cfg)
  except importer.CheckpointError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  print(f'{args.src} -> {args.dst} ({what}; {role}, size {cfg.size}: d={cfg.hidden_size}, '
        f'{cfg.n_blocks} blocks, vocab {cfg.vocab_size}) {_count(groups)}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
