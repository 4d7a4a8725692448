"""Multi30k English->German with the recipe parts of the strongest published RNN systems.

UNTUNED: a starting point for issue 24's tuning record, not a measured result. It is
multi30k_en_de (same data, vocabulary, batches, optimiser, steps, decoding) with the model
replaced by `_recipes.conditional_gru_256` (conditional GRU decoder, layer normalisation in the
cells, embedding / output / variational recurrent dropout: docs/model.md) and label smoothing
0.1. Nothing here has been trained or timed yet; each part's worth on this data is still to be
measured on `valid` (docs/results.md).

    python -m s2s_jax train --config experiments/configs/multi30k_en_de_best.py \
        --set data.dir=../shared/data/multi30k --workdir runs/multi30k_en_de_best
"""

import dataclasses
from pathlib import Path

from s2s_jax.config import Config, load_module

HERE = Path(__file__).parent
recipes = load_module(HERE / "_recipes.py")
base = load_module(HERE / "multi30k_en_de.py")


def get_config() -> Config:
    config = base.get_config()
    return dataclasses.replace(
        config,
        name="multi30k_en_de_best",
        # the base's compute dtype (bfloat16) kept; the recipe parts replace the Luong model
        model=dataclasses.replace(recipes.conditional_gru_256(), dtype=config.model.dtype),
        train=dataclasses.replace(config.train, label_smoothing=0.1),
    )
