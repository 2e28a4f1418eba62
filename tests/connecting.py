"""What the tests of the labelled connectors (curves, the elastic band) share."""

from __future__ import annotations

import copy

import numpy as np
import torch

from geoconnect import LinearConnector


def fit_and_check_on_digits(connector, pair):
    """Fit ``connector`` on the digits pair (with labels), and check what every such
    fit must do: a tenth of the line's test barrier at most, ends that compute the
    models exactly, and the user's model and X unchanged. Returns the connector."""
    a_before = copy.deepcopy(pair.model_a.state_dict())
    X_before = pair.X.copy()
    line = LinearConnector().fit(pair.X, model_a=pair.model_a, model_b=pair.model_b)
    connector.fit(pair.X, pair.y, model_a=pair.model_a, model_b=pair.model_b)
    barrier = connector.evaluate(pair.X_test, pair.y_test).barrier
    assert barrier <= 0.1 * line.evaluate(pair.X_test, pair.y_test).barrier
    with torch.no_grad():  # the ends compute the models
        x = torch.as_tensor(pair.X[:16])
        torch.testing.assert_close(connector.path_[0](x), pair.model_a(x), rtol=0, atol=0)
        torch.testing.assert_close(connector.path_[-1](x), pair.model_b(x), rtol=0, atol=0)
    for key, value in pair.model_a.state_dict().items():  # nothing the user gave moved
        assert torch.equal(value, a_before[key])
    np.testing.assert_array_equal(pair.X, X_before)
    return connector
