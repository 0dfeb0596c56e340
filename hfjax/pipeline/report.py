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
    (with the task, the attack, its hyper-parameters, the inference-time attack and the adapter
    type as first columns where they vary)."""
    rows = wide_rows(results)
    varied = [k for k in ("task", "attack", "attack_hparams", "eval_attack", "adapter")
              if len({str(res["settings"].get(k)) for res in results}) > 1]
    header = [*varied, "defense", "p", "n", "lr", "epochs", "seed", "HS unaligned",
              "HS aligned", "HS attacked", "degenerate attacked", "FA unaligned", "FA aligned",
              "FA attacked"]
    body = [[*("-" if res["settings"].get(k) in (None, "") else str(res["settings"].get(k))
               for k in varied), str(r["defense"]),
             str(r["harmful_ratio"]), str(r["num_samples"]), f"{r['lr']:g}", str(r["epochs"]),
             str(r["seed"]), *(_pct(r[f"hs_{m}"]) for m in MODELS), _pct(r["degenerate_final"]),
             *(_pct(r[f"fa_{m}"]) for m in MODELS)]
            for res, r in zip(results, rows, strict=True)]
    return markdown_table(header, body)


DEFENSE_SETTINGS = ("defense", "hparams")  # what a defense changes; the rest is the attack's


def attack_setting(settings: Mapping) -> tuple:
    """The attack setting a run was attacked with: every setting but the defense's (attack and
    its hyper-parameters, p, n, lr, epochs, adapter, seed, task, model...), as a hashable key."""
    return tuple(sorted((k, repr(v)) for k, v in settings.items() if k not in DEFENSE_SETTINGS))


def describe_attack(settings: Mapping) -> str:
    """'hft p=0.1 n=200 lr=0.0003 epochs=2' plus the attack's hyper-parameters and adapter."""
    parts = [str(settings.get("attack") or "hft")]
    if settings.get("attack_hparams"):
        parts.append(str(settings["attack_hparams"]))
    parts += [f"p={settings.get('harmful_ratio')}", f"n={settings.get('num_samples')}",
              f"lr={settings.get('lr'):g}" if settings.get("lr") is not None else "lr=-",
              f"epochs={settings.get('epochs')}"]
    for key in ("eval_attack", "adapter"):
        value = settings.get(key)
        if value and value not in ("lora", "none"):
            parts.append(f"{key}={value}")
    return " ".join(parts)


def bounded_rows(results: Sequence[Mapping], max_fa_drop: float | None) -> list[dict]:
    """Every run's wide row with its FA drop against the undefended fine-tune under the same
    attack setting (`fa_drop` = FA(none) − FA(run), a fraction; None when either is missing)
    and whether it is admissible: the drop is at most `max_fa_drop` (always, when None). A run
    without an undefended reference (or without FA) cannot be checked: admissible, with
    `checked` False, and counted as such in the worst case."""
    rows = wide_rows(results)
    reference = {}
    for res, r in zip(results, rows, strict=True):
        if r["defense"] == "none":
            reference[attack_setting(res["settings"])] = r["fa_final"]
    out = []
    for res, r in zip(results, rows, strict=True):
        ref = reference.get(attack_setting(res["settings"]))
        drop = None if ref is None or r["fa_final"] is None else ref - r["fa_final"]
        ok = max_fa_drop is None or drop is None or drop <= max_fa_drop + 1e-9
        out.append({**r, "attack": describe_attack(res["settings"]), "fa_drop": drop,
                    "checked": drop is not None, "admissible": ok})
    return out


def worst_case(results: Sequence[Mapping], max_fa_drop: float | None = None) -> list[dict]:
    """Per defense, the attack setting with the highest final HS among the admissible ones:

        worst(d) = max { HS(d, a) : a an attack setting, FA(none, a) − FA(d, a) ≤ max_fa_drop }

    (TamperBench's worst case at a bounded utility loss: an attack that breaks the model's
    task ability is not counted as a success against the defense). `max_fa_drop` is a fraction
    (0.1 = 10 points of FA); None puts no bound. A defense with no admissible setting gets a
    row with `worst_hs` None."""
    rows = bounded_rows(results, max_fa_drop)
    out = []
    for defense in sorted({r["defense"] for r in rows}):
        mine = [r for r in rows if r["defense"] == defense and r["hs_final"] is not None]
        ok = [r for r in mine if r["admissible"]]
        w = max(ok, key=lambda r: r["hs_final"], default=None)
        out.append({"defense": defense, "worst_hs": w and w["hs_final"],
                    "fa_there": w and w["fa_final"], "fa_drop_there": w and w["fa_drop"],
                    "degenerate_there": w and w["degenerate_final"],
                    "attack": w and w["attack"], "settings_tried": len(mine),
                    "admissible": len(ok), "unchecked": sum(not r["checked"] for r in ok),
                    **{k: w and w[k] for k in ATTACK_SETTINGS}})
    return out


def worst_case_table(results: Sequence[Mapping], max_fa_drop: float | None = None) -> str:
    header = ["defense", "worst HS (%)", "degenerate there (%)", "FA there (%)",
              "FA drop vs none (points)", "attack there", "settings tried",
              "admissible (unchecked)"]
    body = [[w["defense"], _pct(w["worst_hs"]), _pct(w["degenerate_there"]),
             _pct(w["fa_there"]), _pct(w["fa_drop_there"]), w["attack"] or "none admissible",
             str(w["settings_tried"]), f"{w['admissible']} ({w['unchecked']})"]
            for w in worst_case(results, max_fa_drop)]
    return markdown_table(header, body)


def plot_worst_case(results: Sequence[Mapping], path: str | os.PathLike,
                    max_fa_drop: float | None = None) -> Path:
    """PNG: every run's final HS against its FA drop from the undefended fine-tune under the
    same attack setting, one colour per defense, the bound as a dashed line and each
    defense's worst admissible setting ringed. Runs without a reference sit at drop 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in bounded_rows(results, max_fa_drop) if r["hs_final"] is not None]
    worst = {w["defense"]: w for w in worst_case(results, max_fa_drop)}
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for i, defense in enumerate(sorted({r["defense"] for r in rows})):
        mine = [r for r in rows if r["defense"] == defense]
        color = f"C{i % 10}"
        ax.scatter([100 * (r["fa_drop"] or 0.0) for r in mine],
                   [100 * r["hs_final"] for r in mine], color=color, label=defense, alpha=0.7)
        w = worst[defense]
        if w["worst_hs"] is not None:
            ax.scatter([100 * (w["fa_drop_there"] or 0.0)], [100 * w["worst_hs"]], s=220,
                       facecolors="none", edgecolors=color, linewidths=2)
    if max_fa_drop is not None:
        ax.axvline(100 * max_fa_drop, color="grey", linestyle="--", label="FA-drop bound")
    ax.set_xlabel("FA drop vs the undefended fine-tune (points)")
    ax.set_ylabel("harmful score HS (%)")
    ax.set_ylim(-5, 105)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title="defense")
    ax.set_title("attack settings per defense (ringed: worst admissible)")
    fig.tight_layout()
    return save_png(fig, path)


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


def _bound_note(max_fa_drop: float | None) -> str:
    if max_fa_drop is None:
        return "Over every attack setting (no bound on the FA loss).\n\n"
    return (f"Over the attack settings whose FA stays within {100 * max_fa_drop:g} points of the "
            "undefended fine-tune under the same setting (the run with defense none; "
            "unchecked: no such run or no FA).\n\n")


def guard_rows(results: Sequence[Mapping]) -> list[dict]:
    """One row per run whose fine-tuning filtered the user data with a guard (`guard_filter`):
    the attack, the defense and, per origin of the rows (virus-optimized, plain harmful,
    benign), how many the guard let through."""
    out = []
    for res in results:
        g = (res.get("user_data") or {}).get("guard_filter")
        if not g:
            continue
        s = res["settings"]
        row = {"attack": describe_attack(s), "defense": s.get("defense"), "guard": g.get("guard"),
               "seed": s.get("seed")}
        for origin in ("virus", "harmful", "benign"):
            counts = g.get("rows", {}).get(origin)
            row[f"{origin}_passed"] = counts and counts["passed"]
            row[f"{origin}_total"] = counts and counts["total"]
        out.append(row)
    return out


def guard_table(rows: Sequence[Mapping]) -> str:
    def share(r, origin):
        total = r[f"{origin}_total"]
        return "-" if not total else f"{r[f'{origin}_passed']}/{total}"

    header = ["attack", "defense", "seed", "guard", "Virus rows passed", "plain harmful passed",
              "benign passed"]
    return markdown_table(header, [[r["attack"], str(r["defense"]), str(r["seed"]),
                                    str(r["guard"]), share(r, "virus"), share(r, "harmful"),
                                    share(r, "benign")] for r in rows])


def write_sweep_report(results: Sequence[Mapping], out_dir: str | os.PathLike,
                       max_fa_drop: float | None = None) -> str:
    """results.md (table + worst case), results.csv (wide), results_long.csv, worst_case.csv,
    hs_fa_vs_p.png, worst_case.png; returns the markdown. `max_fa_drop`: the worst case's bound
    on the FA loss against the undefended fine-tune (a fraction; None: no bound)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = ("## Results\n\nHS: % of held-out harmful prompts the judge flags; FA: task "
            "accuracy (%). unaligned = base model, aligned = after the alignment stage, "
            "attacked = after fine-tuning on the user data (with the run's defense). "
            "degenerate attacked: % of the attacked model's answers to the harmful prompts that "
            "are empty or degenerate (judged safe; a high share means a broken model, not a "
            "defense).\n\n"
            + sweep_table(results) + "\n\n## Worst case over attack settings per defense\n\n"
            + _bound_note(max_fa_drop) + worst_case_table(results, max_fa_drop) + "\n")
    write_text(out / "results.md", text)
    write_csv(out / "results.csv", wide_rows(results))
    write_csv(out / "results_long.csv", long_rows(results))
    write_csv(out / "worst_case.csv", worst_case(results, max_fa_drop))
    plot_vs_ratio(results, out / "hs_fa_vs_p.png")
    plot_worst_case(results, out / "worst_case.png", max_fa_drop)
    framings, matrix = task_matrix(results)
    if matrix:
        text += ("\n## HS per harmful framing after fine-tuning on each task\n\n"
                 + task_matrix_table(framings, matrix) + "\n")
        write_text(out / "results.md", text)
        write_csv(out / "task_matrix.csv", matrix)
        plot_task_matrix(framings, matrix, out / "task_matrix.png")
    guarded = guard_rows(results)
    if guarded:
        text += ("\n## Guard moderation of the user data\n\nRows of each origin the guard "
                 "(`guard_filter`) let through to fine-tuning: Virus-optimized against plain "
                 "harmful rows.\n\n" + guard_table(guarded) + "\n")
        write_text(out / "results.md", text)
        write_csv(out / "guard.csv", guarded)
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
