r"""The post-fine-tuning stage: the --repair_defense weight transform (e.g. SafeLoRA, Antidote)
applied to the fine-tuned LoRA. Needs experiments.finetune's output in the same run folder.

    python -m experiments.repair --flagfile=experiments/presets/smollm2_offline.cfg \
        --run_dir=runs/demo
"""

from absl import app

from experiments import _cli, _common


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    _common.run(["repair"])


if __name__ == "__main__":
    _cli.run_main(main)
