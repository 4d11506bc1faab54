"""The refiner of a black box whose logit scale is arbitrary (an embedding API's ``scale x cosine`` at the client's
default scale) trains on standardised inputs, so the scale the client chose does not change the adapter; the
temperature is folded into the deployed weights exactly (the numpy twin equals the trainer) and kept in checkpoints."""

from __future__ import annotations

import numpy as np
import pytest

from craft_sdk.client.base import Capabilities
from craft_sdk import mlp

torch = pytest.importorskip("torch")
from craft_sdk.tuner.refiner import RefinerTrainer  # noqa: E402


def data(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(60) % 5
    x = rng.normal(0, 1, (60, 5)) + 1.2 * np.eye(5)[y] + 0.8 * np.eye(5)[(y + 1) % 5]  # a confusable neighbour
    return (0.2 * x).astype(np.float32), y


def trainer(input_rms: float | None, layers: int = 2) -> RefinerTrainer:
    weights = mlp.init_weights(5, 16, layers, True, seed=3)
    return RefinerTrainer(weights, True, 1e-2, 1e-4, 16, seed=4, input_rms=input_rms)


@pytest.mark.parametrize("layers", [1, 2])
def test_standardised_refiner_does_not_depend_on_the_logit_scale(layers: int) -> None:
    x, y = data()
    a, b = trainer(mlp.INPUT_RMS, layers), trainer(mlp.INPUT_RMS, layers)
    a.train(x, y, beta=1.0, epochs=30)
    b.train(5.31 * x, y, beta=1.0, epochs=30)
    ra, rb = a.refine(x), b.refine(5.31 * x)
    np.testing.assert_allclose(rb, 5.31 * ra, rtol=1e-3, atol=1e-3)  # the same refiner, at the input's scale
    assert (ra.argmax(1) != x.argmax(1)).any()  # it did learn something
    for t in (a, b):  # the deployed weights (temperature folded in) compute what the trainer computes
        twin = mlp.forward(t.model.numpy_weights(), 5.31 * x if t is b else x, residual=True)
        np.testing.assert_allclose(twin, t.refine(5.31 * x if t is b else x), rtol=1e-4, atol=1e-4)
    assert b.model.temperature == pytest.approx(5.31 * a.model.temperature, rel=1e-6)


def test_without_a_target_the_refiner_trains_as_before_and_scale_matters() -> None:
    x, y = data()
    plain, scaled = trainer(None), trainer(None)
    plain.train(x, y, beta=1.0, epochs=30)
    scaled.train(5.31 * x, y, beta=1.0, epochs=30)
    assert plain.model.temperature == 1.0 and scaled.model.temperature == 1.0
    assert not np.allclose(scaled.refine(5.31 * x), 5.31 * plain.refine(x), rtol=1e-2, atol=1e-2)


def test_a_checkpoint_keeps_the_input_temperature() -> None:
    x, y = data(1)
    t = trainer(mlp.INPUT_RMS)
    t.train(10 * x, y, beta=1.0, epochs=5)
    tensors, extras = t.state_tensors(), t.state_json()
    back = trainer(mlp.INPUT_RMS)
    back.load_state(tensors, extras)
    assert back.model.temperature == t.model.temperature != 1.0
    t.train(10 * x, y, beta=1.0, epochs=3)
    back.train(10 * x, y, beta=1.0, epochs=3)
    np.testing.assert_array_equal(back.refine(10 * x), t.refine(10 * x))  # resumed training is byte-identical
    old = trainer(mlp.INPUT_RMS)
    old.load_state(tensors, {"rng": extras["rng"]})  # a checkpoint from before the temperature: trained at T = 1
    assert old.model.temperature == 1.0 and old.fitted


def test_only_a_client_chosen_scale_is_standardised() -> None:
    pytest.importorskip("openai")
    from craft_sdk.client.embed import EmbeddingClient

    assert mlp.input_rms_for(Capabilities("m")) is None
    with EmbeddingClient("http://127.0.0.1:9/v1", "m") as default, EmbeddingClient.from_url("http://127.0.0.1:9/v1?model=m&scale=18.8") as given:
        assert default.capabilities().scale_arbitrary and mlp.input_rms_for(default.capabilities()) == mlp.INPUT_RMS
        assert not given.capabilities().scale_arbitrary and mlp.input_rms_for(given.capabilities()) is None
