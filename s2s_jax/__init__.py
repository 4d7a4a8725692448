"""s2s_jax: fast, reproducible attention RNN sequence-to-sequence training in JAX/Flax."""

__version__ = "0.1.0"
