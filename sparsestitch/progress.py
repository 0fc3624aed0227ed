"""A progress bar (tqdm) that stays silent unless asked for."""

from __future__ import annotations

from tqdm import tqdm


def bar(total: int, description: str, enabled: bool, unit: str = "B"):
    """A tqdm bar over ``total`` units, or a no-op bar when ``enabled`` is false."""
    return tqdm(total=total, desc=description, disable=not enabled, unit=unit,
                unit_scale=True, leave=False, dynamic_ncols=True)
