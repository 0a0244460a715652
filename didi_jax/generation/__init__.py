r"""Generation for users: `didi_jax.generate(model, prompts=..., length=..., nfe=..., sampler=..., seed=...)`.

    import didi_jax
    out = didi_jax.generate('demo', 'ROMEO:\n', length=120, nfe=16, seed=0)
    print(out.text)                       # the output text (prompt included); out.ids[0]: its ids
    out = didi_jax.generate('demo', ['To be, or [MASK]{40} the question', '[MASK]{*}my lord.'],
                            length=64, sampler='cached', num_samples=2)
    out.texts, out.cost                   # 4 texts; windows, NFEs, network evaluations, FLOPs

`model`: a didi_jax run directory (pretrain or distill), a checkpoint file or directory
(`didi_jax.load_denoiser`'s sources: official `.ckpt`, HF safetensors, our exports),
`hf:ORG/NAME`, `'demo'` (= `didi_jax/assets/demo_teacher/`), or a loaded object (see `load`).
String sources are loaded once and kept (the last few), so their compiled programs are reused;
for loaded objects call `gen = didi_jax.generation.load(obj)` once and then `gen.generate(...)`.

Prompts (`prompts.py` has the exact rules): text is a prefix; `[MASK]{n}` marks n tokens to fill
and `[MASK]{*}` fills up to `length` (so `"[MASK]{*}the end."` is a suffix); `template(...)`
segments and id arrays (-1 = fill) need no parsing. Samplers: 'ancestral' (DDPM-cache off),
'cached' (on; same draws, fewer network calls), 'sparse' (sparse reveal), 'rgas' (reward-guided:
the trained discriminator, or `reward=` any reward of `rewards.py`); `top_p`, `temperature`,
`precision` ('float32' | 'float64' with x64 enabled) apply to all. `length` beyond the model's
window generates semi-autoregressively (`stride` new tokens per window). `core.py` explains the
buckets, the frame and the randomness.

Command line: `python -m didi_jax.generate --help` (`cli.py`).
"""
from didi_jax.generation.core import DEMO_TEACHER
from didi_jax.generation.core import GenerationError
from didi_jax.generation.core import GenerationResult
from didi_jax.generation.core import Generator
from didi_jax.generation.core import SAMPLERS
from didi_jax.generation.core import Sample
from didi_jax.generation.core import generate
from didi_jax.generation.core import load
from didi_jax.generation.prompts import FILL
from didi_jax.generation.prompts import PromptError
from didi_jax.generation.prompts import Template
from didi_jax.generation.prompts import template
from didi_jax.generation.rewards import ClassifierReward
from didi_jax.generation.rewards import Reward
from didi_jax.generation.rewards import SequenceReward
from didi_jax.generation.rewards import TokenReward
from didi_jax.generation.rewards import words

__all__ = ['DEMO_TEACHER', 'FILL', 'ClassifierReward', 'GenerationError', 'GenerationResult',
           'Generator', 'PromptError', 'Reward', 'SAMPLERS', 'Sample', 'SequenceReward',
           'Template', 'TokenReward', 'generate', 'load', 'template', 'words']
