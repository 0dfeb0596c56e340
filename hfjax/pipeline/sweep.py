"""Sweep planning: the grid flags, and the list of (grid point, validated RunFlags) they give.

    --grid=defense=none,lisa --grid=harmful_ratio=0,0.1 --hparams=lisa:rho=1
    --case='attack=pure_harmful;harmful_ratio=1;num_samples=20' --case=attack=hft

The runs are the product of every --grid and of the --case list: a case is a bundle of settings
that go together (an attack with its own budget), so a panel of attacks is one grid axis.

A grid point's run folder is RUN_DIR/runs/<flag-value_...>; every run shares the stage cache
RUN_DIR/_stages (unless --stage_cache names another), so identical stages run once.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path

from absl import flags

from hfjax.pipeline import flags as pflags
from hfjax.pipeline.config import ConfigError
from hfjax.pipeline.flags import RunFlags, validate

FIXED = ("run_dir", "stage_cache", "overwrite")


def define(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """The run flags plus --grid, --hparams, --dry_run, --keep_going (idempotent)."""
    pflags.define(flag_values)
    if "grid" in flag_values:
        return
    flags.DEFINE_multi_string("grid", [], "FLAG=V1,V2,... (repeatable): the sweep is the "
                              "product of all grids", flag_values=flag_values)
    flags.DEFINE_multi_string("case", [], "FLAG=V;FLAG=V (repeatable): settings that go "
                              "together (an attack with its budget); the sweep is the grid's "
                              "product times the list of cases", flag_values=flag_values)
    flags.DEFINE_multi_string("hparams", [], "NAME:K=V,K=V (repeatable): hyper-parameters of "
                              "defense NAME, used in the runs where --defense is NAME",
                              flag_values=flag_values)
    flags.DEFINE_bool("dry_run", False, "check every run's settings, list the runs, stop",
                      flag_values=flag_values)
    flags.DEFINE_bool("keep_going", True, "continue with the next run when one fails",
                      flag_values=flag_values)
    flags.DEFINE_float("worst_case_fa_drop", 10.0, "the worst case per defense counts only the "
                       "attack settings whose fine-tune accuracy stays within this many points "
                       "of the undefended fine-tune under the same setting (TamperBench's "
                       "bounded utility loss; 100: no bound)", lower_bound=0.0,
                       flag_values=flag_values)


def parse_grid(items: list[str], flag_values: flags.FlagValues = flags.FLAGS
               ) -> list[tuple[str, list]]:
    """['defense=none,lisa', 'seed=0,1'] -> [('defense', ['none', 'lisa']), ('seed', [0, 1])],
    each value parsed by its flag's parser."""
    out, seen = [], set()
    for item in items:
        name, sep, values = item.partition("=")
        name = name.strip()
        if not sep or not values.strip():
            raise ConfigError(f"--grid={item!r}: expected FLAG=V1,V2,...")
        if name in FIXED:
            raise ConfigError(f"--grid cannot vary {name!r}")
        if name in seen:
            raise ConfigError(f"--grid varies {name!r} twice")
        seen.add(name)
        try:
            parsed = [pflags.parse_value(name, v.strip(), flag_values)
                      for v in values.split(",")]
        except (flags.Error, ValueError) as e:
            raise ConfigError(f"--grid={item!r}: {e}") from None
        out.append((name, parsed))
    return out


def parse_cases(items: list[str], grid: list[tuple[str, list]],
                flag_values: flags.FlagValues = flags.FLAGS) -> list[dict]:
    """['attack=pure_harmful;harmful_ratio=1'] -> [{'attack': 'pure_harmful', 'harmful_ratio':
    1.0}], each value parsed by its flag's parser; [{}] without cases."""
    varied = {name for name, _ in grid}
    out = []
    for item in items:
        case: dict = {}
        for part in filter(None, (p.strip() for p in item.split(";"))):
            name, sep, value = part.partition("=")
            name = name.strip()
            if not sep:
                raise ConfigError(f"--case={item!r}: expected FLAG=V;FLAG=V")
            if name in FIXED or name in varied or name in case:
                why = "is varied by --grid" if name in varied else "is set twice" \
                    if name in case else "cannot vary"
                raise ConfigError(f"--case={item!r}: {name!r} {why}")
            try:
                case[name] = pflags.parse_value(name, value.strip(), flag_values)
            except (flags.Error, ValueError) as e:
                raise ConfigError(f"--case={item!r}: {e}") from None
        if not case:
            raise ConfigError(f"--case={item!r} sets nothing")
        out.append(case)
    return out or [{}]


def parse_hparams_flags(items: list[str]) -> dict[str, str]:
    """['lisa:rho=1,align_steps=5'] -> {'lisa': 'rho=1,align_steps=5'}."""
    out = {}
    for item in items:
        name, sep, text = item.partition(":")
        if not sep or not name.strip():
            raise ConfigError(f"--hparams={item!r}: expected NAME:K=V,K=V")
        out[name.strip()] = text
    return out


def run_name(combo: dict) -> str:
    text = "_".join(f"{k}-{v:g}" if isinstance(v, float) else f"{k}-{v}"
                    for k, v in combo.items()) or "run"
    return re.sub(r"[^A-Za-z0-9_.+=-]", "-", text)


def plan(flag_values: flags.FlagValues = flags.FLAGS, device_count: int | None = None
         ) -> tuple[Path, list[tuple[dict, RunFlags]]]:
    """(sweep folder, [(grid point, validated RunFlags)]): every run is checked up front."""
    base = pflags.flags_from_absl(flag_values)
    if not base.run_dir:
        raise ConfigError("--run_dir (the sweep folder) is required")
    root = Path(base.run_dir).expanduser().absolute()
    grid = parse_grid(flag_values["grid"].value, flag_values)
    per_defense = parse_hparams_flags(flag_values["hparams"].value)
    cases = parse_cases(flag_values["case"].value, grid, flag_values)
    names = [n for n, _ in grid]
    runs = []
    for *values, case in itertools.product(*[v for _, v in grid], cases):
        combo = {**dict(zip(names, values, strict=True)), **case}
        rc = base.replace(run_dir=str(root / "runs" / run_name(combo)),
                          stage_cache=base.stage_cache or str(root / "_stages"), **combo)
        if rc.defense in per_defense:
            rc = rc.replace(defense_hparams=per_defense[rc.defense])
        runs.append((combo, validate(rc, device_count)))
    return root, runs
