"""Run the experiment pipeline from a RunFlags JSON, as one process or as one of N
`jax.distributed` processes on localhost (CPU collectives through gloo).

    python tests/workers/pipeline_worker.py CONFIG.json OUT.json [--process_id I
        --num_processes N --port P --devices_per_process D]
"""

import argparse
import json
import time

import jax

parser = argparse.ArgumentParser()
parser.add_argument("config")
parser.add_argument("out")
parser.add_argument("--process_id", type=int, default=0)
parser.add_argument("--num_processes", type=int, default=1)
parser.add_argument("--port", type=int, default=0)
parser.add_argument("--devices_per_process", type=int, default=2)
args = parser.parse_args()

jax.config.update("jax_num_cpu_devices", args.devices_per_process)
if args.num_processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{args.port}", num_processes=args.num_processes,
                               process_id=args.process_id, shutdown_timeout_seconds=900)
# the shutdown barrier waits up to 15 min: the main process writes the reports and the merged
# aligned model after the last barrier, which on a loaded machine took over 5 minutes

from hfjax.pipeline import Pipeline, RunFlags, run_folder  # noqa: E402

if args.num_processes > 1 and jax.process_index() == 0:
    # process 0 writes every stage's DONE marker a second late: without the pipeline's barriers
    # the other process would find its upstream stage unfinished and fail (deterministically)
    finish = run_folder.StageDir.finish

    def late_finish(self, *a, **k):
        time.sleep(1.0)
        return finish(self, *a, **k)

    run_folder.StageDir.finish = late_finish

res = Pipeline(RunFlags(**json.loads(open(args.config).read()))).run()
if jax.process_index() == 0:
    with open(args.out, "w") as f:
        json.dump({"rows": res["rows"], "processes": jax.process_count(),
                   "devices": jax.device_count()}, f, default=str)
