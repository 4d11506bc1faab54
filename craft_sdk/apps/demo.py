"""The end-to-end demo behind ``craft-sdk demo``: tune, evaluate, export, deploy, report.

Everything runs offline on the shipped demo VLM and a shipped demo task:

1. tune CraFT on the task's few-shot training split (the training budget is a hard ceiling);
2. while tuning, *observe* the current prompt + refiner on the test split every few
   generations for an accuracy-vs-queries curve (queries counted separately as
   ``eval``; nothing observed feeds back into training);
3. save the adapter, export ``refiner.onnx``, and classify a few held-out images with
   :class:`~craft_sdk.deploy.classifier.CraftClassifier` (ONNX Runtime refiner);
4. write ``report.png`` (accuracy vs queries, predicted test images) and ``summary.json``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..api import evaluate, tune_run
from ..client.ledger import MeteredClient, QueryLedger
from ..data import ImageDataset
from ..demo.tasks import load_demo_task
from ..tuner.config import TuneConfig

logger = logging.getLogger(__name__)


@dataclass
class DemoReport:
    """What :func:`run_demo` measured."""

    task: str
    mode: str
    shots: int
    seed: int
    n_test: int
    zero_shot_accuracy: float
    accuracy: float
    queries_used: int
    budget: int
    eval_queries: int
    wall_time_s: float
    adapter_dir: str
    report_png: str
    curve: list[dict[str, float]] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    deployed: str | None = None
    decision: str | None = None
    stopped: str | None = None
    temperature: float = 1.0
    ece: float | None = None
    ece_uncalibrated: float | None = None


def _observer(client: Any, test: ImageDataset, template: str, every: int, sink: list[dict[str, float]]) -> Callable[..., None]:
    """An on_progress hook scoring the current model on ``test`` every ``every`` generations."""
    ledger = QueryLedger()
    metered = MeteredClient(client, ledger)
    handle = metered.upload(test.images)
    names = list(test.class_names)

    def observe(p: Any) -> None:
        if p.generation % every and p.generation != p.n_generations:
            return
        logits = metered.predict(handle, names, template, p.offset, category="eval")
        refined = p.refine(logits) if p.refine is not None else logits
        acc = float((refined.argmax(-1) == test.labels).mean())
        sink.append({"generation": p.generation, "queries": p.queries_used, "test_accuracy": acc, "train_accuracy": p.train_accuracy})

    observe.ledger = ledger  # type: ignore[attr-defined]
    return observe


def run_demo(
    task: str = "digits",
    out: str | Path = "craft-demo",
    *,
    budget: int = 8000,
    seed: int = 0,
    shots: int = 16,
    mode: str = "craft",
    model: str = "demo",
    curve_points: int = 20,
    on_progress: Callable[[Any], None] | None = None,
    **config: Any,
) -> DemoReport:
    """Tune, evaluate, export and deploy on a demo task with the demo VLM.

    Args:
        task: a demo task name (see :func:`craft_sdk.demo.list_demo_tasks`).
        out: output directory (adapter in ``out/adapter``, ``report.png``, ``summary.json``).
        budget: training query budget (hard ceiling).
        seed: seed of the few-shot sample and of tuning.
        shots: training images per class.
        mode: tuning mode.
        model: the black box (default: the shipped demo VLM; any open_clip ``local-dir:`` works).
        curve_points: how many times the test split is scored during tuning.
        on_progress: also called with every :class:`~craft_sdk.tuner.train.Progress`.
        **config: further :class:`TuneConfig` fields.

    Example:
        >>> report = run_demo("digits", "craft-demo")  # doctest: +SKIP
        >>> report.accuracy > report.zero_shot_accuracy  # doctest: +SKIP
        True
    """
    from ..adapter.export import export_onnx
    from ..client.openclip import OpenCLIPClient
    from ..deploy.classifier import CraftClassifier
    from ..tuner.plan import plan_generations

    t0 = time.perf_counter()
    out = Path(out)
    cfg = TuneConfig(mode=mode, budget=budget, seed=seed, **config)
    splits = load_demo_task(task, shots=shots, seed=seed)
    assert splits.test is not None
    client = OpenCLIPClient(model)
    curve: list[dict[str, float]] = []
    every = max(1, plan_generations(cfg, has_val=False) // max(curve_points, 1))
    observe = _observer(client, splits.test, cfg.template, every, curve)

    def progress(p: Any) -> None:
        observe(p)
        if on_progress is not None:
            on_progress(p)

    run = tune_run(client, splits.train, config=cfg, on_progress=progress, progress=False)
    result, adapter = run.result, run.adapter
    adapter_dir = adapter.save_pretrained(out / "adapter")
    if adapter.config.refiner is not None:  # a zero-shot or prompt-only adapter has no refiner to export
        export_onnx(adapter_dir)
    scores = evaluate(adapter, client, splits.test, ledger=observe.ledger)  # type: ignore[attr-defined]
    clf = CraftClassifier.from_pretrained(adapter_dir, client)
    picks = np.random.default_rng(seed).choice(len(splits.test), size=min(16, len(splits.test)), replace=False)
    probs = clf.predict_proba([splits.test.images[i] for i in picks])
    samples = [
        {"index": int(i), "true": splits.test.class_names[splits.test.labels[i]],
         "predicted": splits.test.class_names[int(p.argmax())], "probability": round(float(p.max()), 4)}
        for i, p in zip(picks, probs)
    ]
    report = DemoReport(
        task=task, mode=result.config.mode, shots=shots, seed=seed, n_test=scores["n_test"],
        zero_shot_accuracy=scores["zero_shot_accuracy"], accuracy=scores["accuracy"],
        queries_used=result.queries.used, budget=budget,
        eval_queries=observe.ledger.used + clf.ledger.used,  # type: ignore[attr-defined]
        wall_time_s=0.0, adapter_dir=str(adapter_dir), report_png=str(out / "report.png"), curve=curve, samples=samples,
        deployed=result.selection.deployed if result.selection is not None else None,
        decision=result.selection.reason if result.selection is not None else None,
        stopped=result.metrics.stopped, temperature=adapter.temperature,
        ece=scores.get("ece"), ece_uncalibrated=scores.get("ece_uncalibrated"),
    )
    _plot(report, splits.test, picks)
    report.wall_time_s = round(time.perf_counter() - t0, 2)
    (out / "summary.json").write_text(json.dumps(asdict(report), indent=2, sort_keys=True) + "\n")
    return report


def _plot(report: DemoReport, test: ImageDataset, picks: np.ndarray) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(12, 5.5))
    ax = fig.add_axes((0.06, 0.12, 0.38, 0.78))
    q = [c["queries"] for c in report.curve]
    ax.plot(q, [c["test_accuracy"] for c in report.curve], "o-", label=f"{report.mode} (test)")
    ax.plot(q, [c["train_accuracy"] for c in report.curve], "--", alpha=0.6, label=f"{report.mode} (train)")
    ax.axhline(report.zero_shot_accuracy, color="gray", ls=":", label="zero-shot (test)")
    ax.plot([report.queries_used], [report.accuracy], "*", ms=14, color="C3", label=f"deployed: {report.deployed or report.mode}")
    if report.stopped:
        ax.axvline(report.queries_used, color="C3", ls="--", alpha=0.5)
        why = report.stopped.removeprefix("stopped: ")
        ax.text(report.queries_used, 0.05, f" stopped at {report.queries_used:,} of {report.budget:,} queries:\n {why}",
                fontsize=7, color="C3", ha="left" if report.queries_used < 0.5 * report.budget else "right")
    ax.set_xlim(0, report.budget * 1.02)  # the whole budget: what an early stop left unspent is visible
    ax.set_xlabel("queries used")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(f"{report.task}: {report.shots} shots, seed {report.seed}")
    ax.legend(loc="upper right", fontsize=8)
    for k, (i, s) in enumerate(zip(picks, report.samples)):
        sub = fig.add_axes((0.5 + (k % 4) * 0.125, 0.7 - (k // 4) * 0.22, 0.1, 0.17))
        sub.imshow(np.asarray(test.images[int(i)]))
        sub.set_xticks([])
        sub.set_yticks([])
        ok = s["predicted"] == s["true"]
        sub.set_title(f"{s['predicted']} ({s['probability']:.2f})", fontsize=8, color="green" if ok else "red")
    fig.suptitle(f"craft-sdk demo — zero-shot {report.zero_shot_accuracy:.3f} → {report.mode} {report.accuracy:.3f} on {report.n_test} test images")
    fig.savefig(report.report_png, dpi=90)
    plt.close(fig)
