"""Training-step pairs for the lossless benchmark: SmolLM2-135M after 1 and after a few AdamW steps.

A fine-tune checkpoint saved one optimizer step (or a few) after another is the case where
changed-only lossless deltas matter most: in bf16 most elements do not change at all (the
update is below half a unit in the last place), in f32 nearly every element with a gradient
changes by a few units in the last place.  This script makes such pairs from the SmolLM2
fidelity models (``bench/fidelity_models.py``):

* ``step<n>-f32``: the float32 base after ``n`` AdamW steps in float32;
* ``step<n>-bf16``: the bfloat16 base, widened exactly to float32 master weights, after
  ``n`` AdamW steps, saved rounded to bfloat16 (mixed-precision training with float32
  master weights, bf16 checkpoints).

The optimizer and data follow the fidelity fine-tunes' recipe (``SmolRecipe``: AdamW,
betas (0.9, 0.95), no weight decay, gradient clipping at 1.0, batches of 4 x 128 tokens of
the news training texts) at a constant learning rate of ``--lr`` (default 1e-4, the recipe's
peak).  Each folder holds ``model.safetensors`` with the base file's tensor names, plus the
base's config and tokenizer.  Needs torch and transformers (``/work/venv-bench``)::

    /work/venv-bench/bin/python bench/lossless_pairs.py --cache /work/cache/fidelity \\
        --out bench/.cache/lossless/pairs --steps 1,4

Deterministic for a given torch build and thread count (``--threads``, default 2).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))


def make_pairs(cache: Path, out: Path, steps: tuple[int, ...], lr: float, threads: int) -> dict:
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fidelity_models import SmolRecipe, _token_stream, smollm_texts

    torch.set_num_threads(threads)
    recipe = SmolRecipe()
    smol = cache / "smollm"
    texts = smollm_texts("news", recipe.split_seed, recipe.heldout_fraction)[0]
    tokenizer = AutoTokenizer.from_pretrained(smol / "base")
    stream = _token_stream(tokenizer, texts)
    blocks = stream[:len(stream) // recipe.seq_len * recipe.seq_len].view(-1, recipe.seq_len)
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(recipe.seed))
    report = {"lr": lr, "recipe": recipe.__dict__, "threads": threads,
              "torch": torch.__version__, "pairs": {}}
    for kind, base_name, save_dtype in (("f32", "base", torch.float32),
                                        ("bf16", "base-bf16", torch.bfloat16)):
        base = smol / base_name
        with safe_open(str(base / "model.safetensors"), "pt") as f:
            names = list(f.keys())
        torch.manual_seed(recipe.seed)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95),
                                      weight_decay=recipe.weight_decay)
        losses = []
        started = time.perf_counter()
        for step in range(1, max(steps) + 1):
            batch = blocks[order[(step - 1) * recipe.batch_size:step * recipe.batch_size]]
            loss = model(input_ids=batch, labels=batch).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.max_grad_norm)
            optimizer.step()
            losses.append(loss.item())
            if step in steps:
                state = model.state_dict()
                tensors = {name: state[name].detach().to(save_dtype).contiguous()
                           for name in names}
                folder = out / f"step{step}-{kind}"
                tmp = folder.with_name(folder.name + ".tmp")
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
                save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
                for path in base.iterdir():
                    if path.is_file() and not path.name.endswith(".safetensors"):
                        shutil.copy2(path, tmp / path.name)
                shutil.rmtree(folder, ignore_errors=True)
                tmp.rename(folder)
                report["pairs"][folder.name] = {"base": str(base), "steps": step,
                                                "losses": list(losses),
                                                "seconds": time.perf_counter() - started}
                print(f"{folder.name}: loss {losses}", flush=True)
        del model, optimizer
    (out / "pairs.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    return report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", type=Path, default=Path("/work/cache/fidelity"))
    parser.add_argument("--out", type=Path, default=BENCH / ".cache" / "lossless" / "pairs")
    parser.add_argument("--steps", default="1,4")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    make_pairs(args.cache, args.out, tuple(int(s) for s in args.steps.split(",")), args.lr,
               args.threads)


if __name__ == "__main__":
    main()
