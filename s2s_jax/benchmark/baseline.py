"""The straightforward Flax-examples way to write the same attention seq2seq: the baseline that
`python -m s2s_jax benchmark` measures s2s_jax's model against.

Written the way google/flax `examples/seq2seq` and the Flax RNN guide do it:
- encoder: `nn.OptimizedLSTMCell` inside `nn.RNN` per direction, `nn.Bidirectional` for the two
  directions (each direction is its own scan, run one after the other), `seq_lengths` for padding;
- decoder: one `nn.scan` over a step module whose body runs both LSTM layers, Luong `general`
  attention (the query is projected each step, scores against the memory) with input feeding,
  and the output projection to the vocabulary, so logits leave the scan as [B, T, V];
- loss: masked cross-entropy on those logits; same optax optimizer, clipping and learning rate
  as `s2s_jax.training.steps.train_step`.
Same sizes as `config.model` (LSTM only; dot/general attention; input feeding on), same data.

Mixed precision as a Flax user writes it (`model.dtype=bfloat16`): float32 parameters
(`param_dtype`, Flax's default) and `dtype=bfloat16` on every Embed, Dense and cell, so the
matmuls run in bfloat16. The LSTM carry stays in the cells' `param_dtype` (float32: that is
what `initialize_carry` builds, and `f * c + i * g` keeps it there); the input-feeding vector
and the attention memory are cast to the compute dtype, so every `nn.scan` carry leaves a step
with the dtype it entered with. Softmax and loss in float32; the same float32 matmul precision
(`model.matmul_precision`) as s2s_jax's step.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from s2s_jax.config import Config, ModelConfig
from s2s_jax.train_state import TrainState, build_optimizer, learning_rate_fn


class DecoderStep(nn.Module):
    """One target step: LSTM layers, attention, output projection."""

    config: ModelConfig
    vocab_size: int

    @nn.compact
    def __call__(self, carry, emb_t, memory, mask):
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        cells, feed = carry
        x = jnp.concatenate([emb_t, feed], axis=-1)
        new_cells = []
        for i in range(cfg.decoder_layers):
            c, x = nn.OptimizedLSTMCell(cfg.hidden_dim, dtype=dtype, name=f"lstm_{i}")(cells[i], x)
            new_cells.append(c)
        q = x
        if cfg.attention == "general":
            q = nn.Dense(cfg.hidden_dim, use_bias=False, dtype=dtype, name="attention_query")(x)
        scores = jnp.einsum("bh,bsh->bs", q, memory).astype(jnp.float32)
        weights = jax.nn.softmax(jnp.where(mask, scores, -1e9), axis=-1)
        context = jnp.einsum("bs,bsh->bh", weights.astype(memory.dtype), memory)
        hidden = jnp.tanh(nn.Dense(cfg.hidden_dim, use_bias=False, dtype=dtype, name="attention_output")(
            jnp.concatenate([context, x], axis=-1)))
        logits = nn.Dense(self.vocab_size, dtype=dtype, name="output")(hidden)
        return (tuple(new_cells), hidden), logits


class FlaxExamplesSeq2Seq(nn.Module):
    """(source [B, S], source_lengths [B], target_input [B, T]) -> logits [B, T, V]."""

    config: ModelConfig
    source_vocab_size: int
    target_vocab_size: int

    @nn.compact
    def __call__(self, source, source_lengths, target_input):
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        x = nn.Embed(self.source_vocab_size, cfg.source_embed_dim, dtype=dtype, name="source_embedding")(source)
        h = cfg.hidden_dim // 2
        finals = []
        for i in range(cfg.encoder_layers):
            rnn = nn.Bidirectional(nn.RNN(nn.OptimizedLSTMCell(h, dtype=dtype)),
                                   nn.RNN(nn.OptimizedLSTMCell(h, dtype=dtype)),
                                   return_carry=True, name=f"encoder_{i}")
            (fwd, bwd), x = rnn(x, seq_lengths=source_lengths)
            finals.append(jax.tree.map(lambda a, b: jnp.concatenate([a, b], -1), fwd, bwd))  # (c, h)
        mask = jnp.arange(source.shape[1])[None, :] < source_lengths[:, None]
        memory = jnp.where(mask[..., None], x, 0.0).astype(dtype)
        emb = nn.Embed(self.target_vocab_size, cfg.target_embed_dim, dtype=dtype, name="target_embedding")(target_input)
        # the step returns the attentional vector in the compute dtype: start the carry in it too
        feed = jnp.zeros((source.shape[0], cfg.hidden_dim), dtype)
        scan = nn.scan(DecoderStep, variable_broadcast="params", split_rngs={"params": False},
                       in_axes=(1, nn.broadcast, nn.broadcast), out_axes=1)
        _, logits = scan(cfg, self.target_vocab_size, name="decoder")(
            (tuple(finals[-cfg.decoder_layers:]), feed), emb, memory, mask)
        return logits


def create_state(config: Config, model: FlaxExamplesSeq2Seq) -> TrainState:
    """The initial state, built under one jit (op by op, each initializer would compile its own
    small program: seconds on a GPU; the same reason s2s_jax's create_state is jitted)."""
    return jax.jit(lambda: _initial_state(config, model))()


def _initial_state(config: Config, model: FlaxExamplesSeq2Seq) -> TrainState:
    key = jax.random.key(config.train.seed)
    src = jnp.ones((1, 4), jnp.int32)
    params = model.init(key, src, jnp.array([4]), src)["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=build_optimizer(config.train).init(params),
                      rng=jax.random.key_data(key), ema_params=None, lr_scale=jnp.ones((), jnp.float32),
                      nonfinite=jnp.zeros((), jnp.int32))


def token_losses(logits, targets):
    """Per-token cross-entropy in float32 (logits [B, T, V] of any dtype, targets [B, T])."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def _precision_scope(model_cfg):
    """The float32 matmul precision s2s_jax's own step traces under (model.matmul_precision)."""
    try:
        from s2s_jax.kernels import precision_scope
    except ImportError:  # an older tree without kernels/: the backend default
        import contextlib
        return contextlib.nullcontext()
    return precision_scope(model_cfg)


def train_step(state: TrainState, batch, *, model: FlaxExamplesSeq2Seq, config: Config):
    """The same update as s2s_jax.training.steps.train_step (loss sum / token count, clip, Adam, guard)."""
    with _precision_scope(config.model):
        return _train_step(state, batch, model=model, config=config)


def _train_step(state: TrainState, batch, *, model: FlaxExamplesSeq2Seq, config: Config):
    tx = build_optimizer(config.train)

    def loss_fn(params):
        logits = model.apply({"params": params}, batch["source"], batch["source_lengths"], batch["target_input"])
        T = batch["target_output"].shape[1]
        w = (jnp.arange(T)[None, :] < batch["target_lengths"][:, None]).astype(jnp.float32)
        loss = token_losses(logits, batch["target_output"])
        return (loss * w).sum(), w.sum()

    (loss, weight), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    weight = jnp.maximum(weight, 1.0)
    grads = jax.tree.map(lambda g: g / weight, grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(optax.global_norm(grads))
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    lr = learning_rate_fn(config.train)(state.step) * state.lr_scale
    params = jax.tree.map(lambda p, u: p - lr * u, state.params, updates)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
    new_state = state.replace(step=state.step + 1, params=keep(params, state.params),
                              opt_state=keep(opt_state, state.opt_state))
    return new_state, {"loss": loss, "weight": weight}
