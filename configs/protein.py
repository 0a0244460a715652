r"""Proteins: DiDi-Instruct on amino-acid sequences (one protein per row, judge-free metrics).

  python -m didi_jax.main --config=configs/protein.py:smoke --workdir=runs/protein_smoke \
      --config.data.fasta=/usr/share/EMBOSS/test/data/hmm/globins630.fa

Presets:
  smoke    a tiny DiT teacher pre-trained in the run itself on a FASTA file (default: the 630
           globins of Debian's `emboss-test`), distilled, then the NFE sweep with the protein
           metrics for teacher and student (results.md table + curve.png); mechanics only,
           2 min 42 s measured on 2 shared CPU cores (README, "Proteins").
  (none)   distil a DPLM teacher (ESM-2 architecture, model.kind='esm', the ESM tokenizer):
             python -m didi_jax.main --config=configs/protein.py --workdir=runs/dplm150m \
                 --config.teacher.checkpoint=hf:airkingbd/dplm_150m \
                 --config.data.fasta='uniref50/*.fasta.gz'
           (or a local DPLM / HF ESM directory; data.fasta defaults to the globins, a stand-in
           for the UniRef50 data DPLM was trained on). The sizes below are DPLM-150M's and are
           replaced by the checkpoint's own (distill_loop.teacher_config). The paper states only
           that its DPLM-distilled student exceeds pLDDT 70 with 8-32 steps (docs/method.md
           §11.6): the NFE grid 8, 16, 32 is that; every other number is ours (the text recipe's
           distillation defaults, docs/method.md §1), said next to each.
  scratch  a from-scratch DiT teacher on your own UniRef50-scale FASTA, then distil and sweep
           (job 'pipeline'); sized for one GPU.
"""
from didi_jax.config import base_config, model_config

GLOBINS = '/usr/share/EMBOSS/test/data/hmm/globins630.fa'   # Debian package emboss-test


def _protein_data(cfg, tokenizer: str, fasta: str = GLOBINS):
  cfg.data.source = 'fasta'
  cfg.data.tokenizer = tokenizer          # 'protein' (ours, 27 ids) | 'esm' (DPLM's alphabet)
  cfg.data.fasta = fasta                  # the globins: an offline example; pass your own data
  cfg.data.layout = 'eos'                 # every position is data (loss and samplers as text)
  cfg.data.bos = tokenizer == 'esm'       # DPLM rows start with <cls>
  cfg.data.dedup = True
  cfg.data.long_records = 'crop'          # DPLM crops long proteins to a random window
  cfg.data.valid_fraction = 0.05          # ours: 5% of the records, by record hash
  cfg.eval.judge = 'gpt2'                 # unused for proteins (no judge is loaded)
  cfg.eval.extra_judges = ''
  cfg.sweep.samplers = 'ancestral,rgas'


def get_config(preset: str = ''):
  cfg = base_config()
  if preset == 'smoke':
    _protein_data(cfg, 'protein')
    cfg.job = 'pipeline'
    # globins630.fa: 121-162 residues (median 146); L = 160 holds 159 residues, the few longer
    # records are cropped to a random window (reproducible: data.crop_seed).
    cfg.model = model_config('tiny', vocab_size=28, length=160)
    cfg.model.compute_dtype = 'float32'   # CPUs have no fast bf16 matmuls
    cfg.teacher.checkpoint = ''           # the pipeline pre-trains its own tiny teacher
    cfg.pretrain.batch_size = 16
    cfg.pretrain.num_steps = 200
    cfg.pretrain.lr = 1e-3
    cfg.pretrain.warmup_steps = 20
    cfg.pretrain.ema_decay = 0.99
    cfg.pretrain.eval_every = 100
    cfg.pretrain.eval_batches = 2
    cfg.pretrain.log_every = 50
    cfg.checkpoint.every = 100
    cfg.checkpoint.keep = 1
    cfg.distill.num_iterations = 20
    cfg.distill.disc_unfreeze_blocks = 1
    cfg.distill.batch_size = 2
    cfg.distill.group_size = 4
    cfg.distill.tau.per = 'group'
    cfg.distill.ema_decay = 0.9
    cfg.distill.optim.student.lr = 1e-4
    cfg.distill.optim.disc.lr = 3e-4
    cfg.distill.optim.student.warmup_steps = 2
    cfg.distill.optim.disc.warmup_steps = 2
    cfg.distill.log_every = 10
    cfg.distill.sample_every = 0
    cfg.sampler.network = 'student_ema'
    cfg.sample.num_samples = 16
    cfg.sample.batch_size = 16
    cfg.eval.num_samples = 16
    cfg.eval.protein_reference = 256
    cfg.eval.nelbo_draws = 2
    cfg.sweep.models = 'teacher,student'
    cfg.sweep.samplers = 'ancestral,rgas'   # RGAS: the student only
    cfg.sweep.nfes = '4,8,16'
    cfg.sweep.teacher_nfes = '4,8,16'
  elif preset == '':
    _protein_data(cfg, 'esm')
    cfg.job = 'pipeline'                  # teacher given: distil, then the protein sweep
    cfg.model = model_config('small', vocab_size=33, length=256)
    cfg.model.kind = 'esm'
    cfg.model.hidden_size, cfg.model.n_blocks = 640, 30       # DPLM-150M (from the checkpoint)
    cfg.model.n_heads, cfg.model.mlp_dim = 20, 2560
    cfg.model.dropout = 0.0
    cfg.model.esm.pad_token_id = 1
    cfg.model.attention_impl = 'auto'
    cfg.teacher.checkpoint = 'hf:airkingbd/dplm_150m'   # or a local DPLM / HF ESM directory
    cfg.teacher.weights = 'raw'           # HF checkpoints hold one set of weights
    cfg.distill.num_iterations = 10_000   # ours = the text recipe (paper: not stated)
    cfg.distill.disc_unfreeze_blocks = 4  # ours: the text recipe's last 4 blocks
    cfg.checkpoint.every = 200
    cfg.sampler.network = 'student_ema'
    cfg.eval.num_samples = 256
    cfg.eval.structure_scorer = ''        # 'esmfold' for pLDDT (torch + transformers + weights)
    cfg.sweep.models = 'teacher,student'
    cfg.sweep.nfes = '8,16,32'            # the paper: pLDDT > 70 at 8-32 steps (§11.6)
    cfg.sweep.teacher_nfes = '8,16,32,256'
  elif preset == 'scratch':
    _protein_data(cfg, 'protein')
    cfg.job = 'pipeline'
    cfg.model = model_config('small', vocab_size=28, length=512)   # ours: 85M DiT, L = 512
    cfg.teacher.checkpoint = ''           # pre-trained in the run (WORKDIR/teacher)
    cfg.pretrain.batch_size = 256         # ours (MDLM's text recipe: 512 x 1024)
    cfg.pretrain.num_steps = 200_000
    cfg.pretrain.warmup_steps = 2500
    cfg.pretrain.eval_every = 5000
    cfg.distill.disc_unfreeze_blocks = 4
    cfg.sweep.nfes = '8,16,32,64'
    cfg.sweep.teacher_nfes = '8,16,32,64,512'
  else:
    raise ValueError(f"unknown preset {preset!r} for configs/protein.py: use '', 'smoke' or "
                     "'scratch'")
  return cfg
