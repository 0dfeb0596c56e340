"""The experiment pipeline shared by the binaries in `experiments/`.

    from hfjax.pipeline import Pipeline, RunFlags
    res = Pipeline(RunFlags(run_dir="runs/demo", harmful_ratio=0.1)).run()

flags         RunFlags (the binaries' flat flags), validate, to_config -> the nested RunConfig
config        RunConfig: run, model, data, align, finetune, repair, eval sub-configs; key_of
resources     the base model, the data roles, the harmful-prompt plan, content keys
training      the align / finetune / repair stages (rows, the built train step, the loop)
evaluation    generation, judges, HS / FA / degenerate share
orchestrator  Pipeline: stage keys, skip / resume, locks, barriers, manifest, results
run_folder    stage folders with key.json / DONE markers, atomic JSON, run.json
report        tables (markdown / CSV), HS and FA vs p plots, worst case per defense
sweep         grid flags and the validated list of runs they give
"""

from hfjax.pipeline.config import ConfigError, RunConfig
from hfjax.pipeline.flags import RunFlags, parse_hparams, to_config, validate
from hfjax.pipeline.orchestrator import MissingStageError, Pipeline
from hfjax.pipeline.run_folder import StageMismatchError
from hfjax.pipeline.training import StageInterrupted

__all__ = ["ConfigError", "MissingStageError", "Pipeline", "RunConfig", "RunFlags",
           "StageInterrupted", "StageMismatchError", "parse_hparams", "to_config", "validate"]
