r"""Every stage of one run in order: align -> fine-tune -> repair -> evaluate (base, aligned,
final). Stages whose artifacts exist are skipped (resume); --overwrite redoes them.

    python -m experiments.pipeline --flagfile=experiments/presets/smollm2_offline.cfg \
        --run_dir=runs/lisa --defense=lisa
"""

from absl import app

from experiments import _cli, _common


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    _common.run(None)


if __name__ == "__main__":
    _cli.run_main(main)
