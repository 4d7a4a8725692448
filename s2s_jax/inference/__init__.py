"""Inference: one run loader, one model -> step-function adapter, and what is built on them.

    runs.py        load_run / load_translator: a run (s2s_jax.rundir) loaded for inference; average_run
    translator.py  Translator (continuous batching), model_step_fn (the one adapter), plots
    evaluate.py    eval of a split or any file pair with the run's own vocabulary
    export.py      the export-bundle writer (`s2s_jax export`)
    bundle.py      export-bundle reader and runtime (jax + numpy + safetensors + sentencepiece only)
    server.py      HTTP translation server with dynamic batching
    lengths.py     the length rules the Translator and the bundle share

Modules are imported on use: `import s2s_jax.inference.bundle` must not pull in flax.
"""
