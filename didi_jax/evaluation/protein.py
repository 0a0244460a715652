"""Judge-free protein metrics: generated sequences against the training data (host NumPy, float64),
an optional structure hook, and a denoiser's NELBO of token rows.

Definitions (all on upper-case one-letter strings, e.g. `data.protein.protein_strings(...)`):

* Composition: frequencies of the 20 standard residues over all residues of a set (rare / unknown
  letters U O B Z X are counted apart in `other_fraction`). `kl` = KL(generated ‖ reference),
  `kl_reverse` = KL(reference ‖ generated), `js` = Jensen–Shannon divergence (½KL(P‖M) + ½KL(Q‖M),
  M = ½(P+Q), ≤ ln 2), all in nats; terms with P(a) = 0 are 0, a residue present in P but absent
  from Q makes KL(P‖Q) = inf (reported as is, never clipped) unless `pseudocount` > 0 is added to
  every count. `per_residue` lists both frequencies and log(P/Q) per residue.
* Lengths: count, mean, std, min, max, quantiles of each set; `ks` = two-sample Kolmogorov–
  Smirnov statistic sup_x |F_gen(x) − F_ref(x)|; `wasserstein` = ∫ |F_gen − F_ref| dx (residues).
* Diversity: `unique_fraction` = #distinct / #sequences. `mean_identity` over all pairs of a
  seeded subsample of at most `max_sequences` sequences. identity='position' (default):
  alignment-free, id(a, b) = #{i < m : a_i = b_i} / m with m = min(|a|, |b|) (0 pairs with m = 0
  are skipped). identity='lcs': the best global alignment with match 1, mismatch 0, gap 0
  (= longest common subsequence) divided by m — shift-aware, but ≈ 0.3 for unrelated sequences.
* Repetition: `kmer_repeat` = mean over sequences with ≥ k residues of (1 − distinct k-mers /
  k-mers); `homopolymer_mean` / `homopolymer_max` = the longest run of one residue per sequence.
* Structure: `StructureScorer` — any callable `list[str] -> (N,) pLDDT in [0, 100]` the user
  supplies (e.g. `esmfold_scorer()`); the `plddt_*` entries exist only when one is given.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from didi_jax import diffusion
from didi_jax.data.protein import QUANTILES, STANDARD_RESIDUES, length_summary

AMINO_ACIDS = STANDARD_RESIDUES
_INDEX = np.full(128, -1, np.int64)
for _k, _c in enumerate(AMINO_ACIDS):
  _INDEX[ord(_c)] = _k


def _codes(seq: str) -> np.ndarray:
  return np.frombuffer(seq.encode('ascii'), np.uint8)


# ----------------------------------------------------------------------------------- composition


def residue_counts(sequences: Sequence[str]) -> tuple[np.ndarray, int]:
  """(counts (20,) over AMINO_ACIDS, number of other letters)."""
  counts = np.zeros(len(AMINO_ACIDS), np.int64)
  other = 0
  for s in sequences:
    idx = _INDEX[np.minimum(_codes(s.upper()), 127)]
    counts += np.bincount(idx[idx >= 0], minlength=len(AMINO_ACIDS))
    other += int((idx < 0).sum())
  return counts, other


def kl_divergence(p: np.ndarray, q: np.ndarray) -> float:
  """Σ p log(p/q) in nats; 0 where p = 0; inf where p > 0 = q."""
  p = np.asarray(p, np.float64)
  q = np.asarray(q, np.float64)
  on = p > 0
  if np.any(q[on] == 0):
    return math.inf
  return float(np.sum(p[on] * np.log(p[on] / q[on])))


def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
  m = 0.5 * (np.asarray(p, np.float64) + np.asarray(q, np.float64))
  return 0.5 * kl_divergence(p, m) + 0.5 * kl_divergence(q, m)


def composition_divergence(generated: Sequence[str], reference: Sequence[str], *,
                           pseudocount: float = 0.0) -> dict:
  cg, og = residue_counts(generated)
  cr, orf = residue_counts(reference)
  if cg.sum() == 0 or cr.sum() == 0:
    raise ValueError('composition needs standard residues in both the generated and the '
                     'reference sequences')
  p = (cg + pseudocount) / (cg.sum() + pseudocount * len(cg))
  q = (cr + pseudocount) / (cr.sum() + pseudocount * len(cr))
  with np.errstate(divide='ignore', invalid='ignore'):
    ratio = np.log(p / q)
  per = {a: {'generated': float(p[i]), 'reference': float(q[i]), 'log_ratio': float(ratio[i])}
         for i, a in enumerate(AMINO_ACIDS)}
  return {'kl': kl_divergence(p, q), 'kl_reverse': kl_divergence(q, p), 'js': js_divergence(p, q),
          'per_residue': per,
          'other_fraction_generated': og / max(og + int(cg.sum()), 1),
          'other_fraction_reference': orf / max(orf + int(cr.sum()), 1)}


# --------------------------------------------------------------------------------------- lengths


def ks_statistic(a: Sequence[float], b: Sequence[float]) -> float:
  """Two-sample KS: max over x of |F_a(x) − F_b(x)| (right-continuous empirical CDFs)."""
  a = np.sort(np.asarray(a, np.float64))
  b = np.sort(np.asarray(b, np.float64))
  x = np.concatenate([a, b])
  fa = np.searchsorted(a, x, side='right') / len(a)
  fb = np.searchsorted(b, x, side='right') / len(b)
  return float(np.max(np.abs(fa - fb)))


def wasserstein_1d(a: Sequence[float], b: Sequence[float]) -> float:
  """W1 = ∫ |F_a(x) − F_b(x)| dx of the empirical distributions."""
  a = np.sort(np.asarray(a, np.float64))
  b = np.sort(np.asarray(b, np.float64))
  x = np.sort(np.concatenate([a, b]))
  dx = np.diff(x)
  fa = np.searchsorted(a, x[:-1], side='right') / len(a)
  fb = np.searchsorted(b, x[:-1], side='right') / len(b)
  return float(np.sum(np.abs(fa - fb) * dx))


def length_comparison(generated_lengths: Sequence[int], reference_lengths: Sequence[int]) -> dict:
  return {'generated': length_summary(generated_lengths),
          'reference': length_summary(reference_lengths),
          'ks': ks_statistic(generated_lengths, reference_lengths),
          'wasserstein': wasserstein_1d(generated_lengths, reference_lengths)}


# ------------------------------------------------------------------------------------- diversity


def position_identity(a: str, b: str) -> float:
  m = min(len(a), len(b))
  if m == 0:
    return math.nan
  return float(np.mean(_codes(a[:m]) == _codes(b[:m])))


def lcs_length(a: str, b: str) -> int:
  """Longest common subsequence, row by row: C_i = cummax(max(C_{i−1}, shift(C_{i−1}) + match))."""
  x, y = _codes(a), _codes(b)
  prev = np.zeros(len(y) + 1, np.int64)
  for c in x:
    d = np.maximum(prev[1:], prev[:-1] + (y == c))
    prev = np.concatenate([[0], np.maximum.accumulate(d)])
  return int(prev[-1])


def lcs_identity(a: str, b: str) -> float:
  m = min(len(a), len(b))
  return math.nan if m == 0 else lcs_length(a, b) / m


IDENTITIES = {'position': position_identity, 'lcs': lcs_identity}


def diversity(sequences: Sequence[str], *, identity: str = 'position', max_sequences: int = 200,
              seed: int = 0) -> dict:
  if identity not in IDENTITIES:
    raise ValueError(f'identity={identity!r} is not valid: use one of {sorted(IDENTITIES)}')
  seqs = list(sequences)
  if not seqs:
    raise ValueError('diversity needs at least one sequence')
  out = {'unique_fraction': len(set(seqs)) / len(seqs), 'identity': identity}
  idx = np.arange(len(seqs))
  if len(seqs) > max_sequences:
    idx = np.sort(np.random.default_rng(seed).choice(len(seqs), max_sequences, replace=False))
  fn = IDENTITIES[identity]
  vals = [fn(seqs[i], seqs[j]) for n, i in enumerate(idx) for j in idx[n + 1:]]
  vals = [v for v in vals if not math.isnan(v)]
  out['mean_identity'] = float(np.mean(vals)) if vals else math.nan
  out['pairs'] = len(vals)
  return out


# ------------------------------------------------------------------------------------ repetition


def kmer_repeat_fraction(seq: str, k: int) -> float:
  """1 − distinct k-mers / k-mers of one sequence (nan if shorter than k)."""
  n = len(seq) - k + 1
  if n <= 0:
    return math.nan
  return 1.0 - len({seq[i:i + k] for i in range(n)}) / n


def longest_homopolymer(seq: str) -> int:
  if not seq:
    return 0
  c = _codes(seq)
  change = np.flatnonzero(c[1:] != c[:-1])
  bounds = np.concatenate([[-1], change, [len(c) - 1]])
  return int(np.max(np.diff(bounds)))


def repetition(sequences: Sequence[str], k: int = 3) -> dict:
  reps = [kmer_repeat_fraction(s, k) for s in sequences]
  reps = [r for r in reps if not math.isnan(r)]
  runs = [longest_homopolymer(s) for s in sequences]
  return {'k': k, 'kmer_repeat': float(np.mean(reps)) if reps else math.nan,
          'homopolymer_mean': float(np.mean(runs)) if runs else math.nan,
          'homopolymer_max': int(max(runs)) if runs else 0}


# ------------------------------------------------------------------------------------- structure


class StructureScorer(Protocol):
  """User-supplied structure predictor: sequences -> per-sequence mean pLDDT in [0, 100]."""

  def __call__(self, sequences: list[str]) -> np.ndarray:
    ...


def score_structure(scorer: Callable, sequences: Sequence[str]) -> dict:
  """Runs the user's scorer and checks its output: N finite values on the 0-100 scale (all of
  them <= 1 is refused as a 0-1 scale)."""
  vals = np.asarray(scorer(list(sequences)), np.float64).reshape(-1)
  if vals.shape != (len(sequences),) or not np.all(np.isfinite(vals)):
    raise ValueError(f'the structure scorer returned {vals.shape[0]} values (finite: '
                     f'{bool(np.all(np.isfinite(vals)))}) for {len(sequences)} sequences: it must '
                     'return one finite pLDDT per sequence')
  if vals.min() < 0 or vals.max() > 100 or vals.max() <= 1.0:
    # all values <= 1 is a 0-1 scale (ESMFold's raw output): no real 0-100 pLDDT is that low.
    raise ValueError(f'the structure scorer returned pLDDT in [{vals.min():.3g}, '
                     f'{vals.max():.3g}]: return values on the 0-100 scale')
  return {'plddt_mean': float(vals.mean()), 'plddt_median': float(np.median(vals)),
          'plddt_over_70': float(np.mean(vals > 70.0)), 'plddt': vals.tolist()}


def esmfold_scorer(model_name_or_path: str = 'facebook/esmfold_v1', *, device: str = 'cpu',
                   batch_size: int = 4) -> Callable[[list], np.ndarray]:
  """A StructureScorer from HF transformers' `EsmForProteinFolding` (torch + transformers + the
  ESMFold weights needed; imported only here). Per sequence: mean over existing atoms of the
  predicted pLDDT × 100. Not exercised by the tests (no weights offline)."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
    # pylint: disable-next=import-outside-toplevel
    from transformers import AutoTokenizer, EsmForProteinFolding
  except ImportError as e:
    raise ImportError('esmfold_scorer needs torch and transformers: pip install torch '
                      'transformers') from e
  tok = AutoTokenizer.from_pretrained(model_name_or_path)
  model = EsmForProteinFolding.from_pretrained(model_name_or_path).to(device).eval()

  def score(sequences: list) -> np.ndarray:
    out = []
    for i in range(0, len(sequences), batch_size):
      chunk = sequences[i:i + batch_size]
      enc = tok(chunk, return_tensors='pt', add_special_tokens=False, padding=True)
      with torch.no_grad():
        res = model(**{k: v.to(device) for k, v in enc.items()})
      plddt = res['plddt'].float().cpu().numpy()                     # (B, L, 37) in [0, 1]
      exists = res['atom37_atom_exists'].float().cpu().numpy()
      valid = enc['attention_mask'].cpu().numpy()[..., None] * exists
      out.extend(((plddt * valid).sum((1, 2)) / valid.sum((1, 2)) * 100.0).tolist())
    return np.asarray(out)
  return score


# ------------------------------------------------------------------------------------- all of it


def protein_metrics(generated: Sequence[str], reference: Sequence[str], *, k: int = 3,
                    identity: str = 'position', max_sequences: int = 200, seed: int = 0,
                    pseudocount: float = 0.0,
                    structure_scorer: Optional[Callable] = None) -> dict:
  """Every metric above for generated vs reference sequences (lengths = string lengths)."""
  gen = list(generated)
  ref = list(reference)
  out = {'num_generated': len(gen), 'num_reference': len(ref),
         'composition': composition_divergence(gen, ref, pseudocount=pseudocount),
         'length': length_comparison([len(s) for s in gen], [len(s) for s in ref]),
         'diversity': diversity(gen, identity=identity, max_sequences=max_sequences, seed=seed),
         'reference_diversity': diversity(ref, identity=identity, max_sequences=max_sequences,
                                          seed=seed),
         'repetition': repetition(gen, k), 'reference_repetition': repetition(ref, k)}
  if structure_scorer is not None:
    out['structure'] = score_structure(structure_scorer, gen)
  return out


# ------------------------------------------------------------------------------------------ NELBO


def denoiser_nelbo(model, rows_NxL: np.ndarray, mask_id: int, *, num_t: int = 8, seed: int = 0,
                   batch_size: int = 32, maskable_NxL: Optional[np.ndarray] = None) -> dict:
  """Monte-Carlo MDLM NELBO (nats) of token rows under a denoiser, a judge-free likelihood.

  For each row and each of `num_t` draws: t ~ U[ε, 1] (`diffusion.uniform_times`), z_t =
  `diffusion.forward_mask` restricted to `maskable_NxL` (default: every position; pass
  `data.protein.maskable_positions(rows)` for layout 'pad'), loss = Σ_l `diffusion.nelbo_per_token`
  with σ = 0 fed to the network (docs/method.md D3; ESM ignores σ). `model(z, σ_B) -> logits`
  (an nnx module is jitted through split/merge). Keys: fold_in(PRNGKey(seed), draw, batch).
  Returns per_sequence (N,) = mean over draws of the summed bound, per_token = Σ / #counted
  positions, ppl = exp(per_token), and stderr_per_token over the draws.
  """
  rows = np.asarray(rows_NxL)
  N, L = rows.shape
  maskable = np.ones_like(rows, bool) if maskable_NxL is None else np.asarray(maskable_NxL, bool)
  if maskable.shape != rows.shape or not maskable.any():
    raise ValueError(f'maskable_NxL must be a bool array of shape {rows.shape} with at least one '
                     'True position (the positions the bound counts)')
  if isinstance(model, nnx.Module):
    graphdef, state = nnx.split(model)
    call = lambda st, z, s: nnx.merge(graphdef, st)(z, s)  # noqa: E731
  else:
    state = None
    call = lambda st, z, s: model(z, s)  # noqa: E731

  @jax.jit
  def bound(st, x, m, key):
    kt, km = jax.random.split(key)
    t = diffusion.uniform_times(kt, x.shape[0])
    z = jnp.where(m, diffusion.forward_mask(km, x, t, mask_id), x)
    logits = call(st, z, jnp.zeros((x.shape[0],), jnp.float32))
    return diffusion.nelbo_per_token(logits, z, x, t, mask_id).sum(-1)

  base = jax.random.PRNGKey(seed)
  per_draw = np.zeros((num_t, N), np.float64)
  for d in range(num_t):
    for b0 in range(0, N, batch_size):
      key = jax.random.fold_in(jax.random.fold_in(base, d), b0)
      x = jnp.asarray(rows[b0:b0 + batch_size])
      m = jnp.asarray(maskable[b0:b0 + batch_size])
      per_draw[d, b0:b0 + batch_size] = np.asarray(bound(state, x, m, key), np.float64)
  counted = float(maskable.sum())
  per_token_draws = per_draw.sum(1) / counted
  per_token = float(per_token_draws.mean())
  stderr = float(per_token_draws.std(ddof=1) / math.sqrt(num_t)) if num_t > 1 else math.nan
  return {'per_sequence': per_draw.mean(0).tolist(), 'per_token': per_token,
          'ppl': float(np.exp(min(per_token, 50.0))), 'stderr_per_token': stderr,
          'num_t': num_t, 'positions': int(counted)}


__all__ = ['AMINO_ACIDS', 'QUANTILES', 'StructureScorer', 'composition_divergence',
           'denoiser_nelbo', 'diversity', 'esmfold_scorer', 'js_divergence', 'kl_divergence',
           'ks_statistic', 'lcs_identity', 'lcs_length', 'length_comparison',
           'longest_homopolymer', 'kmer_repeat_fraction', 'position_identity', 'protein_metrics',
           'repetition', 'residue_counts', 'score_structure', 'wasserstein_1d']
