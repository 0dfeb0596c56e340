r"""A grid of runs (defenses x harmful ratios x seeds, or any flag), one run folder each, run
sequentially in this process (the base model is loaded once; stages with identical settings,
e.g. the alignment shared by every fine-tuning defense, run once through a stage cache), then
the report: results.md / results.csv (a line per run with HS and FA of the unaligned, aligned
and attacked models), worst_case.csv / worst_case.png (per defense, the worst attack setting
whose FA stays within --worst_case_fa_drop points of the undefended fine-tune) and hs_fa_vs_p.png.

    python -m experiments.sweep --flagfile=experiments/presets/quick.cfg
    python -m experiments.sweep --run_dir=runs/grid --grid=defense=none,lisa \
        --grid=harmful_ratio=0,0.05,0.1,0.2 --grid=seed=0,1,2 --hparams=lisa:rho=1
"""

from __future__ import annotations

import contextlib
import sys
import time
import traceback

import jax
from absl import app

from experiments import _cli, _common
from hfjax.errors import UserError
from hfjax.pipeline import Pipeline, report
from hfjax.pipeline import flags as pflags
from hfjax.pipeline import sweep as sweep_lib
from hfjax.pipeline.lock import folder_lock

sweep_lib.define()
FLAGS = _common.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    _common.quiet_logs()
    pflags.setup_runtime()
    start = time.perf_counter()
    root, configs = sweep_lib.plan(FLAGS, jax.device_count())
    print(f"sweep: {len(configs)} runs under {root}", flush=True)
    if FLAGS.dry_run:
        for _, rc in configs:
            print(f"  {rc.run_dir}: defense {rc.defense_label()}, attack {rc.attack}, "
                  f"p {rc.harmful_ratio}, "
                  f"n {rc.num_samples}, lr {rc.lr:g}, seed {rc.seed}")
        return
    failed = []
    root.mkdir(parents=True, exist_ok=True)
    with folder_lock(root / ".sweep.lock", f"sweep folder {root}") if \
            jax.process_index() == 0 else contextlib.nullcontext():
        for i, (combo, rc) in enumerate(configs):
            print(f"\n=== run {i + 1}/{len(configs)}: {combo or '(single)'} -> {rc.run_dir}",
                  flush=True)
            try:
                Pipeline(rc).run()
            except KeyboardInterrupt:
                raise
            except Exception as e:
                if not FLAGS.keep_going:
                    raise
                if isinstance(e, UserError | OSError) and not _cli.show_tracebacks():
                    print(f"run {rc.run_dir} failed: {_cli.describe(e)}", file=sys.stderr,
                          flush=True)
                else:
                    traceback.print_exc()
                failed.append(rc.run_dir)
        results = report.load_results([rc.run_dir for _, rc in configs
                                       if rc.run_dir not in failed])
        if results:
            print("\n" + report.write_sweep_report(
                results, root, FLAGS.worst_case_fa_drop / 100))
            print(f"report: {root / 'results.md'}, {root / 'results.csv'}, "
                  f"{root / 'hs_fa_vs_p.png'}")
    print(f"sweep wall time {time.perf_counter() - start:.1f} s ({len(configs)} runs, "
          f"{len(failed)} failed)")
    if failed:
        print("failed runs: " + ", ".join(failed), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    _cli.run_main(main)
