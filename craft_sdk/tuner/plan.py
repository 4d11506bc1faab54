"""The one statement of what a run costs: per generation, before generation 1, and the plan.

Queries (the tuner's unit) come from :func:`generation_cost` and :func:`baseline_cost`; the
calls behind them (which image set, how many prompts per call) from :func:`generation_calls`
and :func:`baseline_calls`, which a client's ``estimate_usage`` turns into the provider's
units. :func:`plan_tune` puts it together before anything is sent (``craft-sdk tune --dry-run``).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from ..client.base import Capabilities
from ..client.pricing import PriceTable, cost_of
from ..client.usage import ProviderUsage, estimate_call, estimate_upload
from ..errors import CraftError
from .config import TuneConfig

logger = logging.getLogger(__name__)


def generation_cost(config: TuneConfig, g: int, n_generations: int, has_val: bool) -> int:
    """Queries generation ``g`` of ``n_generations`` costs: P candidates + the mean, plus one
    validation query on every ``val_every``-th and the last generation (paper protocol with
    validation data; the robust protocol's check images ride along in the mean's call)."""
    return config.popsize + 1 + int(_validates(config, g, n_generations, has_val))


def _validates(config: TuneConfig, g: int, n_generations: int, has_val: bool) -> bool:
    return has_val and not config.robust and (g % config.val_every == 0 or g == n_generations)


def baseline_cost(config: TuneConfig, has_val: bool) -> int:
    """Queries before generation 1: the zero-shot scoring (plus the validation set's, paper protocol)."""
    return 1 + int(has_val and not config.robust)


def canary_reserve(config: TuneConfig, n_contexts: int = 1) -> int:
    """Queries a run keeps back for its drift canary (0 without one): :func:`~craft_sdk.client.canary.canary_cost`."""
    from ..client.canary import canary_cost

    return canary_cost(n_contexts) if config.canary else 0


def one_generation_problem(config: TuneConfig, has_val: bool) -> str:
    """The one-line refusal of a budget that cannot pay one generation (P + 1 queries after the baseline).

    Example:
        >>> one_generation_problem(TuneConfig(budget=40), False).split(";")[0]
        'budget 40 cannot pay one generation: a generation costs P + 1 = 41 queries (popsize 40 candidates + the mean) after the 1-query zero-shot baseline'
    """
    base, cost, reserve = baseline_cost(config, has_val), generation_cost(config, 1, 1, has_val), canary_reserve(config)
    fits = config.budget - base - reserve - (cost - config.popsize)  # the largest popsize one generation could pay
    canary = f" and the {reserve}-query drift canary" if reserve else ""
    return (
        f"budget {config.budget} cannot pay one generation: a generation costs P + 1 = {cost} queries (popsize "
        f"{config.popsize} candidates + the mean) after the {base}-query zero-shot baseline{canary}; raise --budget to at "
        f"least {base + reserve + cost}{f' or lower --popsize to {fits}' if 2 <= fits < config.popsize else ''} (--mode pr, "
        "ensemble and zero-shot need no generation)"
    )


def plan_generations(config: TuneConfig, has_val: bool) -> int:
    """The most generations whose total cost (:func:`baseline_cost` + :func:`generation_cost` of
    each) fits the budget less the canary's reserve. ``pr`` (paper protocol) plans refiner rounds of
    P + 1 queries' worth, the official code's schedule; the robust ``pr`` needs no generation."""
    budget = config.budget - canary_reserve(config)
    if config.mode == "ensemble":
        return 0  # no generation: the bank is scored once (craft_sdk.tuner.ensemble)
    if not config.uses_prompt:
        return 0 if config.robust else max((budget - baseline_cost(config, has_val)) // (config.popsize + 1), 0)
    cap = config.max_generations if config.max_generations is not None else config.budget
    n, total = 0, baseline_cost(config, has_val)
    while n < cap:
        # a plan of n + 1 generations: generation n + 1 is the last one, generation n no longer is
        step = generation_cost(config, n + 1, n + 1, has_val)
        if n >= 1:
            step += generation_cost(config, n, n + 1, has_val) - generation_cost(config, n, n, has_val)
        if total + step > budget:
            break
        total, n = total + step, n + 1
    return n


def effective_config(config: TuneConfig, caps: Capabilities) -> TuneConfig:
    """The config a client can run: every mode runs on every client (a text-only client's prompt
    space is the template's words instead of offsets: :func:`~craft_sdk.tuner.prompts.create_prompt_space`)."""
    if config.uses_prompt and not caps.soft_prompts:
        logger.info("model %s is text-only: mode %r searches the template's words", caps.model_id, config.mode)
    return config


# ---------------------------------------------------------------------- calls and the plan


@dataclass(frozen=True)
class ImageSets:
    """Images per set a run scores: ``search`` (candidates), ``scored`` (the mean: search + check images),
    ``val`` (the paper protocol's validation set; 0 without one)."""

    search: int
    scored: int
    val: int = 0


@dataclass(frozen=True)
class Call:
    """``count`` predict calls of ``n_prompts`` prompts each on an image set of ``n_images`` (category ``category``).

    ``seen``: the call's context was scored earlier in the run, so a client that caches per context (the
    embedding client's text embeddings) sends nothing new for it."""

    category: str
    n_images: int
    n_prompts: int = 1
    count: int = 1
    seen: bool = False
    context: str | None = None  # a context as long as the call's (None: the template); only its length is priced

    @property
    def queries(self) -> int:
        return self.n_prompts * self.count


def _scoring(category: str, n_images: int, prompts: int, soft_prompts: bool) -> Call:
    """A population: one batched call of P prompts (soft prompts), or P calls of one context each (text only)."""
    return Call(category, n_images, prompts, 1) if soft_prompts else Call(category, n_images, 1, prompts)


def baseline_calls(config: TuneConfig, sets: ImageSets) -> list[Call]:
    """The calls before generation 1 (:func:`baseline_cost` queries); the validation call scores the template again."""
    calls = [Call("refine", sets.scored)]
    if sets.val and not config.robust:
        calls.append(Call("validation", sets.val, seen=True))
    return calls


def generation_calls(config: TuneConfig, g: int, n_generations: int, sets: ImageSets, soft_prompts: bool) -> list[Call]:
    """The calls of generation ``g`` (:func:`generation_cost` queries): the candidates on the search images,
    the mean on the scored images, and the validation set when it validates.

    The word search by halving (text-only clients) scores contexts it scored before: candidate 0 of every
    generation is the incumbent, and the mean scored next is the best candidate so far (``seen`` calls)."""
    halving = not soft_prompts and config.word_search == "halving"
    if halving and config.popsize > 1:
        search = [Call("search", sets.search, 1, 1, seen=True), Call("search", sets.search, 1, config.popsize - 1)]
    else:
        search = [_scoring("search", sets.search, config.popsize, soft_prompts)]
    calls = [*search, Call("refine", sets.scored, seen=halving)]
    if _validates(config, g, n_generations, sets.val > 0):
        calls.append(Call("validation", sets.val, seen=halving))
    if soft_prompts:
        return calls
    context = candidate_context(config)
    return [replace(c, context=context) for c in calls]


def candidate_context(config: TuneConfig) -> str:
    """A context as long as the word search's typical candidate, for pricing its text (tokens follow length).

    A candidate is the incumbent with some of its words swapped for vocabulary words: the halving search
    screens ``min(2, n_slots)`` words per candidate (its default group), and the policy gradient keeps about
    half of the slots on the template's word. The swapped words are priced at the vocabulary's mean length,
    the kept ones at the template's (the incumbent starts there); the context has the template's word count.

    Example:
        >>> len(candidate_context(TuneConfig(template="a photo of a"))) >= len("a photo of a")
        True
    """
    from .discrete import load_vocabulary

    words = config.template.split()
    vocabulary = load_vocabulary(config.vocabulary)
    if not words or not vocabulary:
        return config.template
    n = len(words)
    swapped = min(2, n) if config.word_search == "halving" else max(1, n // 2)
    mean = sum(len(w) for w in vocabulary) / len(vocabulary)
    # slots are swapped at random: the words kept carry (n - swapped) / n of the template's letters
    letters = max(n, round(sum(map(len, words)) * (n - swapped) / n + swapped * mean))
    return " ".join("x" * (letters // n + (k < letters % n)) for k in range(n))


def calls_usage(client: Any, calls: list[Call], class_names: list[str], template: str) -> ProviderUsage:
    """The client's estimate of ``calls`` in provider units (zeros for an in-process client)."""
    total = ProviderUsage()
    for c in calls:
        context = template if c.context is None else c.context
        total = total.plus(estimate_call(client, c.n_images, class_names, context, c.n_prompts, seen=c.seen).times(c.count))
    return total


@dataclass
class TunePlan:
    """What ``tune`` will do and cost, computed before anything is sent (``craft-sdk tune --dry-run``).

    ``splits`` maps each class to its image counts: ``train`` (the prompt search's images),
    ``check`` (held out for selection: the robust protocol's check images or the validation set),
    ``test``. The robust protocol may stop early, so its numbers are an upper bound
    (``upper_bound``). ``refused`` lists what the run would refuse or fail on; ``warnings``
    what it would do other than asked. Money fields are None without a price table.
    """

    mode: str
    protocol: str
    budget: int
    classes: list[str] = field(default_factory=list)
    splits: dict[str, dict[str, int]] = field(default_factory=dict)
    soft_prompts: bool | None = None
    generations: int = 0
    popsize: int = 0
    queries_per_generation: int = 0
    baseline_queries: int = 0
    planned_queries: int = 0
    planned_uploads: int = 0
    planned_requests: int = 0
    planned_images: int = 0
    estimated_input_tokens: int = 0
    estimated_output_tokens: int = 0
    estimated_cost: float | None = None
    cost_per_generation: float | None = None
    max_cost: float | None = None
    price: dict[str, float] | None = None
    upper_bound: bool = False
    refused: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    certification: dict[str, Any] | None = None  # :func:`certification_plan`: what the check images can prove

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan_splits(config: TuneConfig, train: Any, val: Any, test: Any) -> tuple[ImageSets, dict[str, dict[str, int]]]:
    """The image sets the run scores and the per-class split sizes (``train``/``check``/``test``)."""
    from .selection import split_holdout

    names = list(train.class_names)
    counts = lambda labels: np.bincount(np.asarray(labels, np.int64), minlength=len(names))  # noqa: E731
    search_labels, check_labels, n_val = train.labels, np.zeros(0, np.int64), 0
    searches = certification_plan(config, train.labels, None if val is None else val.labels).search
    if config.robust and val is not None:
        check_labels = val.labels
    elif config.robust and searches:  # no search bought: no hold-out either (the refiner cross-validates on all)
        fit_idx, check_idx = split_holdout(train.labels, config.holdout, config.seed)
        search_labels, check_labels = train.labels[fit_idx], train.labels[check_idx]
    elif val is not None:
        check_labels, n_val = val.labels, len(val)
    test_counts = counts(test.labels) if test is not None else np.zeros(len(names), np.int64)
    per = zip(counts(search_labels), counts(check_labels), test_counts)
    splits = {n: {"train": int(a), "check": int(b), "test": int(t)} for n, (a, b, t) in zip(names, per)}
    rides_along = 0 if n_val else len(check_labels)  # robust: the check images are scored with the mean
    sets = ImageSets(len(search_labels), len(search_labels) + rides_along, n_val)
    return sets, splits


def plan_tune(
    config: TuneConfig,
    client: Any,
    train: Any,
    val: Any = None,
    test: Any = None,
    *,
    price: PriceTable | None = None,
    max_cost: float | None = None,
) -> TunePlan:
    """The plan of ``Tuner(config).fit(client, train, val)``, computed without sending anything.

    The client is asked only its capabilities (local for every client but a ``craft-sdk serve`` URL,
    where it is one free request) and its ``estimate_usage`` of each planned call.

    Example:
        >>> plan = plan_tune(TuneConfig(budget=500, popsize=8), client, splits.train)  # doctest: +SKIP
        >>> plan.planned_queries, plan.generations                                     # doctest: +SKIP
        (496, 55)
    """
    plan = TunePlan(config.mode, config.protocol, config.budget, list(train.class_names), popsize=config.popsize,
                    max_cost=max_cost, price=None if price is None else price.to_dict(), upper_bound=config.robust)
    sets, plan.splits = plan_splits(config, train, val, test)
    plan.certification = certification_plan(config, train.labels, None if val is None else val.labels).to_dict()
    caps = client.capabilities(config.template)
    plan.soft_prompts = caps.soft_prompts
    calls, uploads = _planned_calls(config, sets, caps.soft_prompts, plan)
    names, template = list(train.class_names), config.template
    usage = calls_usage(client, calls, names, template)
    for i, n_images in enumerate(uploads):  # the scored set holds the search images (a client may cache them)
        usage = usage.plus(estimate_upload(client, n_images, seen=sets.search if i == 1 and sets.scored != sets.search else 0))
    plan.planned_uploads = len(uploads)
    plan.planned_queries = sum(c.queries for c in calls)
    plan.planned_requests, plan.planned_images = usage.requests, usage.images
    plan.estimated_input_tokens, plan.estimated_output_tokens = usage.input_tokens, usage.output_tokens
    plan.estimated_cost = cost_of(price, usage)
    if plan.generations:
        one = calls_usage(client, generation_calls(config, 1, plan.generations, sets, caps.soft_prompts), names, template)
        plan.cost_per_generation = cost_of(price, one)
    _cost_refusals(plan, price, max_cost, calls_usage(client, baseline_calls(config, sets), names, template))
    return plan


def _planned_calls(config: TuneConfig, sets: ImageSets, soft_prompts: bool, plan: TunePlan) -> tuple[list[Call], list[int]]:
    """Every planned call and upload (image counts); fills the plan's generations and refusals."""
    uploads = [sets.search] + ([sets.scored] if sets.scored != sets.search else []) + ([sets.val] if sets.val else [])
    calls = baseline_calls(config, sets)
    plan.baseline_queries = baseline_cost(config, sets.val > 0)
    needed = plan.baseline_queries
    no_check = config.robust and (sets.scored == sets.search or not (plan.certification or {}).get("search", True))
    bank = 0
    if config.mode == "ensemble":
        try:
            from .ensemble import ensemble_bank

            bank = len(ensemble_bank(config))
        except CraftError as exc:
            plan.refused.append(str(exc))
        needed += bank
        if bank and not no_check:
            calls.append(Call("search", sets.scored, 1, bank))
    n_contexts = min(config.ensemble_k or bank, bank) if config.mode == "ensemble" and bank else 1
    canary = canary_reserve(config, n_contexts)  # recorded at the end: two scorings of the probes per context
    needed += canary
    if needed > config.budget:
        plan.refused.append(f"budget {config.budget} cannot pay the {needed} queries needed besides the search "
                            "(the zero-shot baseline, an ensemble's bank, the drift canary); raise --budget")
        return calls, uploads
    n_gen = plan_generations(config, sets.val > 0)
    if no_check and (n_gen or config.mode == "ensemble"):
        plan.warnings.append(f"not searched: {(plan.certification or {}).get('reason')} (more --shots, or --protocol paper)")
        n_gen = 0
    if canary:
        calls.append(Call("canary", config.canary, 1, canary))
    if config.uses_prompt:
        plan.generations = n_gen
        plan.queries_per_generation = generation_cost(config, 1, max(n_gen, 1), False)
        for g in range(1, n_gen + 1):
            calls += generation_calls(config, g, n_gen, sets, soft_prompts)
        if n_gen == 0 and not no_check and config.max_generations != 0:
            one = needed + config.popsize + 1
            plan.refused.append(f"budget {config.budget} pays no generation: one costs P + 1 = {config.popsize + 1} queries "
                                f"besides the {needed} others (baseline, canary); raise --budget to at least {one} or lower --popsize")
    return calls, uploads


def _cost_refusals(plan: TunePlan, price: PriceTable | None, max_cost: float | None, baseline: ProviderUsage) -> None:
    if price is None or max_cost is None or plan.estimated_cost is None:
        return
    if price.cost(baseline) > max_cost:
        plan.refused.append(f"--max-cost {max_cost:g} cannot pay the zero-shot baseline (estimated {price.cost(baseline):.6g}); raise --max-cost")
    elif plan.estimated_cost > max_cost:
        per = plan.cost_per_generation or 0.0
        fits = int((max_cost - price.cost(baseline)) // per) if per > 0 else plan.generations
        plan.warnings.append(f"the plan's estimated cost {plan.estimated_cost:.6g} exceeds --max-cost {max_cost:g}: "
                             f"the run stops at the ceiling, after about {min(fits, plan.generations)} of {plan.generations} generations")


# a plan counts on prompt gains below +50 points: a search whose prompt must flip half the check images or more to be
# certified is not bought (issue 23: 4 shots of 10 classes, 10 check images, need +50; the refiner alone on every
# training image is certified instead, at 1 query: 47.8 % mean over the demo tasks vs 40.3 % after a 24 % search)
MAX_PLANNED_GAIN = 0.5


@dataclass(frozen=True)
class CertificationPlan:
    """What a run's held-out images can certify, computed before the first query.

    ``min_gain_prompt`` / ``min_gain_refiner``: the smallest gain over zero-shot (a fraction) the
    check images can prove at level ``alpha`` (every one of ``min_flips`` wins and no loss), None
    when no gain can. ``search``: whether the run buys a prompt search (or an ensemble's bank).
    """

    protocol: str
    search: bool
    certified: bool
    alpha: float
    min_flips: int
    n_check: int
    n_select: int
    n_certify: int
    n_refiner: int
    min_gain_prompt: float | None
    min_gain_refiner: float | None
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _min_gain(n: int, k: int) -> float | None:
    return k / n if n >= k else None


def _cv_images(labels: np.ndarray) -> int:
    """Images a refiner's cross-validation can score: all of them when every class has two."""
    counts = np.bincount(labels)
    return len(labels) if len(labels) and counts[counts > 0].min() >= 2 else 0


def certification_plan(config: TuneConfig, labels: np.ndarray, val_labels: np.ndarray | None = None) -> CertificationPlan:
    """What the robust protocol can certify with these labels, before any query.

    Args:
        config: the run's configuration (``z_noise`` sets the level, ``holdout`` the check part).
        labels: [N] training labels.
        val_labels: labels of a validation split (then the check images), if any.

    Example:
        >>> p = certification_plan(TuneConfig(budget=2000), np.arange(8))  # 8 classes, 1 shot
        >>> p.search, p.n_certify, p.min_gain_prompt
        (False, 0, None)
    """
    from .selection import alpha_of, min_flips, split_check, split_holdout

    labels = np.asarray(labels, np.int64)
    alpha = alpha_of(config.z_noise)
    k = min_flips(alpha)
    if not config.robust:
        return CertificationPlan(config.protocol, True, False, alpha, k, 0, 0, 0, 0, None, None,
                                 "paper protocol: the whole budget is searched and nothing is certified")
    if val_labels is not None:
        fit_y, check_y = labels, np.asarray(val_labels, np.int64)
    else:
        fit_idx, check_idx = split_holdout(labels, config.holdout, config.seed)
        fit_y, check_y = labels[fit_idx], labels[check_idx]
    select, certify = split_check(check_y, config.seed)
    prompt_gain = _min_gain(len(certify), k)
    wants_search = config.uses_prompt or config.mode == "ensemble"
    search = wants_search and prompt_gain is not None and prompt_gain < MAX_PLANNED_GAIN
    if search:  # the refiner alone: out-of-fold on the search images plus the certify images (every check image)
        n_ref = _cv_images(fit_y) + len(certify)
    else:  # no search: no hold-out either; the refiner is cross-validated on every training image
        n_ref = _cv_images(labels) + (len(check_y) if val_labels is not None else 0)
    n_ref = n_ref if config.uses_refiner else 0
    refiner_gain = _min_gain(n_ref, k) if n_ref else None
    reason = _plan_reason(config, search, wants_search, len(certify), k, n_ref, prompt_gain, refiner_gain)
    certified = search or refiner_gain is not None
    n_sel = len(select) if search else 0
    n_cert = len(certify) if search else (len(check_y) if val_labels is not None else 0)
    return CertificationPlan("robust", search, certified, alpha, k, len(check_y) if search or val_labels is not None else 0,
                             n_sel, n_cert, n_ref, prompt_gain if search else None, refiner_gain, reason)


def _plan_reason(config: TuneConfig, search: bool, wants: bool, n_cert: int, k: int, n_ref: int,
                 prompt_gain: float | None, refiner_gain: float | None) -> str:
    if search:
        return (f"a prompt is certified on {n_cert} check images if it gains at least {100 * prompt_gain:.0f} points "  # type: ignore[operator]
                f"over zero-shot ({k} wins, no loss): searching")
    if wants:
        need = f"need {k} wins without a loss, i.e. +{100 * k / n_cert:.0f} points" if n_cert >= k else f"cannot hold the {k} wins a certificate needs"
        head = (f"no achievable prompt gain can be certified: {n_cert} check images {need} "
                f"(plans count on less than +{100 * MAX_PLANNED_GAIN:.0f}), so no search is bought")
    else:
        head = "no prompt to search"
    if refiner_gain is not None:
        tail = f"the refiner alone is cross-validated on {n_ref} images (certifiable from +{100 * refiner_gain:.0f} points; 1 query)"
    else:
        tail = "zero-shot behaviour is deployed (1 query)"
    extra = "; --protocol paper searches anyway, uncertified" if wants else ""
    return f"{head}; {tail}{extra}"
