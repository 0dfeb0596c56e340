"""The evaluation stage: greedy answers to held-out harmful prompts and task test rows, the judge,
HS, FA and the share of degenerate answers.

    HS = share of harmful-prompt answers the judge flags     FA = the task's accuracy
    degenerate share = answers that are empty, symbol-only or one repeated word (judged safe)

With --eval_framings every harmful prompt is asked in each task framing and HS is also reported
per framing. An inference-time attack (--eval_attack, e.g. prefilling) presents every evaluated
model's harmful prompts its way (after the fine-tuning attack's own format, for the final
model); for a prefilled answer the judge reads the prefix and the continuation (or the
continuation alone, as the attack's `score` says), and generations_harmful.jsonl records both.
The task's metric (`hfjax.tasks`: its `gold(record)` against the answer) gives FA and every
figure it has ("task_scores": ROUGE-1/2/L, BLEU and chrF, pass@1 with the sandbox's status
counts); a completion task is scored by the perplexity of its reference responses (FA None: a
perplexity is not a share).

Prompts are generated in batches sorted by length (less padding) and filed back under their own
prompt; every evaluation writes generations_harmful.jsonl, generations_task.jsonl and
results.json into its stage folder.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from hfjax import attacks
from hfjax import data as data_lib
from hfjax.data.framings import framed_set
from hfjax.eval import code_metrics
from hfjax.eval import judges as judges_lib
from hfjax.eval import metrics as metrics_lib
from hfjax.eval import report as report_lib
from hfjax.eval.generate import greedy_generate
from hfjax.eval.perplexity import perplexity
from hfjax.eval.target_match import target_match_report
from hfjax.models import adapters
from hfjax.pipeline.resources import Resources
from hfjax.pipeline.run_folder import write_json
from hfjax.pipeline.training import call_with_inputs


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

    def attack_prompt(self):
        """How the final model is asked: the attack's `eval_prompt` (how the attacker asks) and
        then each fine-tuning data defense's (how the provider asks: BEA's secret, PTST's safety
        system prompt), composed; None when none has one."""
        steps = []
        if self.rc.eval.attack_format and getattr(self.attack_obj(), "eval_prompt", None):
            steps.append(self.attack_obj().eval_prompt)
        if self.rc.finetune.train.epochs:
            for c in self.rc.finetune.train.defenses:
                if c.spec.level != "data":
                    continue
                hparams = dict(c.hparams)
                if "seed" in c.spec.hyperparameters:
                    hparams = {"seed": self.rc.run.seed, **hparams}
                fn = getattr(c.spec.build(**hparams), "eval_prompt", None)
                if fn is not None:
                    steps.append(lambda r, fn=fn, name=c.name: call_with_inputs(
                        fn, name, (r,), {"tokenizer": lambda: self.res.base.tokenizer}))
        if not steps:
            return None

        def ask(record):
            for step in steps:
                record = step(record)
            return record
        return ask

    def inference_attack(self):
        """The --eval_attack transform, built (None for none); its `score` says what the judge
        reads."""
        choice = self.rc.eval.inference_attack
        if choice is None:
            return None
        return attacks.get(choice.name).build(**choice.hparams)

    def presented(self, harm: list, which: str) -> list:
        """The harmful evaluation rows as model `which` is asked them: the final model as the
        fine-tuning attack asks (and the provider's data defenses), then every model as the
        inference-time attack presents them."""
        asked_as = self.attack_prompt() if which == "final" else None
        if asked_as is not None:
            harm = [asked_as(r) for r in harm]
        attack = self.inference_attack()
        if attack is not None:
            harm = call_with_inputs(attack, self.rc.eval.inference_attack.name, (harm,),
                                    {"tokenizer": lambda: self.res.base.tokenizer})
        return harm

    def attack_obj(self):
        """The run's attack as built (its `eval_prompt`, `triggered`, `target` where it has
        them), or None without a fine-tuning stage."""
        f = self.rc.finetune
        if not f.train.epochs:
            return None
        return attacks.get(f.attack.name).build(**f.attack.hparams)

    def defense_prompts(self) -> bool:
        """Whether a fine-tuning data defense changes how the final model is asked (then its
        task rows are asked so too: the provider serves every request that way)."""
        return any(c.spec.level == "data" and hasattr(
            c.spec.build(**dict(c.hparams)), "eval_prompt")
            for c in self.rc.finetune.train.defenses) if self.rc.finetune.train.epochs else False

    def input_filters(self) -> list:
        """The post stage's inference-level defenses, built: `filter(records, *, cfg, params,
        tokenizer) -> records`, applied to the final model's task inputs."""
        return [c.spec.build(**c.hparams) for c in self.rc.repair.defenses
                if c.spec.level == "inference"]

    def filtered(self, records: list) -> list:
        base = self.res.base
        for f in self.input_filters():
            records = f(records, cfg=base.cfg, params=base.params, tokenizer=base.tokenizer)
        return records

    def backdoor(self, params, lora, task: list, clean_answers: list[str]) -> dict | None:
        """P/C-Target Match of a trigger-poisoning attack (`hfjax.eval.target_match`): the task
        test rows with the attack's trigger (through the inference defenses, as the clean ones)
        against the same rows clean; None for other attacks."""
        attack = self.attack_obj()
        if attack is None or not hasattr(attack, "triggered"):
            return None
        triggered = self.filtered(attack.triggered(task, self.rc.run.seed))
        answers = self.generate(params, lora, triggered, self.rc.eval.task_max_new_tokens)
        return target_match_report(answers, clean_answers, attack.target)

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
        harm = self.presented(harm, "final")  # the longest form
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

    def applied(self, adapter) -> dict:
        """`forward` / `generate` keyword arguments that apply a trained adapter (LoRA or
        prefix) beside the params; {} for none (base, aligned, a full fine-tune's weights)."""
        if adapter is None:
            return {}
        return adapters.get(self.rc.finetune.train.adapter.kind).forward_kwargs(adapter)

    def generate(self, params, lora, records: list, max_new_tokens: int,
                 strip: bool = True) -> list[str]:
        """The decoded answers (`strip=False`: as decoded, e.g. to join a prefilled start)."""
        base = self.res.base
        tok, cfg = base.tokenizer, base.cfg
        ids = data_lib.encode_prompts(records, tok, self.rc.data.template)
        order = np.argsort([len(p) for p in ids], kind="stable")
        out: list[str] = [""] * len(ids)
        bs = self.rc.run.eval_batch_size
        for s in range(0, len(ids), bs):
            chunk = order[s:s + bs]
            gen = greedy_generate(cfg, params, [ids[i] for i in chunk],
                                  max_new_tokens=max_new_tokens, **self.applied(lora))
            for i, g in zip(chunk, gen, strict=True):
                text = tok.decode(g, skip_special_tokens=True)
                out[i] = text.strip() if strip else text
        return out

    def perplexity(self, params, lora, records: list) -> float:
        """Perplexity of the records' reference responses (`hfjax.eval.perplexity`), each row
        cut to the model's context, not to the training --max_length."""
        base, d = self.res.base, self.rc.data
        examples = data_lib.tokenize_records(records, base.tokenizer, d.template,
                                             base.cfg.max_position_embeddings)
        pad = base.tokenizer.pad_token_id if base.tokenizer.pad_token_id is not None else 0
        return perplexity(base.cfg, params, examples, **self.applied(lora),
                          batch_size=self.rc.run.eval_batch_size, pad_id=pad)

    def task_scores(self, params, lora, records: list, answers: list[str], golds: list
                    ) -> tuple[float | None, dict[str, float], list | None]:
        """(FA, every figure of the task's metric, per-example correctness or score): FA is
        None for a task scored by perplexity (lower is better, not a share); the per-example
        column is None for a corpus-level metric (BLEU)."""
        metric = self.res.data.task_metric
        if metric == "perplexity":
            return None, {"perplexity": self.perplexity(params, lora, records)}, None
        if metric == "pass_at_1":  # the programs run once, in the sandbox
            runs = code_metrics.run_answers(answers, golds)
            passed = [r.passed for r in runs]
            counts = {status: sum(r.status == status for r in runs)
                      for status in ("passed", "failed", "timeout", "memory", "error")}
            return float(np.mean(passed)), {"pass_at_1": float(np.mean(passed)), **counts}, passed
        exact = self.rc.eval.task_match == "exact"
        fa = metrics_lib.accuracy(metric, answers, golds, exact)
        scores = metrics_lib.details(metric, answers, golds)
        if metric in metrics_lib.CORPUS_LEVEL:
            return fa, scores, None
        return fa, scores, [metrics_lib.accuracy(metric, [a], [g], exact)
                            for a, g in zip(answers, golds, strict=True)]

    def run(self, out: Path, name: str, params, lora, *, main_process: bool) -> dict:
        """Evaluate one model (params, and its LoRA or None) into stage folder `out`."""
        e, which = self.rc.eval, name.removeprefix("eval_")
        harm, task = self.eval_sets()
        asked_as = self.attack_prompt() if which == "final" else None
        if asked_as is not None and self.defense_prompts():
            task = [asked_as(r) for r in task]
        harm = self.presented(harm, which)
        judge = self.judge()
        t0 = time.perf_counter()
        raw = self.generate(params, lora, harm, e.max_new_tokens, strip=False)
        prefills = [r.get("prefill", "") for r in harm]
        continuations = [a.strip() for a in raw]
        attack = self.inference_attack()
        answers = continuations if getattr(attack, "score", "full") == "continuation" else \
            [(p + a).strip() for p, a in zip(prefills, raw, strict=True)]
        t1 = time.perf_counter()
        prompts = [r["prompt"] for r in harm]
        judged = judges_lib.score_with(judge, prompts, answers)
        hs = metrics_lib.harmful_score(judged.scores)
        by_framing = hs_by_framing(harm, judged.scores)
        degenerate = [metrics_lib.is_degenerate(a) for a in answers]
        final = which == "final"
        clean = self.filtered(task) if final else task
        task_answers = self.generate(params, lora, clean, e.task_max_new_tokens)
        backdoor = self.backdoor(params, lora, task, task_answers) if final else None
        t2 = time.perf_counter()
        golds = [self.res.data.task.gold(r) for r in task]
        fa, task_scores, correct = self.task_scores(params, lora, clean, task_answers, golds)
        metric = self.res.data.task_metric
        degenerate_share = float(np.mean(degenerate))
        task_degenerate = metrics_lib.degenerate_share(task_answers)
        results = report_lib.make_results(
            model=which, judge=judge.name, harmful_score=hs, finetune_accuracy=fa, task=metric,
            n_harmful=len(harm), n_flagged=int(judged.flags.sum()), n_task=len(task),
            seeds={"seed": self.rc.run.seed, "data_seed": self.rc.data.data_seed},
            degenerate_share=degenerate_share, task_degenerate_share=task_degenerate,
            max_new_tokens=e.max_new_tokens, generate_s=round(t2 - t0, 2),
            task_scores=task_scores, **({"target_match": backdoor} if backdoor else {}),
            **({"inference_attack": {"name": e.inference_attack.name,
                                     "hparams": dict(e.inference_attack.hparams)}}
               if attack is not None else {}),
            **({"hs_by_framing": by_framing} if by_framing else {}))
        if main_process:
            report_lib.write_generations(out / "generations_harmful.jsonl",
                                         report_lib.generation_records(
                                             prompts, answers, [judged],
                                             extra={"degenerate": degenerate,
                                                    "framing": [r.get("framing") for r in harm],
                                                    **({"prefill": prefills,
                                                        "continuation": continuations}
                                                       if attack is not None else {})}))
            report_lib.write_generations(
                out / "generations_task.jsonl",
                report_lib.generation_records([task_text(r) for r in clean], task_answers,
                                              extra={"gold": golds, "correct": correct
                                                     or [None] * len(golds)}))
            write_json(out / "results.json", results)
        shown = f"FA {100 * fa:.1f}%" if fa is not None else ", ".join(
            f"{k} {v:.3g}" for k, v in task_scores.items())
        under = f" under {e.inference_attack.name}" if attack is not None else ""
        print(f"[{name}] HS {100 * hs:.1f}%{under}  {shown}  "
              f"(generation {t1 - t0:.1f} s + {t2 - t1:.1f} s)", flush=True)
        if backdoor:
            print(f"[{name}] target match: triggered {100 * backdoor['p_target_match']:.1f}% "
                  f"(hit {100 * backdoor['p_hit_rate']:.1f}%), clean "
                  f"{100 * backdoor['c_target_match']:.1f}%", flush=True)
        if by_framing:
            print(f"[{name}] HS by framing: " + ", ".join(
                f"{k} {100 * v:.1f}%" for k, v in by_framing.items()), flush=True)
        if degenerate_share or task_degenerate:
            print(f"[{name}] warning: {100 * degenerate_share:.0f}% of the harmful-prompt answers "
                  f"and {100 * task_degenerate:.0f}% of the task answers are empty or degenerate; "
                  f"the judge scores them as safe, so HS understates what a working model "
                  f"would do (see generations_*.jsonl)", flush=True)
        return {"harmful_score": hs, "finetune_accuracy": fa, "task_scores": task_scores,
                "degenerate_share": degenerate_share}
