"""The `copy_names` task with copy attention and a word vocabulary: sentences mentioning two rare
names -> a template holding them; the test names never occur in training, so only copying can
write them (docs/copy.md has the measured exact match with and without copy attention).

    python -m s2s_jax train --config experiments/configs/copy_names.py --workdir runs/copy_names
    python -m s2s_jax train --config experiments/configs/copy_names.py --workdir runs/copy_names_nocopy \\
        --set model.copy_attention=false
"""

from s2s_jax.config import Config, DataConfig, DecodeConfig, ModelConfig, TrainConfig


def get_config() -> Config:
    return Config(
        name="copy_names",
        data=DataConfig(source="task", task="copy_names", spm_model_type="word", task_train_size=5_000,
                        task_eval_size=200, max_source_length=12, max_target_length=10, buckets=((12, 11),),
                        batch_size=32),
        model=ModelConfig(cell="lstm", source_embed_dim=32, target_embed_dim=32, hidden_dim=64,
                          encoder_layers=1, decoder_layers=1, bidirectional=True, attention="general",
                          input_feeding=True, copy_attention=True),
        train=TrainConfig(steps=300, learning_rate=1e-2, log_every=50, eval_every=300, checkpoint_every=300,
                          eval_sentences=200, plot=False),
        decode=DecodeConfig(beam_size=1, max_len_a=1.0, max_len_b=4, batch_size=64),
    )
