r"""The user fine-tuning stage (the harmful fine-tuning attack): a fresh LoRA on n rows, a
fraction p harmful, on top of the aligned model; optional --finetune_defense. Needs the alignment
stage of the same run folder (experiments.align) unless --align_epochs=0.

    python -m experiments.finetune --flagfile=experiments/presets/smollm2_offline.cfg \
        --run_dir=runs/demo
"""

from absl import app

from experiments import _cli, _common


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    _common.run(["finetune"])


if __name__ == "__main__":
    _cli.run_main(main)
