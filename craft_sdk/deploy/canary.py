"""Drift canaries, the checking half: has the black box changed since the adapter was tuned?

An adapter tuned with ``canary`` probes (``craft-sdk tune ... --canary 16``) holds the scores
the box returned for synthetic probe images under the deployed prompt, and the box's run-to-run
noise (:mod:`craft_sdk.client.canary`). :func:`check_canary` regenerates the probes from their
seed, scores them again through ``client`` (one query per context the adapter sends, ledger
category ``canary``) and reports the distance in noise units, whether it passes the tolerance,
and what the change does to the adapter: how many of its predictions on the probes stay the
same, and how far its calibrated probabilities move. numpy only: runs on the deploy install.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ..adapter import Adapter
from ..client.canary import CATEGORY, distance, uncached
from ..client.ledger import MeteredClient, QueryLedger
from .query import raw_scores

logger = logging.getLogger(__name__)

REFIT_AGREEMENT = 0.9  # below this share of unchanged predictions, a re-fitted refiner is not expected to be enough
NO_CANARY = "no canary recorded: this adapter was tuned without --canary (or before craft-sdk had canaries); nothing to check"


@dataclass(frozen=True)
class CanaryReport:
    """The outcome of one canary check.

    Args:
        recorded: whether the adapter holds a canary (False: nothing was checked, no query spent).
        drifted: the distance exceeds the tolerance.
        distance: RMS change of the centred probe scores, in units of the recorded noise.
        tolerance: the distance above which the box counts as drifted.
        noise: the noise unit (the run-to-run noise measured at tune time, at least its floor).
        agreement: share of probes whose adapter prediction (refined argmax) is unchanged.
        probability_change: mean total-variation distance between the adapter's calibrated
            probabilities on the probes then and now (0: identical, 1: disjoint).
        queries_used: queries this check spent.
        advice: what to do, one line.
        tuned_model_id: the model id the adapter was tuned on.
        model_id: the model id the client reports now (a provider may keep it through a drift).
    """

    recorded: bool
    drifted: bool
    distance: float | None
    tolerance: float | None
    noise: float | None
    agreement: float | None
    probability_change: float | None
    queries_used: int
    advice: str
    tuned_model_id: str = ""
    model_id: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """One line for a log or a terminal."""
        if not self.recorded:
            return NO_CANARY
        state = "DRIFTED" if self.drifted else "unchanged"
        return (f"{state}: distance {self.distance:.2f} noise units (tolerance {self.tolerance:g}); "
                f"{100 * (self.agreement or 0):.0f}% of the adapter's canary predictions unchanged; {self.advice}")


def check_canary(adapter: Adapter, client: Any, *, ledger: QueryLedger | None = None) -> CanaryReport:
    """Re-score ``adapter``'s canary through ``client`` and compare it with the recording.

    Args:
        adapter: a loaded adapter (one without a canary gives ``recorded=False`` and spends nothing).
        client: the black box to check (any :class:`~craft_sdk.client.base.PredictionClient`,
            or a :class:`~craft_sdk.client.ledger.MeteredClient`).
        ledger: charged ``canary`` for the check's queries (default: a new unlimited one).

    Example:
        >>> report = check_canary(Adapter.from_pretrained("my-adapter"), create_client("demo"))  # doctest: +SKIP
        >>> report.drifted, report.distance                                                       # doctest: +SKIP
        (False, 0.0)
    """
    spec, then = adapter.config.canary, adapter.canary_scores
    ids = {"tuned_model_id": adapter.config.model_id, "model_id": client.capabilities(adapter.config.template).model_id}
    if spec is None or then is None:
        return CanaryReport(False, False, None, None, None, None, None, 0, NO_CANARY, **ids)
    metered = client if isinstance(client, MeteredClient) else MeteredClient(client, ledger or QueryLedger())
    before = metered.ledger.counts[CATEGORY]
    with uncached(metered):  # the provider now, not a client's cache of its earlier answers
        now = raw_scores(adapter, metered, spec.probes(), category=CATEGORY)
    dist = distance(spec, then, now)
    drifted = bool(dist > spec.tolerance)
    refined_then, refined_now = adapter.refine(then), adapter.refine(now)
    agreement = float(np.mean(refined_then.argmax(-1) == refined_now.argmax(-1)))
    p_then, p_now = adapter.probabilities(refined_then), adapter.probabilities(refined_now)
    change = float(0.5 * np.abs(p_now - p_then).sum(-1).mean())
    report = CanaryReport(True, drifted, dist, float(spec.tolerance), spec.unit, agreement, change,
                          metered.ledger.counts[CATEGORY] - before, _advice(adapter, drifted, agreement), **ids)
    logger.info("canary check: %s", report.summary())
    return report


def _advice(adapter: Adapter, drifted: bool, agreement: float) -> str:
    if not drifted:
        return "nothing to do"
    has_prompt = adapter.config.prompt is not None
    if adapter.refiner is None and not has_prompt:
        return "the adapter learned nothing from the old box (zero-shot); re-tune to re-select its behaviour"
    if adapter.refiner is not None and agreement >= REFIT_AGREEMENT:
        return ("re-fit only the refiner: re-score the training images under the saved prompt "
                "(one query per image set) and retrain it, or re-tune")
    return "re-tune the adapter on the new box (craft-sdk tune)"
