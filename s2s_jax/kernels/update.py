"""The train step's global gradient norm and its non-finite guard.

Math: norm = sqrt(Σ_leaves Σ g²); the update runs only when loss, gradient norm and learning
rate are all finite, otherwise parameters, optimizer state and EMA keep their old values.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

Array = jax.Array


def global_norm(tree) -> Array:
    """sqrt of the sum of squares of every leaf, as optax.global_norm, but each leaf's sum of
    squares a self dot: XLA:CPU runs it as a multithreaded YNN dot rather than a reduction
    (docs/speed.md); on other backends a dot is as good as a reduction, so both sets use it."""
    return jnp.sqrt(sum(jnp.vdot(g, g) for g in jax.tree.leaves(tree)))


def apply_if_cond(keep: Array, update: Callable[..., Any], old: tuple):
    """cpu: update(*old) where `keep` (a scalar bool) holds, else `old` unchanged (bitwise), as a
    `lax.cond`, so the update runs only when kept: one fused pass per parameter, where selecting
    between new and old values after the fact costs three more passes over every parameter and
    optimizer slot on CPU (docs/speed.md)."""
    return jax.lax.cond(keep, update, lambda *o: o, *old)


def apply_if_select(keep: Array, update: Callable[..., Any], old: tuple):
    """portable: the same, but the update always runs and a select keeps the old values: on
    XLA:GPU a `cond` copies its predicate to the host and blocks once per step; the select fuses
    into the optimizer's elementwise pass there."""
    new = update(*old)
    return jax.tree.map(lambda n, o: jnp.where(keep, n, o), new, tuple(old))
