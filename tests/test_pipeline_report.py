"""The pipeline's tables from results records: HS, FA and the share of empty or degenerate
answers per model, the sweep table and the worst case over attack settings per defense."""

from hfjax.pipeline import report


def _run(defense: str, p: float, hs: float, fa: float, degenerate: float) -> dict:
    settings = {"defense": defense, "harmful_ratio": p, "num_samples": 200, "lr": 2e-4,
                "epochs": 2, "seed": 0}
    rows = [{"model": "base", "label": "unaligned", "harmful_score": 0.9,
             "finetune_accuracy": 0.6, "degenerate_share": 0.0, "judge": "kw", "task": "t"},
            {"model": "final", "label": f"attacked+{defense}", "harmful_score": hs,
             "finetune_accuracy": fa, "degenerate_share": degenerate, "judge": "kw",
             "task": "t"}]
    return {"run_dir": f"runs/{defense}-{p}", "settings": settings, "rows": rows}


RESULTS = [_run("none", 0.05, 0.5, 0.9, 0.0), _run("none", 0.1, 0.8, 0.8, 0.1),
           _run("lisa", 0.05, 0.2, 0.7, 0.0), _run("lisa", 0.1, 0.0, 0.0, 1.0)]


def test_run_table_puts_the_degenerate_share_next_to_hs():
    table = report.run_table(RESULTS[3])
    header, _, base, final = table.splitlines()[2:6]
    assert [c.strip() for c in header.split("|")[1:4]] == ["model", "HS (%)",
                                                          "empty/degenerate (%)"]
    assert [c.strip() for c in final.split("|")[1:5]] == ["attacked+lisa", "0.0", "100.0", "0.0"]
    assert [c.strip() for c in base.split("|")[1:5]] == ["unaligned", "90.0", "0.0", "60.0"]


def test_sweep_table_and_worst_case_report_the_attacked_models_degenerate_share():
    lines = report.sweep_table(RESULTS).splitlines()
    cells = [c.strip() for c in lines[0].split("|")]
    col = cells.index("degenerate attacked")
    assert [[c.strip() for c in line.split("|")][col] for line in lines[2:]] == \
        ["0.0", "10.0", "0.0", "100.0"]
    worst = {w["defense"]: w for w in report.worst_case(RESULTS)}
    assert worst["none"]["worst_hs"] == 0.8 and worst["none"]["degenerate_there"] == 0.1
    assert worst["lisa"]["worst_hs"] == 0.2 and worst["lisa"]["harmful_ratio"] == 0.05
    assert "degenerate there (%)" in report.worst_case_table(RESULTS)
