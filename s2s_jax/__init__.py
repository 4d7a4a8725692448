"""s2s_jax: fast, reproducible attention RNN sequence-to-sequence training in JAX/Flax.

The Python API (`s2s_jax.api`, documented in the README) is re-exported here; importing the
package imports no jax (call `s2s_jax.setup()` first for the CLI's compile cache and allocator).
"""

__version__ = "0.1.0"

from s2s_jax.api import Hypothesis, Model, load, load_bundle, load_config, setup, train  # noqa: E402

__all__ = ["Hypothesis", "Model", "load", "load_bundle", "load_config", "setup", "train", "__version__"]
