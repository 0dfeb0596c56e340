"""Evaluation: HS (the judge on held-out harmful prompts) and FA (task test set) of the models
named by --eval_models (base = unaligned, aligned, final = after fine-tuning and repair), each
from the stages already in the run folder; prints the run's table.

    python -m experiments.evaluate --run_dir=runs/demo --eval_models=base,aligned,final
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
