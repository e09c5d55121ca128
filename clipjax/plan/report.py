"""The plan as one text table (and as JSON, `Plan.to_json`)."""

from __future__ import annotations

from clipjax.plan.chips import GiB
from clipjax.plan.collectives import summarize
from clipjax.plan.planner import Plan


def _gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


def _bytes(n: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def _seconds(t: float) -> str:
    return f"{t:.3g} s" if t >= 1 else f"{t * 1e3:.3g} ms"


def _rate(x: float | None, unit: str, fmt: str = ",.0f") -> str:
    return "n/a" if x is None else f"{x:{fmt}} {unit}"


def render(plan: Plan) -> str:
    """One two-column table: mesh and sharding, per-chip memory and fit, FLOPs bound,
    collectives, compile time."""
    m = plan.memory
    rows: list[tuple[str, str]] = []
    add = rows.append
    slices = f", {plan.slices} slices over DCN" if plan.slices > 1 else ""
    add(("topology", f"{plan.topology} ({plan.num_chips} chips{slices})"))
    add(("mesh", " ".join(f"{k}={v}" for k, v in plan.mesh.items())))
    split = [f"{k}->{'+'.join(v)}" for k, v in plan.axis_sharding.items() if v]
    replicated = [k for k, v in plan.axis_sharding.items() if not v]
    add(("sharded axes", ", ".join(split + ["batch->" + _batch_axes(plan)]) or "-"))
    add(("replicated axes", ", ".join(replicated) or "-"))
    per_chip = plan.batch_size // plan.num_chips
    add(
        (
            "batch",
            f"{plan.batch_size:,} global ({per_chip:,} per chip), microbatches "
            f"{plan.microbatches}, remat {plan.remat}",
        )
    )
    add(("memory per chip", ""))
    add(("  parameters", _gib(m.params)))
    add(("  optimizer state", _gib(m.optimizer)))
    add(("  loss state", _gib(m.loss_state)))
    add(("  batch + other state", _gib(m.batch + m.other_state)))
    add(("  activations/temps", _gib(m.temporaries)))
    add(("  total (peak)", f"{_gib(m.total)} of {_gib(plan.hbm_bytes)} HBM ({plan.chip})"))
    if plan.eval_memory:
        add(
            (
                "  eval embedding",
                ", ".join(f"{k} {_gib(v)}" for k, v in plan.eval_memory.items()) + " peak",
            )
        )
    verdict = "FITS" if plan.fits else "DOES NOT FIT"
    word = "margin" if plan.fits else "over by"
    add(("fit", f"{verdict} ({word} {_gib(abs(plan.margin_bytes))})"))
    if plan.flops_per_step is not None:
        add(
            (
                "FLOPs (model)",
                f"{plan.flops_per_step:.3e} per step, {plan.flops_per_chip:.3e} per chip",
            )
        )
        for label, mfu in (("bound at 100%", 1.0), (f"at {plan.mfu:.0%} MFU", plan.mfu)):
            add(
                (
                    label,
                    f"{_seconds(plan.step_seconds(mfu))}/step, "
                    f"{_rate(plan.images_per_second(mfu), 'images/s')}",
                )
            )
    else:
        add(("FLOPs (model)", "n/a (analytic count covers ViT image towers)"))
    collectives = summarize(plan.collectives)
    add(
        (
            "collectives/step",
            "kind  mesh axes: bytes per chip (instructions, executions)" if collectives else "none",
        )
    )
    for row in collectives:
        axes = "+".join(row["axes"]) or "(no-op)"
        dcn = " [DCN]" if row["dcn"] else ""
        add(
            (
                f"  {row['kind']}",
                f"{axes}{dcn}: {_bytes(row['bytes_per_step'])} "
                f"({row['ops']} ops, {row['count']} runs)",
            )
        )
    if plan.slices > 1:
        dcn = sum(r["bytes_per_step"] for r in collectives if r["dcn"])
        add(("  across slices (DCN)", f"{_bytes(dcn)} per chip per step"))
    eval_part = f", eval embedding {plan.eval_compile_seconds:.0f} s" if plan.eval_memory else ""
    add(("compile", f"train step {plan.compile_seconds:.0f} s{eval_part}"))
    width = max(len(k) for k, _ in rows) + 2
    title = f"plan: {plan.config_name}" if plan.config_name else "plan"
    return "\n".join([title] + [f"{k:<{width}}{v}".rstrip() for k, v in rows])


def _batch_axes(plan: Plan) -> str:
    from clipjax.parallel.mesh import BATCH_AXES

    used = [a for a in BATCH_AXES if plan.mesh.get(a, 1) > 1]
    return "+".join(used) or "-"
