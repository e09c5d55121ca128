"""Host-memory setting for CPU runs: back large allocations with transparent huge pages.

On the CPU backend, XLA allocates each train step's large temporary buffer with malloc, which
maps fresh memory for it every step and then faults it in page by page. glibc's
`glibc.malloc.hugetlb=1` tunable (glibc >= 2.35) asks the kernel for transparent huge pages on
those mappings instead (measurements: benchmarks/RESULTS.md, host malloc). The tunable is read
once at process start, so it has to be in the environment of the process that runs JAX; older
glibc versions ignore it. GPU and TPU device memory is not affected.
"""

from __future__ import annotations

HUGEPAGE_TUNABLE = "glibc.malloc.hugetlb=1"
_HUGETLB = "glibc.malloc.hugetlb="


def with_hugepage_malloc(env: dict[str, str], enabled: bool = True) -> dict[str, str]:
    """A copy of `env` whose GLIBC_TUNABLES holds the huge-page malloc tunable (a hugetlb setting
    already there is kept), or, with `enabled=False`, holds no hugetlb setting at all."""
    tunables = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t]
    if not enabled:
        tunables = [t for t in tunables if not t.startswith(_HUGETLB)]
    elif not any(t.startswith(_HUGETLB) for t in tunables):
        tunables.append(HUGEPAGE_TUNABLE)
    out = {k: v for k, v in env.items() if k != "GLIBC_TUNABLES"}
    if tunables:
        out["GLIBC_TUNABLES"] = ":".join(tunables)
    return out
