"""The one place that turns a training setup into a runnable, sharded train step.

    training = build_training(cfg, trainable, mesh=mesh, optimizer=OptimizerConfig(...),
                              defenses=[DefenseChoice.named("vaccine", rho=2.0)],
                              primary="align", full_finetune=False, seed=0)
    state, metrics = training.step(training.state, frozen, put_batches(batches, mesh))
    training.batch_names   # the named batches to feed every step, primary first

Inputs: the model config, the initial trainable (a LoRA, a `models.prefix.Prefix`, or the
params for full fine-tuning), the optimizer settings (`OptimizerConfig`, its `total_steps` the
run's), the mesh and the gradient defenses to chain before the optimizer. The builder composes
the defenses (`hfjax.defenses.compose`), chains them before clipping + AdamW, asks the train
step to do what they need from its own forward and backward (their `StepOptions`), places the
initial state with its shardings, and says which batches to feed: the primary (the stage's own
data, or the defense's, e.g. Lisa's phase batch) and every extra stream the defenses read, the
paired ones among them, and any batch size a defense fixes. The pipeline, the benchmarks and the
tests all build their steps here; `make_train_step` has no other caller.

A defense whose built transform carries `wrap_optimizer(inner)` (`compose.around_optimizer`) is
put around everything chained after it, the optimizer and its accumulation included
(`optim.chain_around`):

    chain(pre…, d_1, …, d_k.wrap_optimizer(chain(d_{k+1}, …, MultiSteps(clip → AdamW))))

so it also acts after the optimizer: SaLoRA projects AdamW's update (B' = B C exactly), T-Vaccine
hands AdamW the layers that train, and with `StepOptions.layerwise_optimizer` the builder's AdamW
keeps per-layer state and skips the others as torch's AdamW skips parameters without a gradient
(`optim.layerwise_adamw`). With no such defense the chain and its state are as before. A user's
optax optimizer is wrapped the same way but reads no `trained` (its skipped entries see zero
gradients).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import optax
from jax.sharding import Mesh

from hfjax.defenses import compose
from hfjax.defenses.compose import DefenseChoice
from hfjax.models.config import ModelConfig
from hfjax.models.prefix import Prefix
from hfjax.train import optim
from hfjax.train import state as state_lib
from hfjax.train import step as step_lib


@dataclasses.dataclass
class Training:
    """A built training setup (see the module docstring)."""

    step: step_lib.CompileCounter
    state: state_lib.TrainState
    state_shardings: state_lib.TrainState
    frozen_shardings: Any
    primary: str | tuple[str, ...]  # what the step differentiates (Lisa: one per phase)
    batch_names: tuple[str, ...]  # every batch to feed, the stage's own first
    paired: tuple[str, ...]
    batch_sizes: dict[str, int]
    schedule: Callable | None
    optimizer: Any


def build_training(cfg: ModelConfig, trainable, *, mesh: Mesh,
                   optimizer: optim.OptimizerConfig | optax.GradientTransformation | None = None,
                   defenses: Sequence[DefenseChoice] = (), primary: str = "user",
                   full_finetune: bool = False, seed: int = 0, skip_nonfinite: bool = False,
                   pre: Sequence = ()) -> Training:
    """Build the jitted, sharded, state-donating step for `trainable` (module docstring).

    `optimizer`: hfjax's clipping + AdamW with its schedule (`OptimizerConfig`, the default
    one if None), or any optax transformation (then no schedule metric and no accumulation).
    `primary`: the stage's own batch name ("user" when fine-tuning, "align" when aligning),
    which a defense may replace. `pre`: further optax transforms chained before the defenses
    (a user's own). The optimizer's `total_steps` is passed to defenses that read it.
    """
    if full_finetune and isinstance(trainable, Prefix):
        raise ValueError("full_finetune=True trains the whole params pytree; a prefix trains "
                         "beside the frozen base: pass full_finetune=False")
    config = optimizer if isinstance(optimizer, optim.OptimizerConfig) else None
    if optimizer is None:
        config = optim.OptimizerConfig()
    options = compose.step_options(defenses, primary)
    run_inputs = {"total_steps": config.total_steps} if config is not None else {}
    chain = [*pre, *compose.transforms(defenses, **run_inputs)]
    if config is not None:
        opt = optim.make_optimizer(config, pre=chain, layerwise=options.layerwise_optimizer)
        schedule, accumulation = optim.make_schedule(config), config.accumulation_steps
    else:
        opt, schedule, accumulation = optim.chain_around(chain, optimizer), None, 1
    st, st_sh = step_lib.init_state(cfg, trainable, opt, mesh=mesh, seed=seed,
                                    full_finetune=full_finetune)
    frozen_sh = state_lib.params_shardings(cfg, mesh)
    fn = step_lib.make_train_step(cfg, opt, mesh=mesh, state_shardings=st_sh,
                                  frozen_shardings=frozen_sh, full_finetune=full_finetune,
                                  learning_rate_fn=schedule, accumulation_steps=accumulation,
                                  skip_nonfinite=skip_nonfinite, **options.step_kwargs())
    names = tuple(dict.fromkeys([primary, *options.batch_names, *options.paired,
                                 *compose.batches(defenses)]))
    return Training(fn, st, st_sh, frozen_sh, options.primary, names, tuple(options.paired),
                    dict(options.batch_sizes), schedule, opt)
