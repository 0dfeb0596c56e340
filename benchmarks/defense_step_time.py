"""Train-step time of each gradient defense as a ratio of plain LoRA SFT, measured in one run.

    python benchmarks/defense_step_time.py [--model PATH] [--batch 4] [--seq 128] [--json]

Every method runs hfjax's jitted train step with the step options its registry entry gives
(`defenses.step_options`), on the same model, LoRA, batch size and sequence length; every named
batch a method reads ("user", "align", "harmful") has that size (`_hfjax_methods.make_method`,
shared with `step_throughput.py`). After one untimed (compiling)
step per method, timing rounds interleave the methods (one step of each per round), so a change
in machine load hits all of them alike; the figure is the median over rounds. Ratios near the
declared cost (Vaccine 2F+2B ~2x, Booster 3F+3B ~3x) mean no pass runs that is not declared.
"""

from __future__ import annotations

import json
import os
import statistics
import sys

import _hfjax_methods as common
import jax
import jax.numpy as jnp
from _hfjax_methods import gradient_defenses, make_method
from absl import app, flags

from hfjax import defenses, host, models, sharding
from hfjax.models import lora as lora_lib
from hfjax.train import state

_ROUNDS = flags.DEFINE_integer("rounds", 5, "timed rounds (one step of every method each)")
_DEFENSES = flags.DEFINE_list("defenses", gradient_defenses(),
                               "gradient defenses to time against plain LoRA SFT")
_JSON = flags.DEFINE_bool("json", False, "print one JSON object instead of a table")


def hardware() -> dict:
    cpu = host.cpu_model()
    return {"jax_backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
            "devices": jax.device_count(), "cpu": cpu, "cpu_cores": os.cpu_count(),
            "load_avg_1m": os.getloadavg()[0]}


def main(argv):
    del argv
    path = common.MODEL.value or models.default_model_path()
    cfg, params = models.load_pretrained(path, dtype=jnp.dtype(common.DTYPE.value))
    cfg = cfg.replace(dtype=common.DTYPE.value)
    mesh = sharding.make_mesh(1, -1, 1)
    frozen_sh = state.params_shardings(cfg, mesh)
    frozen = jax.device_put(params, frozen_sh)
    lora = lora_lib.init(cfg, jax.random.key(0), rank=common.RANK.value, alpha=common.ALPHA.value,
                         targets=tuple(common.TARGETS.value))
    names = [None, *_DEFENSES.value]
    runs, compile_s = {}, {}
    for name in names:
        runs[name], _ = make_method(cfg, frozen, frozen_sh, lora, mesh, name,
                                    batch=common.BATCH.value, seq=common.SEQ.value)
        compile_s[name] = runs[name]()  # first call: compilation + one step
    times: dict = {name: [] for name in names}
    for _ in range(_ROUNDS.value):
        for name in names:
            times[name].append(runs[name]())
    base = statistics.median(times[None])
    result = {
        "hardware": hardware(), "precision": common.DTYPE.value,
        "sizes": {"model": str(path), "batch": common.BATCH.value, "seq": common.SEQ.value,
                  "prompt_tokens_per_row": common.prompt_tokens(common.SEQ.value),
                  "lora_rank": common.RANK.value, "targets": common.TARGETS.value,
                  "rounds": _ROUNDS.value},
        "methods": {name or "lora_sft": {
            "step_s": statistics.median(times[name]),
            "ratio": statistics.median(times[name]) / base,
            "declared": str(defenses.get(name).cost) if name else "1F+1B",
            "first_call_s": compile_s[name], "all_s": times[name]} for name in names},
    }
    if _JSON.value:
        print(json.dumps(result))
        return
    hw = result["hardware"]
    print(f"# {hw['cpu']} ({hw['cpu_cores']} cores, load {hw['load_avg_1m']:.1f}), jax "
          f"{jax.__version__} on {hw['jax_backend']}:{hw['device']} x{hw['devices']}, "
          f"{common.sizes_text()} (every named batch), median of {_ROUNDS.value} rounds")
    for name, e in result["methods"].items():
        print(f"{name:16s} {e['declared']:6s} {e['step_s']:7.3f} s/step  {e['ratio']:5.2f}x "
              f"(first call {e['first_call_s']:.1f} s)")


if __name__ == "__main__":
    sys.exit(app.run(main))
