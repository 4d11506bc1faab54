"""``craft-sdk tune --dry-run``: the plan (:class:`~craft_sdk.tuner.plan.TunePlan`) printed before anything is paid."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import typer

from ._app import RUNTIME_ERROR, emit_json


def dry_run(
    config: Any,
    load: Callable[[], Any],
    open_model: Callable[[], Any],
    *,
    price: Any = None,
    max_cost: float | None = None,
    as_json: bool = False,
) -> None:
    """Print the plan of a tune (one JSON object with ``as_json``) and exit: 0 when the run would go ahead,
    1 when it would be refused. Nothing is uploaded or queried."""
    from ..errors import DataError
    from ..tuner.plan import TunePlan, plan_tune

    try:
        splits = load()
    except DataError as exc:  # e.g. too few images for --shots: the plan says so instead of failing
        plan = TunePlan(config.mode, config.protocol, config.budget, popsize=config.popsize, max_cost=max_cost,
                        price=None if price is None else price.to_dict(), refused=[str(exc).splitlines()[0]])
    else:
        plan = plan_tune(config, open_model(), splits.train, splits.val, splits.test, price=price, max_cost=max_cost)
    if as_json:
        emit_json(plan.to_dict())
    else:
        for line in render_plan(plan):
            typer.echo(line)
    raise typer.Exit(RUNTIME_ERROR if plan.refused else 0)


def _money(value: float | None) -> str:
    return "n/a (no --price)" if value is None else f"{value:.6g}"


def render_plan(plan: Any) -> list[str]:
    """The plan as text lines."""
    bound = " (an upper bound: the robust protocol stops early)" if plan.upper_bound else ""
    lines = [f"plan: craft-sdk tune, mode {plan.mode}, protocol {plan.protocol} (dry run: nothing sent){bound}"]
    if plan.splits:
        width = max(len(n) for n in plan.splits)
        lines.append(f"  {'class':<{width}}  train  check  test")
        for name, n in plan.splits.items():
            lines.append(f"  {name:<{width}}  {n['train']:>5}  {n['check']:>5}  {n['test']:>4}")
    if plan.generations or plan.queries_per_generation:
        lines.append(f"  generations          {plan.generations} of {plan.queries_per_generation} queries "
                     f"(P + 1 = {plan.popsize} candidates + the mean)")
    lines += [
        f"  queries              {plan.planned_queries} of a budget of {plan.budget} ({plan.baseline_queries} before generation 1)",
        f"  provider requests    {plan.planned_requests} ({plan.planned_uploads} image-set uploads)",
        f"  images sent          {plan.planned_images}",
        f"  input tokens         {plan.estimated_input_tokens} (estimated)",
        f"  output tokens        {plan.estimated_output_tokens} (estimated)",
        f"  estimated cost       {_money(plan.estimated_cost)}"
        + ("" if plan.max_cost is None else f" of --max-cost {plan.max_cost:g}"),
    ]
    if plan.certification is not None:
        lines.append(f"  certification        {plan.certification['reason']}")
    lines += [f"  warning: {w}" for w in plan.warnings]
    lines += [f"  refused: {r}" for r in plan.refused]
    if not plan.refused:
        lines.append("  the run would go ahead; drop --dry-run to start it")
    return lines
