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
             "hfjax/pipeline/stages.py", "opt = optim.make_optimizer(ocfg, pre=pre)",
             "opt = optim.make_optimizer(ocfg, pre=[])",
             (f"{FAULTS}::test_a_gradient_defense_s_first_pipeline_step_equals_its_own_update",)),
    Mutation("repair-saves-unrepaired", "the repair stage saves the unrepaired adapter",
             "hfjax/pipeline/stages.py", "self._save_adapter(out, out_lora)",
             "self._save_adapter(out, lora)",
             (f"{FAULTS}::test_a_repair_saves_exactly_what_the_weight_function_returns",)),
    Mutation("data-defense-ignored", "the fine-tuning stage trains on the rows before the data "
             "defense", "hfjax/pipeline/stages.py",
             "records = self._data_defense(defense, self.user_records())",
             "records = self.user_records()",
             (f"{FAULTS}::test_a_data_defense_trains_on_exactly_the_rows_it_returns",)),
    Mutation("hs-inverted", "HS reported as 1 - HS", "hfjax/pipeline/stages.py",
             "hs = metrics_lib.harmful_score(judged.scores)",
             "hs = 1 - metrics_lib.harmful_score(judged.scores)",
             (f"{FAULTS}::test_hs_fa_and_the_degenerate_share_from_scripted_generations_are_exact",)),
    Mutation("fa-inverted", "FA reported as 1 - FA", "hfjax/pipeline/stages.py",
             "fa = float(np.mean(correct))", "fa = 1 - float(np.mean(correct))",
             (f"{FAULTS}::test_hs_fa_and_the_degenerate_share_from_scripted_generations_are_exact",)),
    Mutation("generation-order-lost", "answers filed in generation order, not prompt order",
             "hfjax/pipeline/stages.py",
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
             "hfjax/pipeline/stages.py",
             "return {\"sha256\": self._digest(\"model\", lambda: inputs_lib.model_digest(\n"
             "            model_path(self.rc))), \"dtype\": self.rc.dtype}",
             "return {\"sha256\": model_path(self.rc), \"dtype\": self.rc.dtype}",
             (f"{FAULTS}::test_a_data_file_or_the_weights_changed_in_place_make_a_rerun_refuse",)),
    Mutation("no-run-lock", "a second process may write the run folder",
             "hfjax/pipeline/stages.py",
             "return folder_lock(self.run_dir / \".lock\", f\"run folder {self.run_dir}\")",
             "return contextlib.nullcontext()",
             (f"{FAULTS}::test_a_second_process_on_a_run_folder_is_refused_naming_the_holder",)),
    Mutation("metrics-duplicated", "metrics.jsonl keeps rows past the restored step",
             "hfjax/train/loop.py", "        truncate_metrics(metrics_path, start)\n",
             "        pass\n",
             ("tests/test_train.py::test_resume_after_a_crash_cuts_the_metrics_file_back_to_"
              "the_checkpoint",)),
    Mutation("rows-dropped", "the last partial batch of an epoch is dropped",
             "hfjax/pipeline/stages.py",
             "rc.seed + salt, epochs, drop_last=False)", "rc.seed + salt, epochs, drop_last=True)",
             (f"{FAULTS}::test_rows_cut_to_nothing_are_counted_and_a_stage_without_loss_tokens_"
              "is_an_error",)),
    Mutation("subset-overwrites-summary", "a subset rerun writes only its own rows",
             "hfjax/pipeline/stages.py",
             "for which in MODEL_NAMES:", "for which in rc.models_to_eval:",
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
    Mutation("judge-without-eos", "the BeaverDam judge does not append the EOS it reads",
             "hfjax/eval/judges.py", "if self.append_eos and (not ids or ids[-1] != self.eos_id):",
             "if False:", ("tests/test_judges.py",)),
)


def _copy(dst: Path) -> None:
    ignore = shutil.ignore_patterns(".git", ".venv", "runs", "__pycache__", ".pytest_cache",
                                    ".ruff_cache", "*.egg-info")
    shutil.copytree(ROOT, dst, ignore=ignore, symlinks=True)


def run(mutation: Mutation, work: Path) -> tuple[bool, str, float]:
    """(caught, the last line of pytest's output, seconds) for one mutation."""
    tree = work / mutation.name
    _copy(tree)
    target = tree / mutation.file
    text = target.read_text()
    if text.count(mutation.old) != 1:
        raise SystemExit(f"{mutation.name}: the snippet occurs {text.count(mutation.old)} times "
                         f"in {mutation.file}; update the mutation")
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
