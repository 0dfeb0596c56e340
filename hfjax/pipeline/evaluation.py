"""The evaluation stage: greedy answers to held-out harmful prompts and task test rows, the judge,
HS, FA and the share of degenerate answers.

    HS = share of harmful-prompt answers the judge flags     FA = the task's accuracy
    degenerate share = answers that are empty, symbol-only or one repeated word (judged safe)

Prompts are generated in batches sorted by length (less padding) and filed back under their own
prompt; every evaluation writes generations_harmful.jsonl, generations_task.jsonl and
results.json into its stage folder.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from hfjax import data as data_lib
from hfjax.data.framings import framed_set
from hfjax.eval import judges as judges_lib
from hfjax.eval import metrics as metrics_lib
from hfjax.eval import report as report_lib
from hfjax.eval.generate import greedy_generate
from hfjax.pipeline.resources import Resources
from hfjax.pipeline.run_folder import write_json


def task_text(r: Mapping) -> str:
    return r["prompt"] + (f"\n\n{r['input']}" if r.get("input") else "")


def hs_by_framing(records, scores, threshold: float = 0.5) -> dict[str, float]:
    """{framing: HS over the prompts presented in it} in order of first appearance; {} when no
    prompt carries a framing."""
    groups: dict[str, list[float]] = {}
    for r, s in zip(records, scores, strict=True):
        if r.get("framing"):
            groups.setdefault(r["framing"], []).append(s)
    return {f: metrics_lib.harmful_score(v, threshold) for f, v in groups.items()}


class Evaluator:
    """The evaluation of one run's models (module docstring)."""

    def __init__(self, res: Resources):
        self.res, self.rc = res, res.rc

    def judge(self) -> judges_lib.Judge:
        e = self.rc.eval
        return judges_lib.make_judge(e.judge, max_length=e.judge_max_length)

    def eval_sets(self) -> tuple[list, list]:
        d, e = self.res.data, self.rc.eval
        seed, order = self.rc.data.data_seed, self.rc.data.row_order
        harm = data_lib.build_eval_set(d.harmful_eval, min(e.eval_size, len(d.harmful_eval)),
                                       seed, order)
        if e.framings:  # rows framed already (MultiTaskBench) stay as they are
            harm = [r for r in harm if r.get("framing")] + framed_set(
                [r for r in harm if not r.get("framing")], e.framings, seed)
        task = data_lib.build_eval_set(d.task_test, min(e.task_eval_size, len(d.task_test)),
                                       seed, order)
        return harm, task

    def check_context(self) -> None:
        """Every evaluation prompt plus its generation budget fits the model's context."""
        base, e = self.res.base, self.rc.eval
        limit = base.cfg.max_position_embeddings
        harm, task = self.eval_sets()
        for what, records, budget, flag in (
                ("harmful evaluation", harm, e.max_new_tokens, "max_new_tokens"),
                ("task test", task, e.task_max_new_tokens, "task_max_new_tokens")):
            lengths = [len(ids) for ids in data_lib.encode_prompts(records, base.tokenizer,
                                                                   self.rc.data.template)]
            over = [n for n in lengths if n + budget > limit]
            if over:
                raise data_lib.DataError(
                    f"{len(over)} of {len(lengths)} {what} prompts do not fit the model's "
                    f"context of {limit} tokens with --{flag}={budget} (the longest prompt has "
                    f"{max(over)} tokens); shorten or drop them, or lower --{flag}")

    def generate(self, params, lora, records: list, max_new_tokens: int) -> list[str]:
        base = self.res.base
        tok, cfg = base.tokenizer, base.cfg
        ids = data_lib.encode_prompts(records, tok, self.rc.data.template)
        order = np.argsort([len(p) for p in ids], kind="stable")
        out: list[str] = [""] * len(ids)
        bs = self.rc.run.eval_batch_size
        for s in range(0, len(ids), bs):
            chunk = order[s:s + bs]
            gen = greedy_generate(cfg, params, [ids[i] for i in chunk],
                                  max_new_tokens=max_new_tokens, lora=lora)
            for i, g in zip(chunk, gen, strict=True):
                out[i] = tok.decode(g, skip_special_tokens=True).strip()
        return out

    def run(self, out: Path, name: str, params, lora, *, main_process: bool) -> dict:
        """Evaluate one model (params, and its LoRA or None) into stage folder `out`."""
        e, which = self.rc.eval, name.removeprefix("eval_")
        harm, task = self.eval_sets()
        judge = self.judge()
        t0 = time.perf_counter()
        answers = self.generate(params, lora, harm, e.max_new_tokens)
        t1 = time.perf_counter()
        prompts = [r["prompt"] for r in harm]
        judged = judges_lib.score_with(judge, prompts, answers)
        hs = metrics_lib.harmful_score(judged.scores)
        by_framing = hs_by_framing(harm, judged.scores)
        degenerate = [metrics_lib.is_degenerate(a) for a in answers]
        task_answers = self.generate(params, lora, task, e.task_max_new_tokens)
        t2 = time.perf_counter()
        golds = [r.get("label") or r.get("answer") for r in task]
        metric = self.res.data.task_metric
        exact = e.task_match == "exact"
        correct = [metrics_lib.accuracy(metric, [a], [g], exact) for a, g in
                   zip(task_answers, golds, strict=True)]
        fa = float(np.mean(correct))
        degenerate_share = float(np.mean(degenerate))
        task_degenerate = metrics_lib.degenerate_share(task_answers)
        results = report_lib.make_results(
            model=which, judge=judge.name, harmful_score=hs, finetune_accuracy=fa, task=metric,
            n_harmful=len(harm), n_flagged=int(judged.flags.sum()), n_task=len(task),
            seeds={"seed": self.rc.run.seed, "data_seed": self.rc.data.data_seed},
            degenerate_share=degenerate_share, task_degenerate_share=task_degenerate,
            max_new_tokens=e.max_new_tokens, generate_s=round(t2 - t0, 2),
            **({"hs_by_framing": by_framing} if by_framing else {}))
        if main_process:
            report_lib.write_generations(out / "generations_harmful.jsonl",
                                         report_lib.generation_records(
                                             prompts, answers, [judged],
                                             extra={"degenerate": degenerate,
                                                    "framing": [r.get("framing") for r in harm]}))
            report_lib.write_generations(
                out / "generations_task.jsonl",
                report_lib.generation_records([task_text(r) for r in task], task_answers,
                                              extra={"gold": golds, "correct": correct}))
            write_json(out / "results.json", results)
        print(f"[{name}] HS {100 * hs:.1f}%  FA {100 * fa:.1f}%  "
              f"(generation {t1 - t0:.1f} s + {t2 - t1:.1f} s)", flush=True)
        if by_framing:
            print(f"[{name}] HS by framing: " + ", ".join(
                f"{k} {100 * v:.1f}%" for k, v in by_framing.items()), flush=True)
        if degenerate_share or task_degenerate:
            print(f"[{name}] warning: {100 * degenerate_share:.0f}% of the harmful-prompt answers "
                  f"and {100 * task_degenerate:.0f}% of the task answers are empty or degenerate; "
                  f"the judge scores them as safe, so HS understates what a working model "
                  f"would do (see generations_*.jsonl)", flush=True)
        return {"harmful_score": hs, "finetune_accuracy": fa,
                "degenerate_share": degenerate_share}
