"""Human-readable dates ("3rd of March 2021", "Mar 3, 21", "2021/3/3", ...) -> ISO 2021-03-03.

The default task (no download): character-level, bidirectional LSTM encoder, Luong attention
with input feeding.

    python -m s2s_jax train --config experiments/configs/dates.py --workdir runs/dates

Hardware: 2 CPU cores. Expected: >= 99% exact match on 1,000 held-out generated dates in a few
minutes (see README results table).
"""

from s2s_jax.config import Config, DataConfig, DecodeConfig, ModelConfig, TrainConfig


def get_config() -> Config:
    return Config(
        name="dates",
        data=DataConfig(source="task", task="dates", task_train_size=50_000, task_eval_size=1_000,
                        max_source_length=40, max_target_length=10, buckets=((16, 11), (24, 11), (40, 11)),
                        batch_size=64),
        model=ModelConfig(cell="lstm", source_embed_dim=32, target_embed_dim=32, hidden_dim=128,
                          encoder_layers=1, decoder_layers=1, bidirectional=True, attention="general",
                          input_feeding=True),
        train=TrainConfig(steps=2500, learning_rate=3e-3, schedule="cosine", warmup_steps=100,
                          clip_norm=5.0, log_every=100, eval_every=500, checkpoint_every=500),
        decode=DecodeConfig(beam_size=1, max_len_a=0.0, max_len_b=12, batch_size=256),
    )
