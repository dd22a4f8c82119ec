"""What a GPU-hour costs on Modal: the project's one price table, and the ``compute.gpu`` parser.

Prices change, and Modal bills per second: treat these as the list prices on the date below, check
https://modal.com/pricing before relying on a figure, and update the table (and the date) here.
They are GPU prices only; the CPU cores and memory of a container are billed on top of them, at a
few cents an hour for the sizes used here.
"""

from __future__ import annotations

import re

PRICES_SOURCE = "https://modal.com/pricing"
# T4, L4, L40S, A100-80GB and H100: the list prices as quoted on 2026-05-07 from that page
# (techbytes.app's serverless-GPU price matrix, "verified on May 7, 2026"). A10G, A100-40GB,
# H200 and B200: Modal's per-second list prices times 3600, as last seen there; not re-checked.
PRICES_DATE = "2026-05-07"
USD_PER_GPU_HOUR: dict[str, float] = {
    "T4": 0.5904,
    "L4": 0.7992,
    "A10G": 1.1016,
    "L40S": 1.9512,
    "A100-40GB": 2.0988,
    "A100-80GB": 2.4984,
    "H100": 3.9492,
    "H200": 4.5396,
    "B200": 6.2496,
}
# Other spellings Modal accepts for the same card.
ALIASES = {"A10": "A10G", "A100": "A100-40GB"}

_GPU = re.compile(r"^(?P<type>[A-Za-z0-9\-]+?)(?::(?P<count>[0-9]+))?$")


def parse_gpu(spec: str) -> tuple[str, int]:
    """The GPU type and count of a Modal GPU string: ``"H100:2"`` -> ``("H100", 2)``.

    Case-insensitive; the count defaults to 1. Raises:
        ValueError: a malformed string, a count below 1, or a type without a price here (the
            message lists the known types and says where to add one).
    """
    match = _GPU.match(spec.strip())
    if match is None:
        raise ValueError(
            f"compute.gpu {spec!r} is not a Modal GPU string such as 'H100' or 'H100:2'"
        )
    name, count = match["type"].upper(), int(match["count"] or 1)
    name = ALIASES.get(name, name)
    if count < 1:
        raise ValueError(f"compute.gpu {spec!r} asks for {count} GPUs: ask for 1 or more")
    if name not in USD_PER_GPU_HOUR:
        raise ValueError(
            f"compute.gpu {spec!r}: no price known for GPU type {name!r}, so the run's cost cannot "
            f"be bounded; use one of {sorted(USD_PER_GPU_HOUR)} (optionally ':N'), or add its "
            "$/GPU-hour to tasks/adapters/costs.py"
        )
    return name, count


def usd_per_hour(spec: str) -> float:
    """List price in USD of one hour of the GPUs in ``spec`` (all of them, e.g. two for ``H100:2``).

    Raises:
        ValueError: as ``parse_gpu``.
    """
    name, count = parse_gpu(spec)
    return USD_PER_GPU_HOUR[name] * count
