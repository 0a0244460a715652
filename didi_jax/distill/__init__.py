"""Distillation methods, one module per method, side by side (docs/method.md §14).

  didi   DiDi-Instruct (docs/method.md §6-§7): the student's two-step rollout scored by a
         discriminator, policy-gradient update with grouped rewards.
  sdtt   self-distillation through time (docs/method.md §14): the student matches in one step
         what the teacher does in two, round after round.

`distill.method` picks one; `didi_jax.train.family` runs it (state, sharded step, the one training
loop, checkpoints, resume). A method module holds its pure pieces and its jitted iteration; what
the methods share (the denoiser's fused view `Net`, divergences, EMA) lives in `common`.
"""
METHODS = ('didi', 'sdtt')
