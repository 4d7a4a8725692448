"""Pure, un-jitted step functions: train_step and eval_step (decoding lives in `inference/`).

One per-device body serves every parallel mode: with `axis_name=None` it is a single-device
step; under shard_map (check_vma=False) or pmap it is given the axis name and reduces gradient
and metric *sums* with `lax.psum` before dividing by the global token count, so the update is
exactly that of one device seeing the whole global batch.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from s2s_jax import kernels as kernels_lib
from s2s_jax.training import losses
from s2s_jax.config import Config
from s2s_jax.model import Seq2Seq
from s2s_jax.train_state import TrainState, build_optimizer, learning_rate_fn

# The model's inputs of one batch on the device: data.batch.MODEL_FIELDS (data.batch.model_inputs),
# not a second batch definition.
ModelInputs = dict[str, jax.Array]


def target_weights(batch: ModelInputs) -> jax.Array:
    """[B, T] float32: 1 at real target positions (including EOS), 0 at padding."""
    T = batch["target_output"].shape[1]
    return (jnp.arange(T)[None, :] < batch["target_lengths"][:, None]).astype(jnp.float32)


def _row_ids(batch_rows: int, axis_name) -> jax.Array:
    """Global index of each local row (device-major), for sharding-invariant dropout."""
    base = 0 if axis_name is None else jax.lax.axis_index(axis_name) * batch_rows
    return base + jnp.arange(batch_rows)


def loss_sums(params, batch: ModelInputs, *, model: Seq2Seq, config: Config, rng=None, row_ids=None):
    """Sums over the batch's real target tokens: loss, nll, correct, weight."""
    train = rng is not None
    if config.model.copy_attention:
        return _copy_loss_sums(params, batch, model=model, config=config, rng=rng, row_ids=row_ids)
    hidden, weights = model.apply({"params": params}, batch["source"], batch["source_lengths"],
                                  batch["target_input"], deterministic=not train, row_ids=row_ids,
                                  rngs={"dropout": rng} if train else None)
    kernel, bias = model.apply({"params": params}, method=Seq2Seq.output_weights)
    sums = losses.sequence_loss(
        hidden, kernel, bias, batch["target_output"], target_weights(batch),
        label_smoothing=config.train.label_smoothing if train else 0.0,
        chunk=config.model.loss_chunk, dtype=jnp.dtype(config.model.dtype), kernels=model.kernels)
    lam = config.train.coverage_loss_weight
    if train and lam > 0:  # training objective only (evaluation's loss stays the cross-entropy)
        sums = dict(sums, loss=sums["loss"] + lam * losses.coverage_loss_sum(weights, target_weights(batch)))
    return sums


def _copy_loss_sums(params, batch: ModelInputs, *, model: Seq2Seq, config: Config, rng, row_ids):
    """`loss_sums` with copy attention: the batch's extended ids (source_ext, target_ext) and the
    pointer-generator loss (losses.copy_sequence_loss), plus the coverage loss when asked."""
    train = rng is not None
    hidden, weights, copy_weights, gate = model.apply(
        {"params": params}, batch["source_ext"], batch["source_lengths"], batch["target_input"],
        deterministic=not train, row_ids=row_ids, rngs={"dropout": rng} if train else None,
        method=Seq2Seq.copy_forward)
    kernel, bias = model.apply({"params": params}, method=Seq2Seq.output_weights)
    tw = target_weights(batch)
    sums = losses.copy_sequence_loss(
        hidden, kernel, bias, gate, copy_weights, batch["source_ext"], batch["target_output"], batch["target_ext"], tw,
        label_smoothing=config.train.label_smoothing if train else 0.0, force_copy=config.model.force_copy,
        dtype=jnp.dtype(config.model.dtype), kernels=model.kernels)
    lam = config.train.coverage_loss_weight
    if train and lam > 0:
        sums = dict(sums, loss=sums["loss"] + lam * losses.coverage_loss_sum(weights, tw))
    return sums


def _psum(tree, axis_name):
    return tree if axis_name is None else jax.lax.psum(tree, axis_name)


def _hold_rows(rows: dict, new: dict, old) -> dict:
    """`new` (a params-like dict) with the rows marked in `rows` ({name: bool [V]}) taken from
    `old` (a dict of the same names, or a scalar for all of them)."""
    out = dict(new)
    for name, mask in rows.items():
        out[name] = jnp.where(mask[:, None], old[name] if isinstance(old, dict) else old, new[name])
    return out


def train_step(state: TrainState, batch: ModelInputs, *, model: Seq2Seq, config: Config,
               axis_name: str | None = None, frozen_rows: dict | None = None) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update from a (local shard of a) batch. Returns (new state, metric sums).

    frozen_rows: {parameter name: bool [V]} embedding rows held fixed (model.freeze_embeddings):
    their gradient is zero (so neither the norm nor the optimizer's moments see it) and their
    new values are the old ones, bit for bit (whatever weight decay or the EMA would do).
    Traced with model.matmul_precision (kernels.precision_scope), forward and backward.
    """
    with kernels_lib.precision_scope(config.model):
        return _train_step(state, batch, model=model, config=config, axis_name=axis_name, frozen_rows=frozen_rows)


def _grad_sums(params, micro: ModelInputs, rows: jax.Array, step_key, *, model: Seq2Seq, config: Config):
    """(gradient of the loss sum, metric sums) of one (micro-)batch."""
    def f(p):
        sums = loss_sums(p, micro, model=model, config=config, rng=step_key, row_ids=rows)
        return sums["loss"], sums
    return jax.grad(f, has_aux=True)(params)


def _accumulated_grad_sums(params, batch: ModelInputs, row_ids: jax.Array, step_key, *, model: Seq2Seq,
                           config: Config):
    """Gradient and metric sums of the batch; with train.grad_accum = A > 1 summed over A
    micro-batches in a scan (sums of loss *sums*: the caller divides once by the total weight)."""
    grad_sums = functools.partial(_grad_sums, params, step_key=step_key, model=model, config=config)
    A, B = config.train.grad_accum, batch["source"].shape[0]
    if A == 1:
        return grad_sums(batch, row_ids)
    if B % A:
        raise ValueError(f"batch of {B} rows is not divisible by train.grad_accum={A}")
    split = lambda x: x.reshape((A, B // A) + x.shape[1:])  # noqa: E731
    micro = jax.tree.map(split, batch)

    def body(acc, xs):
        g, s = grad_sums(*xs)
        return jax.tree.map(jnp.add, acc, (g, s)), None

    zero = jax.tree.map(jnp.zeros_like, jax.eval_shape(grad_sums, jax.tree.map(lambda x: x[0], micro),
                                                         row_ids[: B // A]))
    (grads, sums), _ = jax.lax.scan(body, zero, (micro, split(row_ids)))
    return grads, sums


def _train_step(state: TrainState, batch: ModelInputs, *, model: Seq2Seq, config: Config,
                axis_name: str | None = None, frozen_rows: dict | None = None):
    tc = config.train
    step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    row_ids = _row_ids(batch["source"].shape[0], axis_name)
    grads, sums = _accumulated_grad_sums(state.params, batch, row_ids, step_key, model=model, config=config)
    grads, sums = _psum((grads, sums), axis_name)
    if frozen_rows:
        grads = _hold_rows(frozen_rows, grads, 0.0)
    weight = jnp.maximum(sums["weight"], 1.0)
    grad_norm = model.kernels.global_norm(grads) / weight  # the mean gradient's global norm
    # mean and clip_by_global_norm(train.clip_norm) as one scalar, fused into the optimizer's pass
    scale = 1.0 / weight
    if tc.clip_norm > 0:
        scale = scale * jnp.where(grad_norm < tc.clip_norm, 1.0, tc.clip_norm / grad_norm)
    lr = learning_rate_fn(tc)(state.step) * state.lr_scale
    # Non-finite guard: a step with a non-finite loss, gradient or learning rate is skipped (the
    # state is untouched but for the counters). A finite loss and gradient give a finite clipped
    # Adam or SGD direction, so these three scalars decide before any update is computed
    # (the model's kernel set, kernels/update.py: a cond in the cpu set, a select in the portable one).
    finite = jnp.isfinite(sums["loss"]) & jnp.isfinite(grad_norm) & jnp.isfinite(lr)

    def update(params, opt_state, ema):
        clipped = jax.tree.map(lambda g: g * scale.astype(g.dtype), grads)
        updates, opt_state = build_optimizer(tc, clip=False).update(clipped, opt_state, params)
        new_params = jax.tree.map(lambda p, u: p - lr * u.astype(p.dtype), params, updates)
        if frozen_rows:
            new_params = _hold_rows(frozen_rows, new_params, params)
        if ema is not None:
            d = tc.ema_decay
            new_ema = jax.tree.map(lambda e, p: d * e + (1 - d) * p, ema, new_params)
            ema = _hold_rows(frozen_rows, new_ema, ema) if frozen_rows else new_ema
        params = new_params
        return params, opt_state, ema

    params, opt_state, ema = model.kernels.apply_if(finite, update, (state.params, state.opt_state, state.ema_params))
    new_state = state.replace(
        step=state.step + 1,
        params=params,
        opt_state=opt_state,
        ema_params=ema,
        nonfinite=jnp.where(finite, 0, state.nonfinite + 1),
    )
    metrics = dict(sums, grad_norm=grad_norm, learning_rate=lr, skipped=(~finite).astype(jnp.float32),
                   sentences=(batch["target_lengths"] > 0).sum().astype(jnp.float32),
                   nonfinite_run=new_state.nonfinite)
    metrics["sentences"] = _psum(metrics["sentences"], axis_name)
    return new_state, metrics


def eval_step(params, batch: ModelInputs, *, model: Seq2Seq, config: Config,
              axis_name: str | None = None) -> dict[str, jax.Array]:
    """Metric sums (loss, nll, correct, weight) of a batch, deterministic."""
    with kernels_lib.precision_scope(config.model):
        return _psum(loss_sums(params, batch, model=model, config=config), axis_name)


# -- decoding adapters ----------------------------------------------------------------------
