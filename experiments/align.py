r"""The alignment stage: LoRA #1 on safety data (harmful prompt -> refusal, plus benign rows),
with an optional alignment-stage defense (--align_defense), saved as a PEFT adapter.

    python -m experiments.align --flagfile=experiments/presets/smollm2_offline.cfg \
        --run_dir=runs/demo
"""

from absl import app

from experiments import _cli, _common


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    _common.run(["align"])


if __name__ == "__main__":
    _cli.run_main(main)
