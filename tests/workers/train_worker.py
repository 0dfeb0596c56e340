"""A training run used by the tests, runnable as one process or as one of N `jax.distributed`
processes on localhost (CPU collectives through gloo).

    python tests/workers/train_worker.py OUT.json [--process_id I --num_processes N --port P]

Each process builds only its own rows of every global batch (rows [i·B/N, (i+1)·B/N)).
"""

import argparse
import json
import os

import jax

parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("--process_id", type=int, default=0)
parser.add_argument("--num_processes", type=int, default=1)
parser.add_argument("--port", type=int, default=0)
parser.add_argument("--devices_per_process", type=int, default=2)
parser.add_argument("--steps", type=int, default=8)
parser.add_argument("--adapter", default="", help="save_peft the trained LoRA to this folder")
args = parser.parse_args()

jax.config.update("jax_num_cpu_devices", args.devices_per_process)
if args.num_processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{args.port}", num_processes=args.num_processes,
                               process_id=args.process_id, shutdown_timeout_seconds=900)

import numpy as np  # noqa: E402

from hfjax import sharding  # noqa: E402
from hfjax.models import lora as lora_lib  # noqa: E402
from hfjax.models import params as params_lib  # noqa: E402
from hfjax.models.config import from_hf_dict  # noqa: E402
from hfjax.train import builder, optim, step  # noqa: E402

GLOBAL_BATCH = 8
cfg = from_hf_dict(dict(model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=96,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
base = params_lib.init_random(cfg, jax.random.key(0))
lora = lora_lib.init(cfg, jax.random.key(1), rank=4, alpha=8, targets=("q_proj", "v_proj"))


def global_batch(i: int) -> dict:
    r = np.random.default_rng(i)
    ids = r.integers(0, 128, (GLOBAL_BATCH, 16)).astype(np.int32)
    labels = ids.copy()
    labels[:, :5] = -100
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": labels}


mesh = sharding.make_mesh(data=1, fsdp=-1, tensor=1)
oc = optim.OptimizerConfig(learning_rate=1e-2, total_steps=args.steps, weight_decay=0.1)
training = builder.build_training(cfg, lora, mesh=mesh, optimizer=oc)
fn, st = training.step, training.state
frozen = jax.device_put(base, training.frozen_shardings)
rows = GLOBAL_BATCH // jax.process_count()
lo = jax.process_index() * rows
losses = []
for i in range(args.steps):
    local = {k: v[lo:lo + rows] for k, v in global_batch(i).items()}
    st, metrics = fn(st, frozen, step.put_batches({"user": local}, mesh))
    losses.append(float(metrics["loss"]))
spans = not all(x.is_fully_addressable for x in jax.tree.leaves(st.trainable.weights))
if args.adapter:  # every process calls it: the gather is a collective, process 0 writes
    lora_lib.save_peft(args.adapter, cfg, st.trainable)
if jax.process_index() == 0:
    with open(args.out, "w") as f:
        json.dump({"losses": losses, "devices": jax.device_count(),
                   "processes": jax.process_count(), "pid": os.getpid(),
                   "lora_spans_processes": spans}, f)
