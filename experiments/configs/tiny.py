"""A tiny model on the `reverse` task that trains end to end in seconds on CPU; used by the tests.

    python -m s2s_jax train --config experiments/configs/tiny.py --workdir runs/tiny
"""

from s2s_jax.config import Config, DataConfig, DecodeConfig, ModelConfig, TrainConfig


def get_config() -> Config:
    return Config(
        name="tiny",
        data=DataConfig(source="task", task="reverse", task_train_size=2_000, task_eval_size=64,
                        max_source_length=20, max_target_length=20, buckets=((12, 13), (20, 21)),
                        batch_size=16),
        model=ModelConfig(cell="lstm", source_embed_dim=16, target_embed_dim=16, hidden_dim=32,
                          encoder_layers=1, decoder_layers=1, bidirectional=True, attention="general",
                          input_feeding=True, dropout=0.1),
        train=TrainConfig(steps=40, learning_rate=1e-2, log_every=10, eval_every=20, checkpoint_every=20,
                          eval_sentences=64, plot=False),
        decode=DecodeConfig(beam_size=1, max_len_a=1.0, max_len_b=2, batch_size=64),
    )
