"""Mutation check: break the code in ways that would make a results table wrong, and show that
the test suite fails for each.

Each mutation replaces one snippet of a source file in a copy of the checkout (the checkout
itself is never touched), then runs the tests that must catch it, with the copy first on
PYTHONPATH. A mutation is "caught" when those tests fail. Prints a table and exits non-zero if a
mutation survives.

    .venv/bin/python scripts/check_mutations.py [--only NAME,...] [--keep]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FAULTS = "tests/test_pipeline_faults.py"


@dataclass(frozen=True)
class Mutation:
    name: str
    what: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]


MUTATIONS = (
    Mutation("ignore-gradient-defense", "the train stage ignores every gradient defense",
             "hfjax/train/builder.py",
             "chain = [*pre, *compose.transforms(defenses, **run_inputs)]", "chain = [*pre]",
             (f"{FAULTS}::test_a_gradient_defense_s_first_pipeline_step_equals_its_own_update",)),
    Mutation("repair-saves-unrepaired", "the repair stage saves the unrepaired adapter",
             "hfjax/pipeline/training.py",
             "            tuned, report = result if isinstance(result, tuple) else (result, {})",
             "            _, report = result if isinstance(result, tuple) else (result, {})",
             (f"{FAULTS}::test_a_repair_saves_exactly_what_the_weight_function_returns",)),
    Mutation("data-defense-ignored", "the fine-tuning stage trains on the rows before the data "
             "defense", "hfjax/pipeline/training.py",
             "records = self.data_defenses(settings.defenses, self.user_records(), \"finetune\")",
             "records = self.user_records()",
             (f"{FAULTS}::test_a_data_defense_trains_on_exactly_the_rows_it_returns",)),
    Mutation("hs-inverted", "HS reported as 1 - HS", "hfjax/pipeline/evaluation.py",
             "hs = metrics_lib.harmful_score(judged.scores)",
             "hs = 1 - metrics_lib.harmful_score(judged.scores)",
             (f"{FAULTS}::test_hs_fa_and_the_degenerate_share_from_scripted_generations_are_exact",)),
    Mutation("fa-inverted", "FA reported as 1 - FA", "hfjax/pipeline/evaluation.py",
             "fa = float(np.mean(correct))", "fa = 1 - float(np.mean(correct))",
             (f"{FAULTS}::test_hs_fa_and_the_degenerate_share_from_scripted_generations_are_exact",)),
    Mutation("generation-order-lost", "answers filed in generation order, not prompt order",
             "hfjax/pipeline/evaluation.py",
             "for i, g in zip(chunk, gen, strict=True):",
             "for i, g in zip(range(s, s + len(chunk)), gen, strict=True):",
             (f"{FAULTS}::test_hs_fa_and_the_degenerate_share_from_scripted_generations_are_exact",)),
    Mutation("oracle-returns-zero", "the optimizer's gradient oracle returns a zero loss",
             "hfjax/train/step.py", "loss_fn=loss_fn, batches=batches, rng=sub,",
             "loss_fn=lambda *a, **k: (jnp.zeros(()), {}), batches=batches, rng=sub,",
             ("tests/test_train.py::test_optimizer_receives_the_gradient_oracle_and_all_batches"
              "_as_extra_args",)),
    Mutation("nan-accepted", "a non-finite training step is accepted", "hfjax/train/loop.py",
             "        if bad:\n            raise NonFiniteError(",
             "        if bad and False:\n            raise NonFiniteError(",
             (f"{FAULTS}::test_a_diverged_training_stops_its_stage_unmarked_and_writes_no_table",
              "tests/test_train.py::test_a_diverged_step_stops_the_loop_naming_it_and_no_"
              "checkpoint_holds_its_state")),
    Mutation("key-by-path", "the base model is keyed by path, not content",
             "hfjax/pipeline/resources.py",
             "return {\"sha256\": self._digest(\"model\", lambda: inputs_lib.model_digest(path)),",
             "return {\"sha256\": str(path),",
             (f"{FAULTS}::test_a_data_file_or_the_weights_changed_in_place_make_a_rerun_refuse",)),
    Mutation("no-run-lock", "a second process may write the run folder",
             "hfjax/pipeline/orchestrator.py",
             "return folder_lock(self.run_dir / \".lock\", f\"run folder {self.run_dir}\")",
             "return contextlib.nullcontext()",
             (f"{FAULTS}::test_a_second_process_on_a_run_folder_is_refused_naming_the_holder",)),
    Mutation("metrics-duplicated", "metrics.jsonl keeps rows past the restored step",
             "hfjax/train/loop.py", "        truncate_metrics(metrics_path, start)\n",
             "        pass\n",
             ("tests/test_train.py::test_resume_after_a_crash_cuts_the_metrics_file_back_to_"
              "the_checkpoint",)),
    Mutation("rows-dropped", "the last partial batch of an epoch is dropped",
             "hfjax/pipeline/training.py",
             "primary = self.batcher(examples, bs, seed, settings.epochs, drop_last=False)",
             "primary = self.batcher(examples, bs, seed, settings.epochs, drop_last=True)",
             (f"{FAULTS}::test_rows_cut_to_nothing_are_counted_and_a_stage_without_loss_tokens_"
              "is_an_error",)),
    Mutation("subset-overwrites-summary", "a subset rerun writes only its own rows",
             "hfjax/pipeline/orchestrator.py",
             "for which in MODEL_NAMES:", "for which in self.rc.run.models_to_eval:",
             (f"{FAULTS}::test_a_subset_rerun_keeps_the_other_models_rows_in_the_summary",)),
    Mutation("degenerate-not-counted", "empty answers are not reported next to HS",
             "hfjax/eval/metrics.py",
             "    if not any(c.isalnum() for c in text):\n        return True",
             "    if not any(c.isalnum() for c in text):\n        return False",
             (f"{FAULTS}::test_hs_fa_and_the_degenerate_share_from_scripted_generations_are_exact",)),
    Mutation("vaccine-unnormalized", "Vaccine's perturbation not normalized to norm rho",
             "hfjax/defenses/alignment/vaccine.py",
             "return rho * perturb_grads / (optax.tree.norm(perturb_grads) + 1e-7)",
             "return rho * perturb_grads",
             ("tests/test_defense_reference.py",)),
    Mutation("booster-sign", "Booster's harmful-gradient gap taken with the wrong sign",
             "hfjax/defenses/alignment/booster.py", "g + lam * (a - b)", "g + lam * (b - a)",
             ("tests/test_defense_reference.py",)),
    Mutation("no-clipping", "--max_grad_norm is ignored", "hfjax/train/optim.py",
             "inner = optax.chain(optax.clip_by_global_norm(c.max_grad_norm), adamw) if "
             "c.max_grad_norm \\\n        else adamw",
             "inner = adamw", ("tests/test_train_reference.py",)),
    Mutation("linear-is-constant", "the linear schedule never decays", "hfjax/train/optim.py",
             "main = optax.linear_schedule(c.learning_rate, 0.0, decay_steps)",
             "main = optax.constant_schedule(c.learning_rate)",
             ("tests/test_train_reference.py",)),
    Mutation("no-accumulation", "gradient accumulation is ignored", "hfjax/train/optim.py",
             "if c.accumulation_steps > 1:", "if False:", ("tests/test_train_reference.py",)),
    Mutation("absolute-links", "run folder links to cached stages are absolute",
             "hfjax/pipeline/run_folder.py",
             "rel = os.path.relpath(target.absolute(), link.absolute().parent)",
             "rel = str(target.absolute())",
             ("tests/test_pipeline.py::test_a_moved_run_folder_with_its_stage_cache_resumes_"
              "without_redoing_a_stage",)),
    Mutation("adapter-names-a-path", "an adapter names its base by the local path it was read "
             "from", "hfjax/pipeline/portable.py",
             "return BaseRef(path.name, None, f\"the local HF folder {model_arg or path}\")",
             "return BaseRef(str(path), None, f\"the local HF folder {model_arg or path}\")",
             ("tests/test_pipeline.py::test_adapter_folders_name_a_portable_base_and_say_what_"
              "they_apply_to",)),
    Mutation("judge-without-eos", "the BeaverDam judge does not append the EOS it reads",
             "hfjax/eval/judges.py", "if self.append_eos and (not ids or ids[-1] != self.eos_id):",
             "if False:", ("tests/test_judges.py",)),
)


# The unmutated copy must pass every test the mutations use: a failure there (a file the copy
# lacks, a test broken on its own) would read as "caught" for every mutation.
CONTROL = Mutation("control", "nothing (the unmutated copy)", "", "", "",
                   tuple(dict.fromkeys(t for m in MUTATIONS for t in m.tests)))


def _copy(dst: Path) -> None:
    ignore = shutil.ignore_patterns(".git", ".venv", "runs", "__pycache__", ".pytest_cache",
                                    ".ruff_cache", "*.egg-info")
    shutil.copytree(ROOT, dst, ignore=ignore, symlinks=True)


def run(mutation: Mutation, work: Path) -> tuple[bool, str, float]:
    """(caught, the last line of pytest's output, seconds) for one mutation."""
    tree = work / mutation.name
    _copy(tree)
    target = tree / mutation.file
    text = target.read_text() if mutation is not CONTROL else ""
    if mutation is CONTROL:
        pass
    elif text.count(mutation.old) != 1:
        raise SystemExit(f"{mutation.name}: the snippet occurs {text.count(mutation.old)} times "
                         f"in {mutation.file}; update the mutation")
    else:
        target.write_text(text.replace(mutation.old, mutation.new))
    env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                           *mutation.tests], cwd=tree, env=env, capture_output=True, text=True)
    last = (proc.stdout.strip().splitlines() or [""])[-1]
    return proc.returncode != 0, last, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma-separated mutation names")
    ap.add_argument("--keep", action="store_true", help="keep the mutated copies")
    args = ap.parse_args()
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only.split(",")]
    work = Path(tempfile.mkdtemp(prefix="hfjax-mutations-"))
    rows, survived = [], []
    try:
        failed, last, seconds = run(CONTROL, work)
        passed = not failed
        if not args.keep:
            shutil.rmtree(work / CONTROL.name)
        rows.append(f"| control | {CONTROL.what} | {'passes' if passed else 'FAILS'} | {last} | "
                    f"{seconds:.0f} s |")
        print(rows[-1], flush=True)
        if not passed:
            raise SystemExit("the unmutated copy fails its tests; no mutation can be judged")
        for m in chosen:
            caught, last, seconds = run(m, work)
            rows.append(f"| {m.name} | {m.what} | {'caught' if caught else 'SURVIVED'} | "
                        f"{last} | {seconds:.0f} s |")
            print(rows[-1], flush=True)
            if not caught:
                survived.append(m.name)
            if not args.keep:
                shutil.rmtree(work / m.name)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print("\n| mutation | what it breaks | verdict | pytest | time |\n|---|---|---|---|---|")
    print("\n".join(rows))
    if survived:
        raise SystemExit(f"mutations that survived: {survived}")


if __name__ == "__main__":
    main()
