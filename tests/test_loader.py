"""The model factory (didi_jax.models) and the one loader (didi_jax.checkpoint.loader).

Run directories are written here directly with the Manager (the states the jobs save), so each
network the loader returns is compared bit for bit with the array the job stored under that name.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from didi_jax import models
from didi_jax.checkpoint import exporter
from didi_jax.checkpoint import loader
from didi_jax.checkpoint.manager import Manager
from didi_jax.models.discriminator import Discriminator
from didi_jax.models.interface import Denoiser
from didi_jax.train import distill_state as ds
from didi_jax.train import pretrain
from tests.test_distill import teacher_params, tiny_cfg


def leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def assert_same(a, b):
  la, lb = leaves(a), leaves(b)
  assert len(la) == len(lb) and la
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(x, y)


def perturbed(tree, seed):
  flat, tdef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.key(seed), len(flat))
  return jax.tree.unflatten(tdef, [x + jax.random.normal(k, x.shape) for x, k in zip(flat, keys)])


def save(path, step, state, cfg, job):
  mngr = Manager(str(path / 'checkpoints'), async_save=False)
  mngr.save(step, state, {}, pretrain.checkpoint_meta(cfg, job))
  mngr.close()


@pytest.fixture(scope='module')
def distill_run(tmp_path_factory):
  """A distillation run dir whose student, EMA and discriminator all differ from each other."""
  cfg = tiny_cfg()
  state = ds.init_distill_state(cfg, teacher_params(cfg), jax.random.key(3))
  state = state.replace(student=perturbed(state.student, 1), ema=perturbed(state.ema, 2),
                        disc_train=perturbed(state.disc_train, 4),
                        disc_frozen=perturbed(state.disc_frozen, 5),
                        spectral=perturbed(state.spectral, 6))
  path = tmp_path_factory.mktemp('distill_run')
  save(path, 7, state, cfg, 'distill')
  return path, cfg, state


def test_distill_run_networks_are_the_stored_arrays(distill_run):
  path, cfg, state = distill_run
  assert_same(loader.load(str(path), 'student').params, state.student)
  assert_same(loader.load(str(path), 'student_ema').params, state.ema)
  disc = loader.load(str(path), 'discriminator')
  # The stored discriminator is split into trainable and frozen groups: reassemble it from the
  # state the way the distillation step does, and compare every parameter and u, v.
  want = nnx.merge(ds.make_graphdefs(cfg)[1], state.disc_train, state.disc_frozen,
                   state.spectral)
  got = disc.model()
  assert isinstance(got, Discriminator)
  want_flat, got_flat = dict(nnx.to_flat_state(nnx.state(want))), dict(
      nnx.to_flat_state(nnx.state(got)))
  assert sorted(want_flat) == sorted(got_flat)
  for path, w in want_flat.items():
    np.testing.assert_array_equal(np.asarray(w[...]), np.asarray(got_flat[path][...]),
                                  err_msg=str(path))
  # The loaded discriminator computes what the run's discriminator computes.
  x = jax.random.randint(jax.random.key(0), (2, cfg.model.length), 0, cfg.model.vocab_size - 1)
  s = jnp.array([0.3, 1.2])
  np.testing.assert_array_equal(np.asarray(got(x, s)), np.asarray(want(x, s)))


def test_pretrain_run_teacher_ema_and_raw(tmp_path):
  cfg = tiny_cfg()
  tx = pretrain.make_optimizer(cfg.pretrain)
  state = jax.jit(lambda: pretrain._fresh_state(cfg, tx, 0))()   # pylint: disable=protected-access
  state['params'] = perturbed(state['params'], 1)
  state['ema'] = perturbed(state['ema'], 2)
  save(tmp_path, 5, state, cfg, 'pretrain')
  assert_same(loader.load(str(tmp_path), 'teacher').params, state['ema'])
  assert_same(loader.load(str(tmp_path), 'teacher', weights='raw').params, state['params'])
  with pytest.raises(loader.CheckpointError, match='pre-training run'):
    loader.load(str(tmp_path), 'discriminator')


def test_wrong_roles_and_configs_are_one_line_errors(distill_run, tmp_path):
  path, cfg, state = distill_run
  with pytest.raises(loader.CheckpointError, match='teacher came from'):
    loader.load(str(path), 'teacher')
  with pytest.raises(ValueError, match='unknown network role'):
    loader.load(str(path), 'critic')
  # A run whose stored arrays do not cover the model its config describes.
  bigger = tiny_cfg()
  bigger.model.n_blocks = 3
  save(tmp_path, 1, {'ema': nnx.state(models.build(cfg.model), nnx.Param)}, bigger, 'pretrain')
  with pytest.raises(loader.CheckpointError, match='lacks'):
    loader.load(str(tmp_path), 'teacher')


def test_exported_file_loads_through_the_same_function(distill_run, tmp_path):
  path, cfg, state = distill_run
  f = exporter.save_ours(str(tmp_path / 'x.safetensors'),
                         {'student_ema': nnx.to_pure_dict(state.ema)}, model_cfg=cfg.model)
  net = loader.load(f, 'student_ema')
  assert_same(net.params, state.ema)
  assert int(net.model_cfg.n_blocks) == int(cfg.model.n_blocks)


def test_factory_builds_every_role_and_refuses_unknown_ones():
  cfg = tiny_cfg().model
  den = models.build(cfg, seed=0)
  assert isinstance(den, Denoiser)
  # The projection maps features to the logits the network returns.
  x = jnp.zeros((1, cfg.length), jnp.int32)
  s = jnp.ones((1,))
  np.testing.assert_allclose(np.asarray(den.projection(den.features(x, s))),
                             np.asarray(den(x, s)), rtol=0, atol=0)
  gd, params, spectral = models.split_abstract(cfg, 'discriminator')
  assert spectral is not None and all(isinstance(x, jax.ShapeDtypeStruct)
                                      for x in jax.tree.leaves(params))
  # Same seed, same parameters; the abstract build allocates nothing but has the same shapes.
  assert_same(nnx.state(models.build(cfg, seed=3), nnx.Param),
              nnx.state(models.build(cfg, seed=3), nnx.Param))
  assert [x.shape for x in jax.tree.leaves(models.split_abstract(cfg)[1])] == \
      [x.shape for x in jax.tree.leaves(nnx.state(den, nnx.Param))]
  ar = cfg.copy_and_resolve_references()
  ar.kind = 'ar'
  with pytest.raises(ValueError, match='has no discriminator'):
    models.build(ar, 'discriminator')
  ar.kind = 'transformer-xl'
  with pytest.raises(ValueError, match='not a known architecture'):
    models.build(ar)


def test_the_interface_input_contract_is_asserted_at_the_boundary():
  cfg = tiny_cfg().model
  den = models.build(cfg, seed=0)
  ids = jnp.zeros((2, cfg.length), jnp.int32)
  sigma = jnp.ones((2,))
  den(ids, sigma)                                                    # the contract
  den(jax.nn.one_hot(ids, cfg.vocab_size), sigma)                    # soft input (B, L, V)
  with pytest.raises(AssertionError):
    den(ids.astype(jnp.float32), sigma)                              # float "ids"
  with pytest.raises(AssertionError):
    den(ids, sigma[:, None])                                         # σ of shape (B, 1)
  with pytest.raises(AssertionError):
    den(jnp.zeros((2, cfg.length, cfg.vocab_size - 1)), sigma)       # soft input without [MASK]
  with pytest.raises(AssertionError):
    jax.jit(den)(ids[:1], sigma)                                     # batch sizes disagree


def test_any_architecture_round_trips_through_our_flat_format(tmp_path):
  cfg = tiny_cfg().model.copy_and_resolve_references()
  cfg.kind = 'ar'
  params = perturbed(nnx.state(models.build(cfg, seed=0), nnx.Param), 7)
  f = exporter.save_ours(str(tmp_path / 'ar.safetensors'), {'teacher': nnx.to_pure_dict(params)},
                         model_cfg=cfg)
  net = loader.load(f, 'ar')
  assert net.model_cfg.kind == 'ar' and int(net.model_cfg.hidden_size) == int(cfg.hidden_size)
  assert_same(net.params, params)
  two = exporter.save_ours(str(tmp_path / 'two.safetensors'),
                           {'teacher': nnx.to_pure_dict(params),
                            'student_ema': nnx.to_pure_dict(params)}, model_cfg=cfg)
  with pytest.raises(loader.CheckpointError, match='no student'):
    loader.load(two, 'student')
