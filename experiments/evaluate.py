"""Evaluation: HS (the judge on held-out harmful prompts) and FA (task test set) of the models
named by --eval_models (base = unaligned, aligned, final = after fine-tuning and repair), each
from the stages already in the run folder; prints the run's table.

    python -m experiments.evaluate --run_dir=runs/demo --eval_models=base,aligned,final

An inference-time attack on the same models, e.g. prefilling the first 10 tokens of each
harmful answer (hfjax.attacks.prefill), is an evaluation setting: give the run's flags plus
--eval_attack. Its evaluation stages hold other settings than the plain ones, so --overwrite
replaces those; to keep both, run the pipeline with --stage_cache and evaluate into a second
--run_dir with the same --stage_cache (the trained stages are found there):

    python -m experiments.evaluate --run_dir=runs/demo --eval_models=aligned,final \
        --eval_attack=prefill --eval_attack_hparams=k=10 --overwrite
"""

from absl import app

from experiments import _cli, _common


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    models = [m.strip() for m in _common.FLAGS.eval_models.split(",") if m.strip()]
    _common.run([f"eval_{m}" for m in models])


if __name__ == "__main__":
    _cli.run_main(main)
