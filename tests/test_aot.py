"""didi_jax.aot: the real steps compiled for TPU topology descriptions (libtpu, no TPU needed).

Tiny models on v5e 2x2 and v5p 2x2x2: the report's numbers are the compiler's, the chip figures
the published ones, donation is accounted, a batch that cannot fit is refused with the one-line
fix (and the fix fits), multi-slice meshes span the slices on the data axis, impossible TPU
settings fail in one line, and --measure runs a step on the attached devices.
"""
import json
import os
import subprocess
import sys

import jax
import pytest

from didi_jax import config as config_lib
from didi_jax import parallel
from didi_jax.sampling import cost as cost_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GiB = 1024 ** 3

pytest.importorskip('libtpu', reason="the AOT check needs the libtpu wheel: pip install -e '.[tpu]'")
from didi_jax import aot  # noqa: E402  pylint: disable=wrong-import-position


def tiny_cfg(length=32, vocab=258, tokenizer='byte'):
  cfg = config_lib.base_config()
  cfg.data.source = 'shakespeare'
  cfg.data.tokenizer = tokenizer
  cfg.model = config_lib.model_config('tiny', vocab_size=vocab, length=length)
  cfg.pretrain.batch_size = 16
  cfg.distill.batch_size = 8
  cfg.distill.group_size = 2
  cfg.distill.disc_unfreeze_blocks = 1
  cfg.distill.loss_chunk_len = 16
  cfg.sample.batch_size = 8
  cfg.sampler.steps = 4
  return cfg


@pytest.fixture(scope='module')
def v5e():
  return aot.make_target('v5e:2x2')


@pytest.fixture(scope='module')
def v5p():
  return aot.make_target('v5p:2x2x2')


@pytest.fixture(scope='module')
def pretrain_v5e(v5e):
  return aot.analyse(tiny_cfg(), 'pretrain', v5e)


@pytest.fixture(scope='module')
def distill_v5p(v5p):
  return aot.analyse(tiny_cfg(), 'distill', v5p)


def test_chip_table_is_the_published_figures():
  # Cloud TPU documentation: HBM per chip, dense bf16 FLOP/s per chip, HBM bandwidth per chip.
  assert aot.CHIPS['v4'] == aot.Chip('TPU v4', 32 * GiB, 275e12, 1200e9)
  assert aot.CHIPS['v5e'] == aot.Chip('TPU v5e', 16 * GiB, 197e12, 819e9)
  assert aot.CHIPS['v5p'] == aot.Chip('TPU v5p', 95 * GiB, 459e12, 2765e9)
  assert aot.CHIPS['v6e'] == aot.Chip('TPU v6e', 32 * GiB, 918e12, 1640e9)


def test_topology_descriptions(v5e, v5p):
  assert (len(v5e.devices), v5e.num_hosts, v5e.device_kind, v5e.chip.name) == \
      (4, 1, 'TPU v5 lite', 'TPU v5e')
  assert (len(v5p.devices), v5p.num_hosts, v5p.chip.name) == (8, 2, 'TPU v5p')
  assert aot.make_target('v5p-8').topology == 'v5p:2x2x1'
  assert len(aot.make_target('v4-32').devices) == 16            # megacore: one device per chip
  with pytest.raises(aot.AotError, match='not a TPU topology'):
    aot.make_target('v9000')


def _check_report_is_the_compilers(report, compiled, chip):
  m = compiled.memory_analysis()
  mem = report['memory']
  assert mem['argument_bytes'] == m.argument_size_in_bytes
  assert mem['output_bytes'] == m.output_size_in_bytes
  assert mem['alias_bytes'] == m.alias_size_in_bytes
  assert mem['temp_bytes'] == m.temp_size_in_bytes
  assert mem['generated_code_bytes'] == m.generated_code_size_in_bytes
  assert mem['total_bytes'] == (m.argument_size_in_bytes + m.output_size_in_bytes
                                - m.alias_size_in_bytes + m.temp_size_in_bytes
                                + m.generated_code_size_in_bytes)
  assert mem['hbm_bytes'] == chip.hbm_bytes
  assert mem['fraction_of_hbm'] == pytest.approx(mem['total_bytes'] / chip.hbm_bytes)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  c = report['cost']
  assert c['flops_per_device'] == cost['flops'] > 0
  assert c['bytes_accessed_per_device'] == cost['bytes accessed'] > 0
  rf = report['roofline']
  step = max(c['estimate_flops_per_device'] / chip.peak_flops,
             c['estimate_bytes_per_device'] / chip.hbm_bandwidth)
  assert rf['estimate'] is True
  assert rf['seconds_per_step'] == pytest.approx(step)
  assert rf['tokens_per_second'] == pytest.approx(report['tokens_per_step'] / step)
  assert report['compile_seconds'] > 0


def test_pretrain_v5e(pretrain_v5e, v5e):
  report, compiled = pretrain_v5e
  _check_report_is_the_compilers(report, compiled, aot.CHIPS['v5e'])
  assert report['mesh'] == {'data': 4, 'fsdp': 1, 'tensor': 1}
  assert (report['devices'], report['hosts'], report['global_batch']) == (4, 1, 16)
  assert report['tokens_per_step'] == 16 * 32
  # Donation accounted: the whole (replicated) train state is aliased by the outputs.
  assert report['memory']['alias_bytes'] >= 0.99 * report['donated_bytes'] > 0
  # The compiler's FLOPs: at least the model's (pretrain has no loops to undercount).
  assert report['cost']['flops_per_device'] >= 0.9 * report['cost']['model_flops_per_step'] / 4
  v = report['verdict']
  assert v['fits'] is True and v['fix'] is None
  assert v['rows_per_device'] == 4 and v['max_global_batch'] % 4 == 0
  text = aot.format_report(report)
  assert 'ESTIMATE' in text and 'verdict: fits' in text and 'TPU v5 lite' in text


def test_pretrain_v5p_two_hosts(v5p):
  report, compiled = aot.analyse(tiny_cfg(), 'pretrain', v5p)
  _check_report_is_the_compilers(report, compiled, aot.CHIPS['v5p'])
  assert (report['devices'], report['hosts'], report['mesh']['data']) == (8, 2, 8)
  assert report['verdict']['rows_per_device'] == 2


def test_distill_v5p(distill_v5p):
  report, compiled = distill_v5p
  _check_report_is_the_compilers(report, compiled, aot.CHIPS['v5p'])
  assert report['tokens_per_step'] == 8 * 2 * 32          # B x G x L student tokens
  assert report['memory']['alias_bytes'] >= 0.99 * report['donated_bytes'] > 0
  assert report['verdict']['fits'] is True
  assert 'lax.map' in report['cost']['loop_note']


def test_distill_v5e(v5e):
  cfg = tiny_cfg()
  cfg.distill.real_source = 'teacher_samples'        # the buffer is part of the donated state
  cfg.distill.teacher_buffer.size = 64
  cfg.distill.teacher_buffer.refresh_count = 32
  report, compiled = aot.analyse(cfg, 'distill', v5e)
  _check_report_is_the_compilers(report, compiled, aot.CHIPS['v5e'])
  assert report['memory']['argument_bytes'] >= 64 * 32 * 4    # the (64, 32) int32 buffer


def test_sdtt_distill_v5e(v5e):
  cfg = tiny_cfg()
  cfg.distill.method = 'sdtt'                        # its own step, state and batch key
  cfg.distill.sdtt.batch_size = 16
  report, compiled = aot.analyse(cfg, 'distill', v5e)
  _check_report_is_the_compilers(report, compiled, aot.CHIPS['v5e'])
  assert report['tokens_per_step'] == 16 * 32          # B x L data tokens
  assert report['verdict']['batch_key'] == 'distill.sdtt.batch_size'
  assert report['verdict']['fits'] is True
  assert report['memory']['alias_bytes'] >= 0.99 * report['donated_bytes'] > 0
  assert report['cost']['loop_note'] == ''               # SDTT has no chunked loss loop
  assert report['cost']['model_flops_per_step'] == 5 * 16 * cost_lib.student_forward_flops(
      cfg.model)                                       # two teacher forwards + fwd/bwd


def test_rgas_sampler_v5e(v5e):
  cfg = tiny_cfg()
  cfg.sampler.kind = 'rgas'
  report, compiled = aot.analyse(cfg, 'sample', v5e)
  _check_report_is_the_compilers(report, compiled, aot.CHIPS['v5e'])
  assert report['donated'] == 'nothing' and report['memory']['alias_bytes'] == 0
  c = report['cost']
  assert c['estimate_bytes_per_device'] == 4 * c['bytes_accessed_per_device']     # 4 steps
  assert c['estimate_flops_per_device'] >= c['model_flops_per_step'] / 4


def test_too_big_is_refused_with_a_fix_that_fits(tmp_path):
  # GPT-2 vocabulary at L=512, float32: 256 rows per v5e chip (~0.1 GiB of temporaries each)
  # cannot fit 16 GiB. The CLI refuses (exit 1) with one line naming the batch that fits.
  out = tmp_path / 'aot.json'
  cmd = [sys.executable, '-m', 'didi_jax.aot', '--config=configs/demo.py:smoke',
         '--topology=v5e:2x2', '--job=pretrain', '--config.data.tokenizer=gpt2',
         '--config.model.vocab_size=50258', '--config.model.length=512',
         '--config.pretrain.batch_size=1024', f'--json={out}']
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
                        check=False)
  assert proc.returncode == 1, (proc.stdout[-2000:], proc.stderr[-2000:])
  report = json.loads(out.read_text())
  v = report['verdict']
  # The TPU compiler itself refuses the program; its figures are the report's.
  assert 'RESOURCE_EXHAUSTED' in report['compiler_refused']
  mem = report['memory']
  assert mem['temp_bytes'] > mem['hbm_bytes'] and 15 * GiB < mem['hbm_bytes'] <= 16 * GiB
  assert v['fits'] is False and mem['total_bytes'] == mem['argument_bytes'] + mem['temp_bytes']
  verdict_lines = [l for l in proc.stdout.splitlines() if l.startswith('verdict:')]
  assert len(verdict_lines) == 1
  line = verdict_lines[0]
  assert line.startswith('verdict: DOES NOT FIT') and '--config.model.remat=True' in line
  assert f'--config.pretrain.batch_size={v["max_global_batch"]} (confirmed by a compile' in line
  assert v['confirmed_batch'] == v['max_global_batch']
  assert '| TOTAL / device' in proc.stdout and 'ESTIMATE' in proc.stdout
  # The table and the JSON carry the same numbers.
  assert f'{mem["total_bytes"] / GiB:.2f} GiB of {mem["hbm_bytes"] / GiB:.2f} GiB' in proc.stdout
  assert 'REFUSED (out of HBM)' in proc.stdout
  # The suggested batch (a multiple of the 4 devices) was compiled by the tool and fits.
  max_batch = v['max_global_batch']
  assert 4 <= max_batch < 1024 and max_batch % 4 == 0
  assert v['confirmed_total_bytes'] <= mem['hbm_bytes']


def test_multislice_mesh_spans_slices_on_data():
  target = aot.make_target('v5e:2x2', num_slices=2)
  assert len(target.devices) == 8 and target.num_slices == 2
  assert parallel.num_slices(target.devices) == 2
  mesh = parallel.make_mesh(config_lib.base_config().mesh, target.devices)
  assert dict(mesh.shape) == {'data': 8, 'fsdp': 1, 'tensor': 1}
  slices = [d.slice_index for d in mesh.devices[:, 0, 0]]
  assert slices == [0] * 4 + [1] * 4            # DCN is the outer factor of `data`
  cfg = config_lib.base_config()
  cfg.mesh.data, cfg.mesh.fsdp = 1, -1
  with pytest.raises(ValueError, match='multiple of the slice count'):
    parallel.make_mesh(cfg.mesh, target.devices)
  report, _ = aot.analyse(tiny_cfg(), 'pretrain', target)
  assert (report['num_slices'], report['devices'], report['verdict']['fits']) == (2, 8, True)


@pytest.mark.parametrize('job,override,message', [
    ('sample', ('sampler', 'precision', 'float64'), 'not supported on TPU'),
    ('distill', ('sampler', 'precision', 'float64'), 'not supported on TPU'),
    ('pretrain', ('model', 'attention_impl', 'cudnn'), 'GPU kernel'),
    ('pretrain', ('pretrain', 'batch_size', 6), 'not divisible'),
])
def test_impossible_settings_fail_in_one_line(v5e, job, override, message):
  cfg = tiny_cfg()
  section, key, value = override
  cfg[section][key] = value
  with pytest.raises(aot.AotError, match=message) as e:
    aot.analyse(cfg, job, v5e)
  assert '\n' not in str(e.value)


def test_cli_one_line_config_error():
  cmd = [sys.executable, '-m', 'didi_jax.aot', '--config=configs/demo.py:smoke',
         '--topology=v5e:2x2', '--job=sample', '--config.sampler.precision=float64']
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
                        check=False)
  assert proc.returncode == 2
  assert proc.stderr.strip().count('\n') == 0
  assert proc.stderr.startswith('config error: --config.sampler.precision=float64 is not '
                                'supported on TPU')


def test_measure_on_the_attached_devices():
  cfg = tiny_cfg()
  cfg.model.compute_dtype = 'float32'
  report, compiled = aot.analyse(cfg, 'pretrain', aot.make_target('local'), measure=True)
  assert report['measured'] is True and report['platform'] == jax.devices()[0].platform
  stats = jax.devices()[0].memory_stats()
  if stats is None:                     # CPU keeps no statistics: shown as n/a
    assert report['measured_peak_bytes'] is None
    assert 'n/a (this backend keeps no memory statistics)' in aot.format_report(report)
  else:
    assert report['measured_peak_bytes'] == stats['peak_bytes_in_use'] > 0
  assert report['memory']['total_bytes'] == aot.memory_report(compiled)['total_bytes']
