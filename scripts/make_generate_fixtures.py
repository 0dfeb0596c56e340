"""Golden greedy generations from HF transformers `generate` (run with the torch python).

    /tmp/v311/bin/python scripts/make_generate_fixtures.py
    /tmp/v311/bin/python scripts/make_generate_fixtures.py --out /tmp/x --cases llama gemma2

For every parity case (tests/fixtures/parity/<case>/model, a tiny random float32 model made by
scripts/make_parity_fixtures.py) it loads the folder with transformers (eager attention, float32)
and runs `model.generate` greedily (do_sample=False, max_new_tokens 16) on a left-padded batch of
3 prompts of different lengths with an attention mask; transformers derives position_ids from
the mask (cumsum - 1) during generation, as hfjax does. It writes <out>/<case>.json:

    prompts            the 3 unpadded prompts (token id lists)
    input_ids, attention_mask   the left-padded batch given to `generate` (pad_id on the left)
    eos_id, pad_id, max_new_tokens
    hf_new_tokens      `generate`'s new tokens [B, n] as returned (pad_id after a row's EOS)
    generated          per row, the new tokens cut after the first EOS (EOS included): the form
                       `hfjax.eval.generate.greedy_generate` returns
    min_top2_margin    the smallest top-1 minus top-2 logit gap over every emitted token

How the batch and EOS are chosen (deterministically, from --seed): prompts are drawn with token
ids >= 3 (0 pad, 1 bos, 2 eos in the parity configs); a first run without EOS gives 16 tokens per
row; EOS is then set to a token that one row emits for the first time midway (step 3..11) and that
some other row never emits, so one row stops early and another runs the full 16 tokens. A seed is
accepted only when (a) every emitted token wins its argmax by more than MIN_MARGIN (float32 noise
between stacks, ~1e-5, cannot flip a token), and (b) the padded batch gives the same tokens as
`generate` on each prompt alone (transformers' own left padding is exact).

Gemma 2: the parity model's embeddings (N(0, 0.5^2), scaled by sqrt(hidden) and tied to the
head) make it copy its last input token forever, so no EOS can be picked midway and a broken
cache would go unnoticed. Its generation model is the parity model with `embed_tokens` x 0.1,
saved as <out>/gemma2_model/ (HF save_pretrained, ~0.7 MB); the JSON's "model" says which folder
each case uses. For the sliding-window cases (mistral, gemma2) the script also checks that
generating with the window switched off gives different tokens, so the fixture catches a cache
that ignores the window. Every file and folder is written to a temp name and moved in with
os.replace.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM

CASES = ("llama", "llama3", "smollm2", "mistral", "qwen2", "gemma2")
PROMPT_LENGTHS = (7, 3, 10)  # the padded width is 10; rows 0 and 1 are left-padded
MAX_NEW_TOKENS = 16
PAD_ID = 0
FIRST_ID = 3  # prompt tokens avoid pad (0), bos (1) and the config's eos (2)
MIN_MARGIN = 1e-3  # the parity tests hold logits to 1e-4; margins are kept 10x above that
EOS_STEPS = range(3, 12)  # where the early-stopping row emits its EOS
MAX_TRIES = 200
EMBED_SCALE = {"gemma2": 0.1}  # cases whose generation model rescales the parity embeddings


def left_pad(prompts: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), PAD_ID, np.int64)
    mask = np.zeros((len(prompts), width), np.int64)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = p
        mask[i, width - len(p) :] = 1
    return ids, mask


@torch.no_grad()
def hf_greedy(model, prompts: list[list[int]], eos_id: int | None):
    """transformers' greedy generate on the left-padded batch: (new tokens [B, n], margins)."""
    ids, mask = left_pad(prompts)
    model.generation_config.eos_token_id = eos_id  # None: no stopping, always 16 tokens
    out = model.generate(
        input_ids=torch.from_numpy(ids),
        attention_mask=torch.from_numpy(mask),
        do_sample=False,
        max_new_tokens=MAX_NEW_TOKENS,
        eos_token_id=eos_id,
        pad_token_id=PAD_ID,
        output_logits=True,
        return_dict_in_generate=True,
    )
    new = out.sequences[:, ids.shape[1] :].numpy()
    logits = torch.stack(out.logits, dim=1).float().numpy()  # [B, n, V]
    top2 = np.sort(logits, axis=-1)[..., -2:]
    margins = top2[..., 1] - top2[..., 0]
    return new, margins


def cut_after_eos(row: list[int], eos_id: int | None) -> list[int]:
    if eos_id is not None and eos_id in row:
        return row[: row.index(eos_id) + 1]
    return row


def choose_eos(rows: list[list[int]]) -> int | None:
    """A token one row emits first at step 3..11 (nearest 7 preferred), another never emits."""
    for k in sorted(EOS_STEPS, key=lambda k: abs(k - 7)):
        for r, row in enumerate(rows):
            t = row[k]
            others = [o for i, o in enumerate(rows) if i != r]
            if t not in row[:k] and any(t not in o for o in others):
                return int(t)
    return None


def load(model_dir: Path, **overrides):
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager", **overrides
    ).eval()
    assert model.config._attn_implementation == "eager"
    return model


def save_model_atomically(model, folder: Path) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    os.chmod(tmp, 0o755)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        old = folder.with_name(f".{folder.name}.old")
        if folder.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def window_ablation(case: str, model_dir: Path, prompts, eos: int, generated) -> dict:
    """Generate with the sliding window off; the tokens must differ from the fixture's."""
    if case == "mistral":
        off = load(model_dir, sliding_window=None)
    elif case == "gemma2":
        n = json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]
        off = load(model_dir, layer_types=["full_attention"] * n)
    else:
        return {}
    new, _ = hf_greedy(off, prompts, eos)
    changed = [cut_after_eos(r, eos) for r in new.tolist()]
    assert changed != generated, f"{case}: switching the sliding window off changes no token"
    rows = [b for b, (x, y) in enumerate(zip(changed, generated, strict=True)) if x != y]
    return {"no sliding window": {"rows_that_change": rows, "tokens": changed}}


def make_case(case: str, parity_dir: Path, out_dir: Path, seed: int) -> dict:
    model_dir = parity_dir / case / "model"
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"{model_dir} is missing; make it first with scripts/make_parity_fixtures.py"
        )
    model = load(model_dir)
    source = {"source": "parity", "path": f"tests/fixtures/parity/{case}/model"}
    if case in EMBED_SCALE:
        with torch.no_grad():
            model.get_input_embeddings().weight.mul_(EMBED_SCALE[case])
        model_dir = out_dir / f"{case}_model"
        save_model_atomically(model, model_dir)
        model = load(model_dir)
        source = {
            "source": "derived",
            "path": f"{case}_model",  # relative to this JSON's folder
            "derived_from": f"tests/fixtures/parity/{case}/model",
            "change": f"embed_tokens x {EMBED_SCALE[case]}",
        }
    vocab = model.config.vocab_size
    rng = np.random.default_rng(seed)
    for attempt in range(MAX_TRIES):
        prompts = [rng.integers(FIRST_ID, vocab, n).tolist() for n in PROMPT_LENGTHS]
        free, _ = hf_greedy(model, prompts, eos_id=None)
        eos = choose_eos(free.tolist())
        if eos is None:
            continue
        new, margins = hf_greedy(model, prompts, eos_id=eos)
        generated = [cut_after_eos(row, eos) for row in new.tolist()]
        live = np.zeros(margins.shape, bool)  # positions where a row still emits a real token
        for b, g in enumerate(generated):
            live[b, : len(g)] = True
        min_margin = float(margins[live].min())
        lengths = [len(g) for g in generated]
        if min_margin <= MIN_MARGIN or min(lengths) == MAX_NEW_TOKENS:
            continue
        if max(lengths) != MAX_NEW_TOKENS:
            continue
        alone = [cut_after_eos(hf_greedy(model, [p], eos)[0][0].tolist(), eos) for p in prompts]
        if alone != generated:
            continue
        ids, mask = left_pad(prompts)
        return {
            "case": case,
            "model": source,
            "transformers_version": transformers.__version__,
            "torch_version": torch.__version__,
            "seed": seed,
            "attempt": attempt,
            "max_new_tokens": MAX_NEW_TOKENS,
            "eos_id": eos,
            "pad_id": PAD_ID,
            "prompts": prompts,
            "input_ids": ids.tolist(),
            "attention_mask": mask.tolist(),
            "hf_new_tokens": new.tolist(),
            "generated": generated,
            "lengths": lengths,
            "min_top2_margin": min_margin,
            "batched_equals_one_by_one": True,
            "ablations": window_ablation(case, model_dir, prompts, eos, generated),
        }
    raise RuntimeError(
        f"{case}: no prompt batch in {MAX_TRIES} tries met the margin / early-EOS conditions"
    )


def write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(obj, indent=1) + "\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    root = Path(__file__).resolve().parents[1]
    ap.add_argument("--models", type=Path, default=root / "tests/fixtures/parity")
    ap.add_argument("--out", type=Path, default=root / "tests/fixtures/generate")
    ap.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    for case in args.cases:
        meta = make_case(case, args.models, args.out, args.seed)
        write_json(args.out / f"{case}.json", meta)
        print(
            f"{case:8s} eos {meta['eos_id']:4d}  lengths {meta['lengths']}  "
            f"min top-2 margin {meta['min_top2_margin']:.3g}  (attempt {meta['attempt']})"
            + (f"  ablations: {list(meta['ablations'])}" if meta["ablations"] else ""),
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
