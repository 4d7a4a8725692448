"""Attention RNN encoder-decoder family (Flax Linen, pure init/apply)."""

from s2s_jax.model.seq2seq import Seq2Seq

__all__ = ["Seq2Seq"]
