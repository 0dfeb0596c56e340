"""The experiment pipeline shared by the binaries in `experiments/`.

    from hfjax.pipeline import Pipeline, RunConfig
    res = Pipeline(RunConfig(run_dir="runs/demo", harmful_ratio=0.1)).run()

config      RunConfig (every setting; the binaries' flags), validate, parse_hparams
run_folder  stage folders with key.json / DONE markers, atomic JSON, run.json manifest
stages      Pipeline: align -> finetune -> repair -> eval_{base,aligned,final}
report      tables (markdown / CSV), HS and FA vs p plots, worst case per defense
flags       absl flags generated from RunConfig
sweep       grid flags and the validated list of runs they give
"""

from hfjax.pipeline.config import ConfigError, RunConfig, parse_hparams, validate
from hfjax.pipeline.run_folder import StageMismatchError
from hfjax.pipeline.stages import MissingStageError, Pipeline, StageInterrupted

__all__ = ["ConfigError", "MissingStageError", "Pipeline", "RunConfig", "StageInterrupted",
           "StageMismatchError", "parse_hparams", "validate"]
