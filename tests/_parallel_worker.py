"""Helper process for tests/test_parallel.py: trains a few steps of the tiny model and writes the
parameters to an .npz, optionally saving or restoring an Orbax checkpoint on the way.

The number of (simulated CPU) devices must be fixed before jax is imported, so every device
count runs in its own process:

    python tests/_parallel_worker.py --devices 8 --out OUT.npz \
        --run none:save=DIR1:then=5 --run shard_map --run pmap --run shard_map:restore=DIR1:name=back
    python tests/_parallel_worker.py --devices 1 --out OUT.npz --run shard_map:restore=DIR8

Each `--run MODE[:OPTION=VALUE...]` trains `--steps` steps under train.parallel=MODE and stores
the parameters, losses and step as `NAME/...` in OUT.npz (NAME defaults to MODE). Options:
`restore=DIR` starts from the checkpoint in DIR (continuing its data stream) instead of the
initial state; `save=DIR` writes a checkpoint after the steps; `then=M` trains M more steps and
stores them as `NAME+M`; `name=NAME`. With --coordinator this is one of --num-processes
processes (jax.distributed on loopback, gloo collectives); each reads its own slice of every
batch. The code path is the trainer's: the real data loader, Parallel, steps.train_step and
Checkpoints; OUT may contain `{process}`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys


# Sharded and single-device runs differ only by float32 rounding (the gradient is a psum of
# per-device sums instead of one sum: ~3e-7 of the largest gradient entry). Adam divides each
# entry by its own RMS, so an entry whose gradient nearly cancels gets a relative error of up to
# ~1e-2 in its update, and the parameter difference grows with the learning rate: after 5 steps
# ~1.2e-5 at tiny.py's 1e-2 (XLA -O0) and ~1.2e-6 at TrainConfig's default 1e-3, which the
# tests use to stay well inside their 1e-5 bound.
LEARNING_RATE = 1e-3


def tiny_config(coordinator: str = "", num_processes: int = 0, process_id: int = -1):
    """experiments/configs/tiny.py (dropout 0.1 on) with one bucket (one compiled program per
    mode) and the default learning rate (see LEARNING_RATE)."""
    from s2s_jax import config as config_lib

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    config = config_lib.load(os.path.join(root, "experiments/configs/tiny.py"))
    assert config.model.dropout > 0
    return config.replace(
        data=dataclasses.replace(config.data, buckets=((12, 13),), max_source_length=12, max_target_length=12,
                                 max_dropped_fraction=1.0,  # reverse pairs are up to 20 long: ~40 % dropped
                                 task_train_size=500),
        train=dataclasses.replace(config.train, learning_rate=LEARNING_RATE, coordinator_address=coordinator,
                                  num_processes=num_processes, process_id=process_id))


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--devices", type=int, required=True, help="simulated CPU devices of this process")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--run", action="append", required=True, metavar="MODE[:save=DIR][:restore=DIR][:then=M][:name=NAME]")
    p.add_argument("--opt-level", type=int, default=0, help="XLA CPU backend optimisation level")
    p.add_argument("--coordinator", default="")
    p.add_argument("--num-processes", type=int, default=0)
    p.add_argument("--process-id", type=int, default=-1)
    args = p.parse_args(argv)

    # LLVM optimisation level 0 halves the compile time, which dominates these runs; the programs
    # compared with each other are all built the same way.
    os.environ["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={args.devices} "
                               f"--xla_backend_optimization_level={args.opt_level}")
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    import functools

    import jax
    import numpy as np

    from s2s_jax.training import steps
    from s2s_jax.checkpoint import Checkpoints
    from s2s_jax.data import build_data, model_inputs
    from s2s_jax.parallel import Parallel, maybe_initialize_distributed
    from s2s_jax.train_state import abstract_state, create_state, make_model

    config = tiny_config(args.coordinator, args.num_processes, args.process_id)
    maybe_initialize_distributed(config)
    assert jax.local_device_count() == args.devices, jax.local_devices()

    out = {}

    def record(name, state, losses):
        leaves, _ = jax.tree_util.tree_flatten_with_path(state.params)
        for path, leaf in leaves:  # replicated: any local copy is the value
            out[f"{name}/{jax.tree_util.keystr(path)}"] = np.asarray(leaf.addressable_data(0))
        out[f"{name}/_losses"] = np.asarray(losses)
        out[f"{name}/_step"] = np.asarray(state.step.addressable_data(0))
        print(f"{name}: step {int(out[f'{name}/_step'])} losses {np.round(losses, 5).tolist()}", flush=True)
    train_fns = {}  # one compiled step per mode, reused by later runs of the same mode
    initial = None
    for run in args.run:
        mode, *opts = run.split(":")
        opts = dict(o.split("=", 1) for o in opts)
        parallel = Parallel(mode)
        data = build_data(config, None, process_index=jax.process_index(), process_count=jax.process_count(),
                          batch_multiple=parallel.local_devices * config.train.grad_accum)
        model = make_model(config, data.source_vocab.vocab_size, data.target_vocab.vocab_size)
        data_state = None
        if "restore" in opts:
            ckpts = Checkpoints(opts["restore"], keep=2, keep_best=0)
            restored = ckpts.restore(parallel.state_target(abstract_state(config, model)))
            assert restored is not None, f"no checkpoint in {opts['restore']}"
            state, meta, _ = restored
            data_state = meta["data_state"]
            ckpts.close()
        else:
            if initial is None:  # create_state compiles a program: once per process is enough
                initial = jax.device_get(create_state(config, model))
            state = initial
        state = parallel.put_state(state)
        if mode not in train_fns:
            train_fns[mode] = parallel.wrap_train(functools.partial(steps.train_step, model=model, config=config))
        train_fn = train_fns[mode]
        batches = data.train_batches(data_state)
        losses = []
        for _ in range(args.steps):
            state, metrics = train_fn(state, parallel.put_batch(model_inputs(next(batches))))
            metrics = parallel.unreplicate_metrics(metrics)
            losses.append(float(metrics["loss"]) / float(metrics["weight"]))
        final = parallel.get_state(state)
        if "save" in opts:
            ckpts = Checkpoints(opts["save"], keep=2, keep_best=0)
            ckpts.save(int(final.step.addressable_data(0)), final, {"data_state": batches.get_state()})
            ckpts.wait()
            ckpts.close()
        name = opts.get("name", mode)
        record(name, final, losses)
        if "then" in opts:  # keep training from the in-memory state, e.g. the reference for a restore
            losses = []
            for _ in range(int(opts["then"])):
                state, metrics = train_fn(state, parallel.put_batch(model_inputs(next(batches))))
                metrics = parallel.unreplicate_metrics(metrics)
                losses.append(float(metrics["loss"]) / float(metrics["weight"]))
            record(f"{name}+{opts['then']}", parallel.get_state(state), losses)
        print(f"{name}: {parallel.describe(data.stats['bucket_rows'], config.train.grad_accum)}", flush=True)
    if jax.process_index() == 0 or args.out.count("{process}"):
        np.savez(args.out.format(process=jax.process_index()), **out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
