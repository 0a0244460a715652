"""Protein data: tokenizers (ESM ids equal transformers'), the streaming FASTA / Swiss-Prot reader
on the Debian EMBOSS test files and on small written files, row layout and generated lengths."""
import gzip
import os

import numpy as np
import pytest

from didi_jax.data import protein as P
from didi_jax.errors import DataError

EMBOSS = '/usr/share/EMBOSS/test'
GLOBINS = f'{EMBOSS}/data/hmm/globins630.fa'
SWSMALL = f'{EMBOSS}/data/structure/swsmall.fasta'
SWISS = f'{EMBOSS}/swiss/seq.dat'
needs_emboss = pytest.mark.skipif(not os.path.exists(GLOBINS),
                                  reason='needs the emboss-test package (apt install emboss-test)')


# ------------------------------------------------------------------------------------ tokenizers


def test_esm_tokenizer_ids_equal_transformers(tmp_path):
  transformers = pytest.importorskip('transformers')
  from transformers.models.esm.configuration_esm import get_default_vocab_list
  assert P.ESM_TOKENS == tuple(get_default_vocab_list())
  (tmp_path / 'vocab.txt').write_text('\n'.join(P.ESM_TOKENS))
  hf = transformers.EsmTokenizer(str(tmp_path / 'vocab.txt'))
  ours = P.EsmTokenizer()
  assert (ours.bos_id, ours.pad_id, ours.eos_id, ours.unk_id, ours.mask_id) == (
      hf.cls_token_id, hf.pad_token_id, hf.eos_token_id, hf.unk_token_id, hf.mask_token_id)
  assert (ours.vocab_size, ours.model_vocab_size, len(hf)) == (32, 33, 33)
  for tok in P.ESM_TOKENS:
    assert ours.tokens.index(tok) == hf.convert_tokens_to_ids(tok)
  seqs = ['MKTAYIAKQRQISFVKSHFSRQ', 'LAGVSERTIDPKQNFYMHWCXBUZO', 'A', 'ACDEFGHIKLMNPQRSTVWY.-']
  for s in seqs:
    assert ours.encode(s) == hf.encode(s, add_special_tokens=False)
  rows = P.encode_rows(seqs[:2], 30, ours, layout='pad')
  for s, row in zip(seqs[:2], rows):
    want = hf(s, padding='max_length', max_length=30)['input_ids']
    assert row.tolist() == want               # <cls> residues <eos> <pad>... exactly as HF
  assert ours.encode('mkt') == ours.encode('MKT')
  assert ours.decode([0, 4, 5, 2, 1]) == '<cls>LA<eos><pad>'
  with pytest.raises(ValueError, match='leftover'):
    ours.decode([4, 32])


def test_protein_tokenizer_alphabet_and_errors():
  tok = P.ProteinTokenizer()
  assert tok.encode('ACDEFGHIKLMNPQRSTVWYUOBZX') == list(range(25))
  assert (tok.vocab_size, tok.eos_id, tok.bos_id, tok.pad_id, tok.mask_id) == (27, 25, 25, 26, 27)
  assert tok.encode_batch(['ac', 'W']) == [[0, 1], [18]]
  assert tok.decode([0, 1, 25, 26]) == 'AC<eos><pad>'
  with pytest.raises(DataError, match=r"character '\*' at position 2"):
    tok.encode('AC*')
  with pytest.raises(DataError, match="'é'"):
    tok.encode('Aé')
  assert P.get_protein_tokenizer('esm').name == 'esm'
  with pytest.raises(ValueError, match='protein'):
    P.get_protein_tokenizer('bpe')


# ---------------------------------------------------------------------------------- real files


@needs_emboss
def test_reads_emboss_fasta_and_swissprot():
  recs = list(P.iter_records(GLOBINS))
  assert len(recs) == 630
  assert recs[0] == P.Record('BAHG_VITSP', recs[0].sequence, 1, GLOBINS)
  # the first record spans three lines and has lower-case residues ("...DAWGKAYGVIADVfiqvead...")
  assert recs[0].sequence.startswith('MLDQQTINIIKATVPVLKEHG') and len(recs[0].sequence) == 146
  assert 'DAWGKAYGVIADVFIQVEADLYAQAVE' in recs[0].sequence
  assert recs[-1].name == 'MYG_ZIPCA' and recs[-1].line == 2517
  assert sum(len(r.sequence) for r in recs) == 91425
  assert all(set(r.sequence) <= set(P.RESIDUES) for r in recs)
  # swsmall: 143 records, 126 distinct sequences
  sw = list(P.iter_records(SWSMALL))
  assert len(sw) == 143 and len({r.sequence for r in sw}) == 126
  assert len(list(P.iter_records(SWSMALL, dedup=True))) == 126
  # Swiss-Prot flat file: 100 entries, sequence lengths equal the ID line's "N AA"
  sp = list(P.iter_records(SWISS))
  assert len(sp) == 100 and sp[0].name == 'CRU4_ARATH' and len(sp[0].sequence) == 472
  assert sp[-1].name == 'UBR5_RAT' and sp[-1].line == 18461
  with open(SWISS) as f:
    declared = [int(line.split()[-2]) for line in f if line.startswith('ID ')]
  assert [len(r.sequence) for r in sp] == declared
  # several files and a glob, in order; dedup across files
  both = list(P.iter_records([GLOBINS, f'{EMBOSS}/data/structure/sws*.fasta']))
  assert len(both) == 630 + 143 and both[630].path == SWSMALL


# ------------------------------------------------------------------------------ written files


def _fa(tmp_path, name, text, gz=False):
  p = tmp_path / name
  if gz:
    with gzip.open(p, 'wt') as f:
      f.write(text)
  else:
    p.write_text(text)
  return str(p)


def test_gzip_stop_codon_lowercase_and_comments(tmp_path):
  text = '>a desc\nmkt\nAY*\n\n;comment\n>b\nWWW\n'
  plain = list(P.iter_records(_fa(tmp_path, 'x.fa', text)))
  gz = list(P.iter_records(_fa(tmp_path, 'x.fa.gz', text, gz=True)))
  assert [(r.name, r.sequence, r.line) for r in plain] == [('a', 'MKTAY', 1), ('b', 'WWW', 6)]
  assert [(r.name, r.sequence, r.line) for r in gz] == [('a', 'MKTAY', 1), ('b', 'WWW', 6)]


def test_streams_without_reading_the_whole_file(tmp_path):
  path = _fa(tmp_path, 'big.fa', ''.join(f'>s{i}\nACDE\n' for i in range(1000)) + '>bad\nAC#\n')
  it = P.iter_records(path)
  assert next(it).name == 's0'          # the bad record at the end is not read yet
  with pytest.raises(DataError, match='bad'):
    list(it)


@pytest.mark.parametrize('text,line,what', [
    ('>ok\nACD\n>p1 x\nAC\nDE1F\n', 5, "record 'p1' has invalid character '1'"),
    ('>ok\nAC*D\n', 2, "record 'ok' has invalid character '*'"),
    ('>ok\nAC*\nDD\n', 3, 'after the stop codon'),
    ('>g\nAC-D\n', 2, "invalid character '-'"),
])
def test_invalid_characters_name_file_record_and_line(tmp_path, text, line, what):
  path = _fa(tmp_path, 'bad.fa', text)
  with pytest.raises(DataError) as e:
    list(P.iter_records(path))
  msg = str(e.value)
  assert f'{path}:{line}:' in msg and what in msg and '\n' not in msg


def test_empty_duplicate_only_and_malformed_files(tmp_path):
  empty = _fa(tmp_path, 'empty.fa', '\n\n')
  with pytest.raises(DataError, match='empty file'):
    list(P.iter_records(empty))
  gz_empty = _fa(tmp_path, 'empty.fa.gz', '', gz=True)
  with pytest.raises(DataError, match='empty file'):
    list(P.iter_records(gz_empty))
  first = _fa(tmp_path, 'a.fa', '>a\nMKT\n>b\nMKV\n')
  dup = _fa(tmp_path, 'dup.fa', '>c\nmkt\n>d\nMKV\n')
  assert [r.name for r in P.iter_records([first, dup])] == ['a', 'b', 'c', 'd']
  with pytest.raises(DataError, match='all 2 records are duplicates') as e:
    list(P.iter_records([first, dup], dedup=True))
  assert 'dup.fa' in str(e.value)
  with pytest.raises(DataError, match='no residues'):
    list(P.iter_records(_fa(tmp_path, 'e.fa', '>x\n>y\nAA\n')))
  with pytest.raises(DataError, match='neither FASTA'):
    list(P.iter_records(_fa(tmp_path, 't.txt', 'hello\n')))
  with pytest.raises(DataError, match='no file matches'):
    list(P.iter_records(str(tmp_path / 'nothing*.fa')))
  with pytest.raises(DataError, match='does not exist'):
    list(P.iter_records(str(tmp_path / 'missing.fa')))


def test_long_records_crop_window_and_skip(tmp_path):
  seq = ''.join(P.STANDARD_RESIDUES[i % 20] for i in range(41))
  path = _fa(tmp_path, 'long.fa', f'>long\n{seq}\n>short\nACD\n')
  # crop: every window is a length-40 substring; over seeds both possible starts (0 and 1) occur
  starts = set()
  for seed in range(40):
    recs = list(P.iter_records(path, max_length=40, seed=seed))
    assert recs[1].sequence == 'ACD'
    s = recs[0].sequence
    assert len(s) == 40 and seq.find(s) >= 0
    starts.add(seq.find(s))
  assert starts == {0, 1}
  # reproducible, and a function of the record (not of its position in the stream)
  a = list(P.iter_records(path, max_length=10, seed=3))[0].sequence
  b = list(P.iter_records(path, max_length=10, seed=3))[0].sequence
  assert a == b and len(a) == 10
  other = _fa(tmp_path, 'other.fa', f'>x\nAAA\n>long\n{seq}\n')
  assert list(P.iter_records(other, max_length=10, seed=3))[1].sequence == a
  # window starts cover [0, n − L] uniformly (n = 41, L = 10: 32 starts)
  st = [P.crop_start(41, 10, k, 'long', seq) for k in range(3000)]
  assert min(st) == 0 and max(st) == 31 and abs(np.mean(st) - 15.5) < 0.6
  # skip
  assert [r.name for r in P.iter_records(path, max_length=40, long_records='skip')] == ['short']
  only_long = _fa(tmp_path, 'ol.fa', f'>long\n{seq}\n')
  with pytest.raises(DataError, match='longer than max_length=40'):
    list(P.iter_records(only_long, max_length=40, long_records='skip'))
  with pytest.raises(DataError, match='long_records'):
    list(P.iter_records(path, long_records='trim'))


# ------------------------------------------------------------------------------------------ rows


def test_rows_layouts_and_lengths():
  tok = P.ProteinTokenizer()
  rows = P.encode_rows(['ACD', 'W', 'MKTAYIA'], 8, tok)
  assert rows.tolist() == [[0, 1, 2, 25, 25, 25, 25, 25],
                           [18, 25, 25, 25, 25, 25, 25, 25],
                           [10, 8, 16, 0, 19, 7, 0, 25]]
  padded = P.encode_rows(['ACD'], 8, tok, layout='pad')
  assert padded.tolist() == [[0, 1, 2, 25, 26, 26, 26, 26]]
  assert P.maskable_positions(padded, tok).tolist() == [[True] * 3 + [False] * 5]
  with pytest.raises(DataError, match='max_length=7'):
    P.encode_rows(['MKTAYIAK'], 8, tok)
  esm = P.EsmTokenizer()
  r = P.encode_rows(['ACD'], 7, esm)                 # <cls> by default for ESM, EOS as fill
  assert r.tolist() == [[0, 5, 23, 13, 2, 2, 2]]
  assert P.residue_capacity(7, True) == 5
  # generated lengths: first EOS, after a leading BOS; no EOS -> full length
  gen = np.array([[0, 5, 5, 2, 7, 2, 2], [0, 5, 5, 5, 5, 5, 5], [0, 2, 2, 2, 2, 2, 2]])
  lengths, has = P.generated_lengths(gen, esm.eos_id, bos_id=esm.bos_id)
  assert lengths.tolist() == [2, 6, 0] and has.tolist() == [True, False, True]
  d = P.length_distribution(gen, esm)
  assert d['mean'] == pytest.approx(8 / 3) and d['no_eos_fraction'] == pytest.approx(1 / 3)
  assert d['std'] == pytest.approx(np.std([2, 6, 0])) and d['q50'] == 2.0 and d['max'] == 6
  decoded = P.protein_strings(np.array([[0, 5, 32, 1, 2, 2, 2]]), esm)
  assert decoded.sequences == ['AXX'] and decoded.invalid_tokens == 2
  assert esm.to_protein([0, 4, 5, 2, 4]) == 'LA'
  lengths, _ = P.generated_lengths(rows, tok.eos_id, bos_id=tok.bos_id)   # BOS == EOS: no skip
  assert lengths.tolist() == [3, 1, 7]
