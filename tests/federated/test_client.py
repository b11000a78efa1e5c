"""FederatedClient local training, without Ray."""

import time

import numpy as np
import pytest

from mlplatform.federated.client import FederatedClient, RoundDeadline, flat_weights, load_flat_weights
from mlplatform.federated.config import ClientConfig
from mlplatform.federated.task import NgramTask


@pytest.fixture(scope="module")
def task():
    return NgramTask(num_features=256)


def start(task, **config):
    client = FederatedClient(task, ClientConfig(**config))
    return client, flat_weights(client.model)


def test_fit_returns_the_update_and_leaves_the_global_weights_alone(task):
    client, global_weights = start(task, local_epochs=2)
    before = global_weights.copy()
    indices = np.arange(40)
    result = client.fit(7, global_weights, indices, seed=1)
    assert result.client_id == 7 and result.num_examples == 40 and result.delta.shape == global_weights.shape
    assert np.linalg.norm(result.delta) > 0 and np.isfinite(result.metrics["train_loss"])
    np.testing.assert_array_equal(global_weights, before)  # the client trained a copy, not the caller's array
    np.testing.assert_allclose(flat_weights(client.model), global_weights + result.delta, rtol=1e-6, atol=1e-6)


def test_the_same_seed_gives_the_same_update(task):
    client, weights = start(task)
    first = client.fit(0, weights, np.arange(30), seed=5).delta
    assert np.array_equal(first, client.fit(0, weights, np.arange(30), seed=5).delta)
    assert not np.array_equal(first, client.fit(0, weights, np.arange(30), seed=6).delta)


def test_the_proximal_term_keeps_the_client_near_the_global_model(task):
    client, weights = start(task, local_epochs=5)
    free = client.fit(0, weights, np.arange(60), seed=0).delta
    held = client.fit(0, weights, np.arange(60), seed=0, proximal_mu=0.1).delta
    assert np.linalg.norm(held) < 0.8 * np.linalg.norm(free)


def test_a_passed_deadline_stops_the_client(task):
    client, weights = start(task)
    with pytest.raises(RoundDeadline):
        client.fit(0, weights, np.arange(30), seed=0, deadline=time.time() - 1)
    started = time.time()
    with pytest.raises(RoundDeadline):
        client.fit(0, weights, np.arange(30), seed=0, deadline=time.time() + 0.2, slowdown_s=30)
    assert time.time() - started < 2  # woke at the deadline, not after the whole slowdown


def test_a_vector_of_the_wrong_length_is_refused(task):
    client, weights = start(task)
    with pytest.raises(ValueError, match=f"the model has {weights.size} trainable weights, the vector 3"):
        load_flat_weights(client.model, np.zeros(3, dtype=np.float32))
