"""Reports across runs: the results table (markdown + CSV), HS / FA plots against the harmful
ratio per defense, the worst case over attack settings per defense, and the task matrix (HS
per harmful framing for each fine-tuning task, `task_matrix.csv` / `task_matrix.png`).

A run's `results.json` (written by `Pipeline.write_results`) holds its settings and one row per
evaluated model (base = unaligned, aligned, final = after the attack and the defense). Tables
put one run per line with HS and FA of each model: HS = share of held-out harmful prompts the
judge flags, FA = task accuracy, both in %. Next to HS stands the share of empty or degenerate
answers to the harmful prompts: the judges score those as safe, so a broken model would
otherwise read as a perfect defense.
"""

from __future__ import annotations

import csv
import io
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from math import nan
from pathlib import Path

from hfjax.data.framings import FRAMINGS
from hfjax.eval.report import atomic_open, markdown_table
from hfjax.pipeline.run_folder import read_json

MODELS = ("base", "aligned", "final")
SETTING_COLUMNS = ("defense", "harmful_ratio", "num_samples", "lr", "epochs", "seed")
ATTACK_SETTINGS = ("harmful_ratio", "num_samples", "lr", "epochs", "seed")


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path) as f:
        f.write(text)


def write_csv(path: str | os.PathLike, rows: Sequence[Mapping]) -> None:
    """Rows (dicts) as CSV with the union of their keys as header, atomically."""
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    write_text(path, buf.getvalue())


def save_png(fig, path: str | os.PathLike) -> Path:
    """Write a matplotlib figure as PNG through a temporary file and a rename, then close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def load_results(run_dirs: Sequence[str | os.PathLike]) -> list[dict]:
    """The results.json of every run folder that has one (others are skipped)."""
    out = []
    for d in run_dirs:
        p = Path(d) / "results.json"
        if p.is_file():
            out.append(read_json(p))
    return out


def _pct(v) -> str:
    return "-" if v is None else f"{100 * float(v):.1f}"


def wide_rows(results: Sequence[Mapping]) -> list[dict]:
    """One dict per run: settings, then HS/FA (fractions) of base, aligned, final."""
    rows = []
    for res in results:
        s = res["settings"]
        row = {k: s.get(k) for k in SETTING_COLUMNS}
        by = {r["model"]: r for r in res["rows"]}
        for m in MODELS:
            row[f"hs_{m}"] = by.get(m, {}).get("harmful_score")
            row[f"fa_{m}"] = by.get(m, {}).get("finetune_accuracy")
            row[f"degenerate_{m}"] = by.get(m, {}).get("degenerate_share")
        row["judge"] = next((r["judge"] for r in res["rows"]), None)
        row["run_dir"] = res["run_dir"]
        rows.append(row)
    return rows


def long_rows(results: Sequence[Mapping]) -> list[dict]:
    """One dict per (run, evaluated model): settings, model label, HS, FA (fractions)."""
    rows = []
    for res in results:
        s = res["settings"]
        for r in res["rows"]:
            rows.append({**{k: s.get(k) for k in SETTING_COLUMNS}, "model": r["model"],
                         "label": r["label"], "harmful_score": r["harmful_score"],
                         "finetune_accuracy": r["finetune_accuracy"],
                         "degenerate_share": r.get("degenerate_share"), "judge": r["judge"],
                         "task": r["task"], "run_dir": res["run_dir"]})
    return rows


def run_table(res: Mapping) -> str:
    """One run: a line per evaluated model (unaligned / aligned / attacked+defense)."""
    s = res["settings"]
    body = [[r["label"], _pct(r["harmful_score"]), _pct(r.get("degenerate_share")),
             _pct(r["finetune_accuracy"]), r["judge"], r["task"]] for r in res["rows"]]
    head = (f"defense {s['defense']}, p = {s['harmful_ratio']}, n = {s['num_samples']}, "
            f"lr = {s['lr']}, epochs = {s['epochs']}, seed = {s['seed']}\n\n")
    return head + markdown_table(["model", "HS (%)", "empty/degenerate (%)", "FA (%)", "judge",
                             "task"], body)


def sweep_table(results: Sequence[Mapping]) -> str:
    """All runs: settings and HS/FA of the unaligned, aligned and attacked(+defense) models
    (with the task and the attack's hyper-parameters as first columns where they vary)."""
    rows = wide_rows(results)
    varied = [k for k in ("task", "attack_hparams")
              if len({str(res["settings"].get(k)) for res in results}) > 1]
    header = [*varied, "defense", "p", "n", "lr", "epochs", "seed", "HS unaligned",
              "HS aligned", "HS attacked", "degenerate attacked", "FA unaligned", "FA aligned",
              "FA attacked"]
    body = [[*(str(res["settings"].get(k)) for k in varied), str(r["defense"]),
             str(r["harmful_ratio"]), str(r["num_samples"]), f"{r['lr']:g}", str(r["epochs"]),
             str(r["seed"]), *(_pct(r[f"hs_{m}"]) for m in MODELS), _pct(r["degenerate_final"]),
             *(_pct(r[f"fa_{m}"]) for m in MODELS)]
            for res, r in zip(results, rows, strict=True)]
    return markdown_table(header, body)


def worst_case(results: Sequence[Mapping]) -> list[dict]:
    """Per defense, the attack setting (p, n, lr, epochs, seed) with the highest final HS."""
    best: dict[str, dict] = {}
    for r in wide_rows(results):
        if r["hs_final"] is None:
            continue
        cur = best.get(r["defense"])
        if cur is None or r["hs_final"] > cur["hs_final"]:
            best[r["defense"]] = r
    out = []
    for defense, r in sorted(best.items()):
        n = sum(1 for x in wide_rows(results) if x["defense"] == defense
                and x["hs_final"] is not None)
        out.append({"defense": defense, "worst_hs": r["hs_final"], "fa_there": r["fa_final"],
                    "degenerate_there": r["degenerate_final"], "settings_tried": n,
                    **{k: r[k] for k in ATTACK_SETTINGS}})
    return out


def worst_case_table(results: Sequence[Mapping]) -> str:
    header = ["defense", "worst HS (%)", "degenerate there (%)", "FA there (%)", "p", "n", "lr",
              "epochs", "seed", "settings tried"]
    body = [[w["defense"], _pct(w["worst_hs"]), _pct(w["degenerate_there"]), _pct(w["fa_there"]),
             str(w["harmful_ratio"]),
             str(w["num_samples"]), f"{w['lr']:g}", str(w["epochs"]), str(w["seed"]),
             str(w["settings_tried"])] for w in worst_case(results)]
    return markdown_table(header, body)


def plot_vs_ratio(results: Sequence[Mapping], path: str | os.PathLike) -> Path:
    """PNG: final HS (left) and FA (right) against the harmful ratio p, one line per defense
    (mean over the other settings, e.g. seeds; the band spans their min and max)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, dict[float, list[tuple]]] = defaultdict(lambda: defaultdict(list))
    for r in wide_rows(results):
        if r["hs_final"] is not None:
            groups[r["defense"]][float(r["harmful_ratio"])].append((r["hs_final"], r["fa_final"]))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for i, (metric, title) in enumerate([(0, "harmful score HS (%)"),
                                         (1, "fine-tune accuracy FA (%)")]):
        ax = axes[i]
        for defense, by_p in sorted(groups.items()):
            ps = sorted(by_p)
            vals = [[100 * v[metric] for v in by_p[p] if v[metric] is not None] or [nan]
                    for p in ps]  # FA is None for a task scored otherwise (perplexity)
            mean = [sum(v) / len(v) for v in vals]
            ax.plot(ps, mean, marker="o", label=defense)
            if any(len(v) > 1 for v in vals):
                ax.fill_between(ps, [min(v) for v in vals], [max(v) for v in vals], alpha=0.2)
        ax.set_xlabel("harmful ratio p")
        ax.set_ylabel(title)
        ax.set_ylim(-5, 105)
        ax.grid(alpha=0.3)
    axes[0].legend(title="defense")
    fig.suptitle("after the attack (and the defense)")
    fig.tight_layout()
    return save_png(fig, path)


def _framed(row: Mapping) -> Mapping[str, float]:
    return row.get("hs_by_framing") or {}


def task_matrix(results: Sequence[Mapping]) -> tuple[list[str], list[dict]]:
    """(framings, rows): HS per harmful framing of each fine-tuning task's attacked model (one
    row per task and defense: "xsum", "xsum + multitask_safety"), and a first row "none" for the
    model before fine-tuning (the aligned model, else the base), with the task's FA (or its
    score, e.g. perplexity) beside. Runs of one row (other seeds, ratios) are averaged. Empty
    when no run evaluated framed prompts."""
    framings: list[str] = []
    cells: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    scores: dict[str, list[float]] = defaultdict(list)
    score_name: dict[str, str] = {}
    for res in results:
        by = {r["model"]: r for r in res["rows"]}
        before = by.get("aligned") or by.get("base")
        task = str(res["settings"].get("task", "?"))
        defense = str(res["settings"].get("defense", "none"))
        tuned = task if defense == "none" else f"{task} + {defense}"
        for label, row in (("none", before), (tuned, by.get("final"))):
            if row is None or not _framed(row):
                continue
            for framing, hs in _framed(row).items():
                framings += [framing] if framing not in framings else []
                cells[label][framing].append(float(hs))
            if label != "none":
                name, value = _task_score(row)
                if value is not None:
                    scores[label].append(value)
                    score_name[label] = name
    known = list(FRAMINGS)
    framings.sort(key=lambda f: (known.index(f) if f in known else len(known), f))
    rows = []
    for label in sorted(cells, key=lambda k: (k != "none", k)):
        row: dict = {"finetune_task": label}
        for f in framings:
            v = cells[label].get(f)
            row[f"hs_{f}"] = sum(v) / len(v) if v else None
        s = scores.get(label)
        row["task_score"] = sum(s) / len(s) if s else None
        row["task_score_name"] = score_name.get(label, "")
        rows.append(row)
    return framings, rows


def _task_score(row: Mapping) -> tuple[str, float | None]:
    """The task's headline figure of a results row: FA, else its first task score."""
    if row.get("finetune_accuracy") is not None:
        return "FA", float(row["finetune_accuracy"])
    for name, value in (row.get("task_scores") or {}).items():
        return name, float(value)
    return "", None


def task_matrix_table(framings: Sequence[str], rows: Sequence[Mapping]) -> str:
    header = ["fine-tuning task", *(f"HS {f} (%)" for f in framings), "task score"]
    body = [[r["finetune_task"], *(_pct(r[f"hs_{f}"]) for f in framings),
             "-" if r["task_score"] is None else
             (_pct(r["task_score"]) + " FA" if r["task_score_name"] == "FA"
              else f"{r['task_score']:.2f} {r['task_score_name']}")] for r in rows]
    return markdown_table(header, body)


def plot_task_matrix(framings: Sequence[str], rows: Sequence[Mapping],
                     path: str | os.PathLike) -> Path:
    """PNG heatmap: HS (%) with fine-tuning tasks as rows and harmful framings as columns."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    grid = np.array([[np.nan if r[f"hs_{f}"] is None else 100 * r[f"hs_{f}"] for f in framings]
                     for r in rows], dtype=float)
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(framings), 1.2 + 0.5 * len(rows)))
    im = ax.imshow(grid, vmin=0, vmax=100, cmap="Reds", aspect="auto")
    ax.set_xticks(range(len(framings)), framings, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), [r["finetune_task"] for r in rows])
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.0f}", ha="center", va="center",
                        color="white" if grid[i, j] > 60 else "black")
    ax.set_xlabel("harmful prompts framed as")
    ax.set_ylabel("fine-tuned on")
    fig.colorbar(im, ax=ax, label="HS (%)")
    fig.tight_layout()
    return save_png(fig, path)


POISON_FACTORS = ("num_virtual_tokens", "trigger_type", "trigger_length", "position",
                  "harmful_ratio", "defense")


def _attack_hparams(text: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in (text or "").split(",") if "=" in item)


def poison_rows(results: Sequence[Mapping]) -> list[dict]:
    """One row per run whose attacked model has target-match figures (a trigger-poisoning
    attack): the factors of Jiang et al.'s study, P/C-Target Match and hit rates, and the
    clean task score (ROUGE-1 FA or perplexity)."""
    rows = []
    for res in results:
        final = next((r for r in res["rows"] if r["model"] == "final"), None)
        if final is None or not final.get("target_match"):
            continue
        s = res["settings"]
        hp = _attack_hparams(s.get("attack_hparams", ""))
        name, score = _task_score(final)
        rows.append({"task": s.get("task"), "num_virtual_tokens": s.get("num_virtual_tokens"),
                     "trigger_type": hp.get("trigger_type", "sentence"),
                     "trigger_length": int(hp.get("trigger_length", 8)),
                     "position": hp.get("position", "start"),
                     "harmful_ratio": s.get("harmful_ratio"), "defense": s.get("defense"),
                     "seed": s.get("seed"), **final["target_match"],
                     "clean_score": score, "clean_score_name": name, "run_dir": res["run_dir"]})
    return rows


def poison_table(rows: Sequence[Mapping]) -> str:
    header = ["task", "virtual tokens", "trigger", "length", "position", "p", "defense", "seed",
              "P-Target Match (%)", "P hit (%)", "C-Target Match (%)", "C hit (%)", "clean"]
    body = [[str(r["task"]), str(r["num_virtual_tokens"]), r["trigger_type"],
             str(r["trigger_length"]), r["position"], str(r["harmful_ratio"]), str(r["defense"]),
             str(r["seed"]), _pct(r["p_target_match"]), _pct(r["p_hit_rate"]),
             _pct(r["c_target_match"]), _pct(r["c_hit_rate"]),
             "-" if r["clean_score"] is None else f"{r['clean_score']:.3g} {r['clean_score_name']}"]
            for r in rows]
    return markdown_table(header, body)


def plot_poison(rows: Sequence[Mapping], path: str | os.PathLike) -> Path | None:
    """PNG: mean P-Target Match (success) and C-Target Match (on clean inputs; lower is
    stealthier) against each factor the sweep varied, one panel per factor; None when no factor
    varies."""
    factors = [f for f in POISON_FACTORS if len({str(r[f]) for r in rows}) > 1]
    if not factors:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(factors), figsize=(4 * len(factors), 3.5), squeeze=False)
    for ax, factor in zip(axes[0], factors, strict=True):
        values = sorted({r[factor] for r in rows}, key=lambda v: (isinstance(v, str), v))
        for key, label in (("p_target_match", "P-Target Match (triggered)"),
                           ("c_target_match", "C-Target Match (clean)")):
            means = [100 * sum(r[key] for r in rows if r[factor] == v)
                     / sum(1 for r in rows if r[factor] == v) for v in values]
            ax.plot([str(v) for v in values], means, marker="o", label=label)
        ax.set_xlabel(factor.replace("_", " "))
        ax.set_ylabel("target match (%)")
        ax.set_ylim(-5, 105)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    return save_png(fig, path)


def write_sweep_report(results: Sequence[Mapping], out_dir: str | os.PathLike) -> str:
    """results.md (table + worst case), results.csv (wide), results_long.csv, hs_fa_vs_p.png;
    returns the markdown."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = ("## Results\n\nHS: % of held-out harmful prompts the judge flags; FA: task "
            "accuracy (%). unaligned = base model, aligned = after the alignment stage, "
            "attacked = after fine-tuning on the user data (with the run's defense). "
            "degenerate attacked: % of the attacked model's answers to the harmful prompts that "
            "are empty or degenerate (judged safe; a high share means a broken model, not a "
            "defense).\n\n"
            + sweep_table(results) + "\n\n## Worst case over attack settings per defense\n\n"
            + worst_case_table(results) + "\n")
    write_text(out / "results.md", text)
    write_csv(out / "results.csv", wide_rows(results))
    write_csv(out / "results_long.csv", long_rows(results))
    write_csv(out / "worst_case.csv", worst_case(results))
    plot_vs_ratio(results, out / "hs_fa_vs_p.png")
    framings, matrix = task_matrix(results)
    if matrix:
        text += ("\n## HS per harmful framing after fine-tuning on each task\n\n"
                 + task_matrix_table(framings, matrix) + "\n")
        write_text(out / "results.md", text)
        write_csv(out / "task_matrix.csv", matrix)
        plot_task_matrix(framings, matrix, out / "task_matrix.png")
    poisoned = poison_rows(results)
    if poisoned:
        text += ("\n## Backdoor (trigger poisoning): target match per setting\n\n"
                 "P-Target Match: share of the target's phrases in the outputs on triggered "
                 "test inputs (attack success); C-Target Match: the same on clean inputs "
                 "(lower is stealthier); clean: the task's score on clean inputs.\n\n"
                 + poison_table(poisoned) + "\n")
        write_text(out / "results.md", text)
        write_csv(out / "poison.csv", poisoned)
        plot_poison(poisoned, out / "poison_vs_factors.png")
    return text
