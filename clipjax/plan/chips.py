"""TPU chips (HBM, peak bf16 FLOP/s) and topology names: what users type -> what jax accepts.

Figures from Google Cloud's TPU system-architecture pages (v4, v5e, v5p, v6e): per chip,
v4 32 GiB and 275 TFLOP/s, v5e 16 GB and 197, v5p 95 GB and 459, v6e 32 GB and 918 (bf16).
The GB figures are the chips' binary capacities (16, 95, 32 GiB) as libtpu reports them.
"""

from __future__ import annotations

import dataclasses
import math
import re

GiB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str  # jax's topology prefix: 'v4', 'v5e', 'v5p', 'v6e'
    hbm_bytes: int
    peak_bf16_flops: float
    dims: int  # 2 (2D torus, names count chips) or 3 (3D torus, names count TensorCores)
    chip_config: str  # libtpu's chip configuration: 'megacore' = one device per chip


CHIPS = {
    "v4": Chip("v4", 32 * GiB, 275e12, 3, "megacore"),
    "v5e": Chip("v5e", 16 * GiB, 197e12, 2, "default"),
    "v5p": Chip("v5p", 95 * GiB, 459e12, 3, "megacore"),
    "v6e": Chip("v6e", 32 * GiB, 918e12, 2, "default"),
}
# Cloud's accelerator-type prefixes for the same chips.
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e"}


@dataclasses.dataclass(frozen=True)
class Topology:
    chip: Chip
    shape: tuple[int, ...]  # chips along each torus dimension

    @property
    def name(self) -> str:
        """jax's form, e.g. 'v5e:16x16', 'v4:4x4x8'."""
        return f"{self.chip.name}:{'x'.join(map(str, self.shape))}"

    @property
    def num_chips(self) -> int:
        return math.prod(self.shape)


def _shape_for(chip: Chip, chips: int) -> tuple[int, ...]:
    """The standard slice shape of `chips` chips (a power of two)."""
    if chip.dims == 2:
        a = 2 ** (int(math.log2(chips)) // 2)
        return (a, chips // a)
    if chips < 4:
        raise ValueError(f"{chip.name} slices have at least 4 chips ({chip.name}-8), got {chips}")
    shape = [2, 2, 1]  # 4 chips; then double the last dim, or the last one below the largest
    while math.prod(shape) < chips:
        if len(set(shape)) == 1:
            shape[-1] *= 2
        else:
            i = max(j for j, s in enumerate(shape) if s < max(shape))
            shape[i] *= 2
    return tuple(shape)


def parse_topology(text: str) -> Topology:
    """'v5e:16x16', 'v5e-256' (chips), 'v4-256' / 'v5p-128' (TensorCores: 2 per chip) or the
    Cloud names 'v5litepod-256' -> Topology; ValueError naming the accepted forms."""
    expected = (
        "expected CHIP:AxB[xC] (e.g. v5e:16x16, v4:4x4x8) or CHIP-N (v5e-256, v6e-256 count "
        f"chips; v4-256, v5p-128 count TensorCores); chips: {', '.join(CHIPS)}"
    )
    m = re.fullmatch(r"([a-z0-9]+)([:-])([0-9x]+)", text.strip().lower())
    if not m:
        raise ValueError(f"--topology {text!r}: {expected}")
    prefix, sep, rest = m.groups()
    prefix = ALIASES.get(prefix, prefix)
    if prefix not in CHIPS:
        raise ValueError(f"--topology {text!r}: unknown chip {prefix!r}; {expected}")
    chip = CHIPS[prefix]
    if sep == ":":
        try:
            shape = tuple(int(s) for s in rest.split("x"))
        except ValueError:
            raise ValueError(f"--topology {text!r}: {expected}") from None
        if len(shape) != chip.dims or min(shape) < 1:
            raise ValueError(
                f"--topology {text!r}: {chip.name} slices are {chip.dims}-D (e.g. "
                f"{_example(chip)}); {expected}"
            )
        return Topology(chip, shape)
    if not rest.isdigit() or int(rest) < 1:
        raise ValueError(f"--topology {text!r}: {expected}")
    n = int(rest)
    chips = n // 2 if chip.dims == 3 else n  # v4/v5p names count TensorCores
    if chips < 1 or chips & (chips - 1) or (chip.dims == 3 and n % 2):
        raise ValueError(
            f"--topology {text!r}: {n} is not a slice size of {chip.name} (powers of two"
            f"{', counting 2 TensorCores per chip' if chip.dims == 3 else ''}); {expected}"
        )
    return Topology(chip, _shape_for(chip, chips))


def _example(chip: Chip) -> str:
    return f"{chip.name}:{'x'.join(map(str, _shape_for(chip, 256 if chip.dims == 2 else 64)))}"
