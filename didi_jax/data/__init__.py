"""Data: tokenizers, document sources, docs/method.md §2 packing, the block cache and grain iterators.

Pipeline names (which import grain) load on first use, so `didi_jax.data.tokenizers` stays light.
"""
from __future__ import annotations

import importlib
from typing import Any

from didi_jax.data.packing import Packer, PackingError, pack_documents
from didi_jax.data.sources import DataError, cache_root, fetch_shakespeare, iter_documents, \
    shakespeare_documents
from didi_jax.data.tokenizers import get_tokenizer

_PIPELINE = ('TrainIterator', 'cache_dir_for', 'corpus_stats', 'eval_batches', 'load_blocks')

__all__ = ['DataError', 'Packer', 'PackingError', 'cache_root', 'fetch_shakespeare',
           'get_tokenizer', 'iter_documents', 'pack_documents', 'shakespeare_documents',
           *_PIPELINE]


def __getattr__(name: str) -> Any:
  if name in _PIPELINE:
    return getattr(importlib.import_module('didi_jax.data.pipeline'), name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
