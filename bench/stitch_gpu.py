"""GPU part of bench/stitch.py: the hardware floors quoted in the issue, and hot-swap timing.

Imported only when CUDA is present (``hot_swap`` also runs on ``device="cpu"``, which is
how it is smoke-tested on machines without a GPU).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

#: The issue's reference sizes: 1% of a 7B model.
FLOOR_ELEMENTS = 70_000_000
FLOOR_COPY_BYTES = 210_000_000


def _cuda_ms(function, repeat: int = 10, warmup: int = 2) -> dict:
    """Median and best of ``repeat`` timings of ``function()`` with CUDA events, in ms."""
    for _ in range(warmup):
        function()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        function()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return {"median_ms": statistics.median(times), "best_ms": min(times), "all_ms": times}


def floors(target_elements: int = 7_000_000_000) -> dict:
    """index_add of 70M bf16 values into a ``target_elements`` bf16 vector, a 210 MB pinned
    host->device copy, and a prefix sum of 70M int32 gaps (the issue's H100 floors: about
    4, 4 and 0.8 ms)."""
    device = torch.device("cuda")
    generator = torch.Generator(device=device).manual_seed(0)
    free, _ = torch.cuda.mem_get_info()
    # Leave room for indices, values and the allocator: shrink the target if it must.
    target_elements = min(target_elements, int((free - 4 * FLOOR_ELEMENTS * 12) // 2))
    target = torch.zeros(target_elements, dtype=torch.bfloat16, device=device)
    gaps = torch.randint(1, 2 * (target_elements // FLOOR_ELEMENTS), (FLOOR_ELEMENTS,),
                         generator=generator, device=device, dtype=torch.int32)
    positions = torch.cumsum(gaps, 0, dtype=torch.int64) - 1
    values = torch.randn(FLOOR_ELEMENTS, generator=generator, device=device).to(torch.bfloat16)
    host = torch.empty(FLOOR_COPY_BYTES, dtype=torch.uint8).pin_memory()
    on_device = torch.empty(FLOOR_COPY_BYTES, dtype=torch.uint8, device=device)
    result = {
        "index_add_70M_bf16": _cuda_ms(lambda: target.index_add_(0, positions, values)),
        "copy_210MB_pinned_h2d": _cuda_ms(lambda: on_device.copy_(host, non_blocking=True)),
        "prefix_sum_70M_gaps": _cuda_ms(lambda: torch.cumsum(gaps, 0, dtype=torch.int64)),
        "target_elements": target_elements,
        "issue_reference_ms": {"index_add_70M_bf16": 4.0, "copy_210MB_pinned_h2d": 4.0,
                               "prefix_sum_70M_gaps": 0.8},
    }
    del target, gaps, positions, values, host, on_device
    torch.cuda.empty_cache()
    return result


def load_resident(base: str, device: str) -> dict:
    """Every tensor of checkpoint ``base`` on ``device`` (the 'resident model')."""
    from safetensors.torch import load_file

    tensors = {}
    for shard in sorted(Path(base).glob("*.safetensors")):
        tensors.update({n: t.to(device) for n, t in load_file(shard).items()})
    return tensors


def hot_swap(base: str, delta: str, device: str, repeat: int = 5) -> dict:
    """Time ``sparsestitch.apply`` + ``Patch.revert`` of one delta on a resident model."""
    import sparsestitch

    if not hasattr(sparsestitch, "apply"):
        return {"skipped": "sparsestitch.apply does not exist in this version"}
    model = load_resident(base, device)
    params = sum(t.numel() for t in model.values())
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    fingerprint = _fingerprint(model)
    rows = {f"verify_base={verify}": _time_apply_revert(
                lambda: sparsestitch.apply(model, delta, verify_base=verify), sync, repeat)
            for verify in (False, True)}
    rows.update(_prepared_rows(sparsestitch, model, delta, sync, repeat))
    unchanged = _fingerprint(model) == fingerprint
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {"device": device, "params": params, "delta": delta, "repeat": repeat,
            "word_sums_unchanged_after_revert": unchanged, "timings": rows, "goal_apply_ms": 12.0}


def _prepared_rows(sparsestitch, model: dict, delta: str, sync, repeat: int) -> dict:
    """``sparsestitch.prepare`` once, then ``PreparedPatch.apply`` + ``revert`` timed, with the
    prepared arrays in (pinned) host memory and resident on the device."""
    if not hasattr(sparsestitch, "prepare"):
        return {}
    rows = {}
    for resident in (False, True):
        started = time.perf_counter()
        skill = sparsestitch.prepare(model, delta, resident=resident)
        sync()
        prepare_s = time.perf_counter() - started
        rows[f"prepared resident={resident}"] = {
            "prepare_s": prepare_s, "positions": skill.count, "prepared_mib": skill.nbytes / 2**20,
            # one extra round warms the allocator up and is not counted
            **_time_apply_revert(lambda: skill.apply(model), sync, repeat, warmup=1)}
        del skill
    return rows


def _time_apply_revert(apply, sync, repeat: int, warmup: int = 0) -> dict:
    """Best and median ms of ``patch = apply()`` and of ``patch.revert()``, each synchronised."""
    apply_s, revert_s = [], []
    for _ in range(warmup + repeat):
        sync()
        started = time.perf_counter()
        patch = apply()
        sync()
        applied = time.perf_counter()
        patch.revert()
        sync()
        apply_s.append(applied - started)
        revert_s.append(time.perf_counter() - applied)
    apply_s, revert_s = apply_s[warmup:], revert_s[warmup:]
    return {"apply_ms_best": 1e3 * min(apply_s), "apply_ms_median": 1e3 * statistics.median(apply_s),
            "revert_ms_best": 1e3 * min(revert_s),
            "revert_ms_median": 1e3 * statistics.median(revert_s)}


def _fingerprint(model: dict) -> list[int]:
    """A cheap fingerprint (not a proof of bit-exactness): each tensor's sum of raw words."""
    return [int(t.view(torch.int16).to(torch.int64).sum()) if t.element_size() == 2
            else int(t.view(torch.uint8).to(torch.int64).sum()) for t in model.values()]
