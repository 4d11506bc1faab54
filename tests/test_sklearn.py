"""CraftClassifier as a scikit-learn estimator: clone, check_is_fitted, get/set_params, Pipeline,
cross_val_score and GridSearchCV, integer labels with accuracy_score; all on a tiny random-init model
with refiner-only tuning (one query per fit) so every fit takes well under a second."""

from __future__ import annotations

import numpy as np
import pytest

sklearn = pytest.importorskip("sklearn")
pytest.importorskip("torch")

from conftest import random_images  # noqa: E402
from sklearn.base import clone, is_classifier  # noqa: E402
from sklearn.exceptions import NotFittedError as SkNotFittedError  # noqa: E402
from sklearn.metrics import accuracy_score  # noqa: E402
from sklearn.model_selection import GridSearchCV, StratifiedKFold, cross_val_score  # noqa: E402
from sklearn.pipeline import Pipeline  # noqa: E402
from sklearn.preprocessing import FunctionTransformer  # noqa: E402
from sklearn.utils.validation import check_is_fitted  # noqa: E402

from craft_sdk import ConfigError, CraftClassifier, NotFittedError, QueryLedger  # noqa: E402

NAMES = ["forest", "river", "sea or lake"]


def make(client, **kw):  # type: ignore[no-untyped-def]
    params = {"mode": "pr", "budget": 20, "seed": 0, "class_names": NAMES, "tune_options": {"refiner_hidden": 16}}
    return CraftClassifier(client, **{**params, **kw})


@pytest.fixture(scope="module")
def data() -> tuple[list, np.ndarray]:
    ims = random_images(18, seed=11)
    return [np.asarray(im) for im in ims], np.array([0, 1, 2] * 6)


def test_clone_shares_client_and_ledger_and_is_unfitted(tiny_client, data) -> None:  # type: ignore[no-untyped-def]
    X, y = data
    clf = make(tiny_client).fit(X, y)
    twin = clone(clf)
    assert twin is not clf and not hasattr(twin, "adapter_")
    assert twin.client is clf.client and twin.ledger is clf.ledger  # the model behind the client is not copied
    assert twin.get_params() == clf.get_params()
    assert twin.tune_options is not clf.tune_options  # plain values are copied
    with pytest.raises(SkNotFittedError):
        check_is_fitted(twin)
    check_is_fitted(clf)
    assert is_classifier(clf)
    assert issubclass(NotFittedError, ValueError) and issubclass(NotFittedError, AttributeError)
    with pytest.raises(AttributeError):
        twin.predict(X[:2])


def test_get_set_params_and_repr(tiny_client) -> None:  # type: ignore[no-untyped-def]
    clf = make(tiny_client)
    params = clf.get_params()
    assert params["mode"] == "pr" and params["budget"] == 20 and params["client"] is tiny_client
    assert set(params) == {"client", "mode", "budget", "shots", "val_shots", "seed", "class_names", "tune_options",
                           "config", "ledger"}
    assert clf.set_params(mode="pg", budget=40) is clf and (clf.mode, clf.budget) == ("pg", 40)
    with pytest.raises(ConfigError, match="invalid parameter 'lr'"):
        clf.set_params(lr=0.1)
    assert "mode='pg'" in repr(clf) and "budget=40" in repr(clf) and "seed" not in repr(clf)


def test_integer_labels_with_accuracy_score_and_shots(tiny_client, data) -> None:  # type: ignore[no-untyped-def]
    X, y = data
    clf = make(tiny_client, shots=2).fit(X, y)
    assert clf.adapter_.config.provenance["data"]["n_train"] == 6  # 2 shots x 3 classes drawn from 18 images
    pred = clf.predict(X)
    assert pred.dtype == y.dtype and clf.classes_.tolist() == [0, 1, 2]
    assert accuracy_score(y, pred) == pytest.approx(clf.score(X, y))
    proba = clf.predict_proba(X)
    np.testing.assert_allclose(proba, clf.adapter_.probabilities(clf.decision_function(X)), atol=1e-6)
    assert (clf.classes_[proba.argmax(1)] == pred).all()


def test_pipeline(tiny_client, data) -> None:  # type: ignore[no-untyped-def]
    X, y = data
    flip = FunctionTransformer(lambda ims: [im[:, ::-1].copy() for im in ims])  # images in, images out
    pipe = Pipeline([("flip", flip), ("clf", make(tiny_client))]).fit(X, y)
    direct = make(tiny_client).fit([im[:, ::-1].copy() for im in X], y)
    np.testing.assert_array_equal(pipe.predict(X), direct.predict([im[:, ::-1].copy() for im in X]))
    assert pipe.score(X, y) == pytest.approx(direct.score([im[:, ::-1].copy() for im in X], y))


def test_cross_val_score_counts_every_tuning(tiny_client, data) -> None:  # type: ignore[no-untyped-def]
    X, y = data
    ledger = QueryLedger()
    clf = make(tiny_client, ledger=ledger)
    scores = cross_val_score(clf, X, y, cv=3)
    # the same folds by hand: cross_val_score uses StratifiedKFold for a classifier
    manual, paid = [], 0
    for train, test in StratifiedKFold(3).split(X, y):
        est = make(tiny_client).fit([X[i] for i in train], y[train])
        manual.append(est.score([X[i] for i in test], y[test]))
        assert est.adapter_.config.provenance["queries_used"] >= 1
        paid += est.ledger.used
    np.testing.assert_allclose(scores, manual, atol=1e-12)
    # the original's ledger holds all 3 tunings and the 3 scoring batches, exactly what the folds cost by hand
    assert ledger.counts["predict"] == 3 and ledger.used == paid
    assert not hasattr(clf, "adapter_")  # cross-validation fits clones only


def test_grid_search_over_mode(tiny_client, data) -> None:  # type: ignore[no-untyped-def]
    X, y = data
    clf = make(tiny_client)
    search = GridSearchCV(clf, {"mode": ["zero-shot", "pr"]}, cv=2).fit(X, y)
    assert [p["mode"] for p in search.cv_results_["params"]] == ["zero-shot", "pr"]
    best = search.best_estimator_
    prov = best.adapter_.config.provenance
    assert best.mode == search.best_params_["mode"] and prov.get("requested_mode", prov["mode"]) == best.mode
    assert best.client is tiny_client and best.ledger is clf.ledger
    assert clf.ledger.counts["predict"] == 4  # 2 candidates x 2 folds scored, one batch each
    np.testing.assert_array_equal(search.predict(X), best.predict(X))
