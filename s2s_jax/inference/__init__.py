"""Inference: one run loader, one model -> step-function adapter, and what is built on them.

    runs.py        load_run: config, vocabularies, model, params (latest / step / best / averaged)
    adapter.py     DecodingModel: the one protocol a model meets decoding through; SingleModel (a Seq2Seq)
    translator.py  Translator (continuous batching), plots
    evaluate.py    eval of a split or any file pair with the run's own vocabulary
    bundle.py      export-bundle runtime (jax + numpy + safetensors + sentencepiece only)
    server.py      HTTP translation server with dynamic batching
    lengths.py     the length rules the Translator and the bundle share

Modules are imported on use: `import s2s_jax.inference.bundle` must not pull in flax.
"""
