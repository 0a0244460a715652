"""Teacher pre-training: the MDLM NELBO (docs/method.md §4) — and the causal-LM baseline — as one jitted,
sharded step, plus the loop (checkpoints, validation, metrics, preemption).

The train state is a dict pytree {'step', 'params', 'ema', 'opt'}; `params`/`ema` are nnx.State
objects of the model's Params. Randomness is a pure function of (run key, step): the step key is
`fold_in(PRNGKey(seed), step)`, so a resumed run continues bit-for-bit.
"""
from __future__ import annotations

import os
from typing import Callable

import chex
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from didi_jax import diffusion, models, parallel
from didi_jax.checkpoint.manager import Manager
from didi_jax.data import pipeline
from didi_jax.train import common
from didi_jax.train import loop


def make_optimizer(pcfg) -> optax.GradientTransformation:
  sched = common.warmup_constant(pcfg.lr, pcfg.warmup_steps)
  return common.adamw(sched, b1=pcfg.b1, b2=pcfg.b2, eps=pcfg.eps,
                      weight_decay=pcfg.weight_decay, clip_norm=pcfg.clip_norm)


def _fresh_state(cfg, tx, seed: int) -> dict:
  model = models.build(cfg.model, seed=seed)
  params = nnx.state(model, nnx.Param)
  return {'step': jnp.zeros((), jnp.int32), 'params': params,
          'ema': jax.tree.map(jnp.copy, params), 'opt': tx.init(params)}


def loss_terms(cfg, graphdef, params, x_BxL, key, train: bool):
  """Per-token loss (B, L) and the mask it averages over."""
  chex.assert_rank(x_BxL, 2)
  chex.assert_type(x_BxL, int)
  mask_id = cfg.model.vocab_size - 1
  model = nnx.merge(graphdef, params)
  key_t, key_mask, key_drop = jax.random.split(key, 3)
  drop = key_drop if train else None
  if cfg.model.kind == 'ar':
    logits = model(x_BxL[:, :-1], dropout_key=drop).astype(jnp.float32)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), x_BxL[:, 1:, None], -1)[..., 0]
    return nll, jnp.ones_like(nll)
  B = x_BxL.shape[0]
  if cfg.pretrain.antithetic:
    t_B = diffusion.antithetic_times(key_t, B)
  else:
    t_B = diffusion.uniform_times(key_t, B)
  z_BxL = diffusion.forward_mask(key_mask, x_BxL, t_B, mask_id)
  logits = model(z_BxL, jnp.zeros((B,), jnp.float32), dropout_key=drop)
  loss = diffusion.nelbo_per_token(logits, z_BxL, x_BxL, t_B, mask_id)
  return loss, jnp.ones_like(loss)


def make_train_step(cfg, graphdef, tx) -> Callable:
  pcfg = cfg.pretrain

  def loss_fn(params, x_BxL, key):
    loss_BxL, w_BxL = loss_terms(cfg, graphdef, params, x_BxL, key, train=True)
    return jnp.sum(loss_BxL) / jnp.sum(w_BxL)

  def step(state, x_BxL, run_key):
    key = jax.random.fold_in(run_key, state['step'])
    loss, grads = jax.value_and_grad(loss_fn)(state['params'], x_BxL, key)
    gnorm = common.global_norm(grads)
    nonfinite = common.count_nonfinite(grads)
    updates, opt = tx.update(grads, state['opt'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    ema = common.ema_update(state['ema'], params,
                            common.mdlm_ema_decay(state['step'], pcfg.ema_decay))
    lr = common.warmup_constant(pcfg.lr, pcfg.warmup_steps)(state['step'])
    new = {'step': state['step'] + 1, 'params': params, 'ema': ema, 'opt': opt}
    return new, {'loss': loss, 'grad_norm': gnorm, 'lr': lr, 'nonfinite_grads': nonfinite}
  return step


def make_eval_step(cfg, graphdef) -> Callable:
  """Sum of per-token NELBO (or NLL) and token count for one batch, deterministic given key."""
  def step(params, x_BxL, key):
    loss_BxL, w_BxL = loss_terms(cfg, graphdef, params, x_BxL, key, train=False)
    return jnp.sum(loss_BxL), jnp.sum(w_BxL)
  return step


class Trainer:
  """Owns the mesh, compiled steps, state shardings and checkpoint manager for pre-training."""

  def __init__(self, cfg, workdir: str, devices=None):
    self.cfg, self.workdir = cfg, workdir
    self.mesh = parallel.make_mesh(cfg.mesh, devices)
    div = parallel.batch_divisor(self.mesh)
    if cfg.pretrain.batch_size % div:
      raise ValueError(f'pretrain.batch_size={cfg.pretrain.batch_size} is not divisible by the '
                       f'data×fsdp mesh size {div}: pick a multiple of {div}')
    self.tx = make_optimizer(cfg.pretrain)
    self.graphdef = nnx.graphdef(models.abstract(cfg.model))
    self.abstract_state = abstract_state(cfg, self.tx)
    # Moments follow the parameter layout (the rules only read parameter names); scalars replicate.
    self.state_shardings = parallel.param_shardings(self.mesh, self.abstract_state)
    self.run_key = jax.random.PRNGKey(cfg.seed)
    self.train_step = jax.jit(make_train_step(cfg, self.graphdef, self.tx),
                              in_shardings=(self.state_shardings,
                                            parallel.batch_sharding(self.mesh),
                                            parallel.replicated(self.mesh)),
                              out_shardings=(self.state_shardings, parallel.replicated(self.mesh)),
                              donate_argnums=(0,))
    params_sh = self.state_shardings['params']
    self.eval_step = jax.jit(make_eval_step(cfg, self.graphdef),
                             in_shardings=(params_sh, parallel.batch_sharding(self.mesh),
                                           parallel.replicated(self.mesh)))

  def abstract_state_sharded(self):
    return jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                        self.abstract_state, self.state_shardings)

  def fresh_state(self):
    cfg, tx = self.cfg, self.tx
    fn = jax.jit(lambda: _fresh_state(cfg, tx, cfg.seed), out_shardings=self.state_shardings)
    return fn()


def abstract_state(cfg, tx) -> dict:
  """Shapes and dtypes of the train state, without allocating it."""
  return jax.eval_shape(lambda: _fresh_state(cfg, tx, 0))



def checkpoint_meta(cfg, job: str, extra: dict | None = None) -> dict:
  meta = {'job': job, 'seed': int(cfg.seed), 'config': cfg.to_dict(),
          'data': {k: cfg.data[k] for k in ('source', 'tokenizer', 'paths')},
          'jax_version': jax.__version__, 'devices': jax.device_count()}
  meta.update(extra or {})
  return meta


def evaluate_nelbo(trainer: Trainer, params, batches, seed: int = 0) -> dict:
  """exp(mean per-token NELBO) over fixed validation batches with fixed keys."""
  total, count = 0.0, 0.0
  key = jax.random.PRNGKey(seed)
  for i, b in enumerate(batches):
    s, c = trainer.eval_step(params, parallel.global_batch(trainer.mesh, b),
                             jax.random.fold_in(key, i))
    total += float(s)
    count += float(c)
  nelbo = total / max(count, 1.0)
  return {'nelbo': nelbo, 'ppl': float(np.exp(min(nelbo, 50.0)))}


def run(cfg, workdir: str) -> dict:
  """The pre-training job: resumes from WORKDIR/checkpoints, stops cleanly on SIGTERM/SIGINT."""
  pcfg = cfg.pretrain
  os.makedirs(workdir, exist_ok=True)
  trainer = Trainer(cfg, workdir)
  mngr = Manager(os.path.join(workdir, 'checkpoints'), keep=cfg.checkpoint.keep,
                 async_save=cfg.checkpoint.async_save)
  L = cfg.model.length
  # Every host reads the same global batch (a few MB) and places only its devices' rows.
  it = pipeline.TrainIterator(cfg.data, L, pcfg.batch_size, seed=cfg.data.shuffle_seed)
  valid = pipeline.eval_batches(cfg.data, L, pcfg.batch_size, pcfg.eval_batches)
  job = loop.Job('pretrain', 'step', pcfg.num_steps, 'pretrain.num_steps', pcfg.batch_size * L,
                 pcfg.log_every, cfg.checkpoint.every, ('loss', 'grad_norm'), 'loss')
  state, first = loop.start(job, mngr, trainer.abstract_state_sharded, trainer.fresh_state, it)

  def step_fn(state):
    return trainer.train_step(state, parallel.global_batch(trainer.mesh, next(it)),
                              trainer.run_key)

  def validate(step, state):
    del step
    ev = evaluate_nelbo(trainer, state['ema'], valid)
    ev_raw = evaluate_nelbo(trainer, state['params'], valid)
    return {'valid_nelbo_ema': ev['nelbo'], 'valid_ppl_ema': ev['ppl'],
            'valid_nelbo': ev_raw['nelbo'], 'valid_ppl': ev_raw['ppl']}

  out = loop.run(job, workdir=workdir, mngr=mngr, state=state, first=first, step_fn=step_fn,
                 meta=checkpoint_meta(cfg, 'pretrain'), iterator=it,
                 tensorboard=cfg.logging.tensorboard,
                 periodic=[loop.Periodic(pcfg.eval_every, validate, 'eval')])
  return {'step': out.step, 'complete': out.complete, **out.last_periodic}
