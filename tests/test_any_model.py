"""Any model, any input: outputs that are not bare logits, and X as a mapping of keywords.

The statements here: logits are read from tuples, mappings and ``ModelOutput`` by
themselves and by ``output=`` otherwise; a mapping X reaches the models' forward as
keyword arguments in every pass (fit, evaluate, score, predict_proba, transform,
BatchNorm recomputation, alignment); Hugging Face models built from configs go
through the whole estimator surface; bad inputs get errors that say what to do.
"""

from __future__ import annotations

import copy
import pickle
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.exceptions import ConvergenceWarning
from torch import nn
from torch.utils.data import DataLoader, Dataset

from geoconnect import GeodesicConnector, LinearConnector, ModelPath
from geoconnect._inputs import extract_logits

# -- models whose forward is not "one tensor in, logits out" ------------------------------


class Wrapped(nn.Module):
    """An MLP whose output is wrapped: ``kind`` says how."""

    def __init__(self, kind: str, seed: int, n_in: int = 6, n_classes: int = 3):
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.body = nn.Sequential(nn.Linear(n_in, 16), nn.ReLU(), nn.Linear(16, n_classes))
        self.kind = kind

    def forward(self, x: torch.Tensor) -> object:
        logits = self.body(x)
        if self.kind == "tuple":
            return logits, logits.softmax(-1)
        if self.kind == "list":
            return [logits]
        if self.kind == "dict":
            return {"logits": logits, "features": x}
        if self.kind == "scores":  # no "logits": needs output="scores"
            return {"scores": logits, "features": x}
        if self.kind == "second":  # logits second: needs output=1
            return x.sum(-1), logits
        return logits


class Keywords(nn.Module):
    """Takes ``features`` and a 0/1 ``mask`` as keywords; optional BatchNorm."""

    def __init__(self, seed: int, batchnorm: bool = False, n_in: int = 6):
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.hidden = nn.Linear(n_in, 16)
            self.norm = nn.BatchNorm1d(16) if batchnorm else nn.Identity()
            self.head = nn.Linear(16, 3)

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(self.norm(self.hidden(features * mask)))
        return self.head(hidden)


class Tokens(nn.Module):
    """Token ids → embedding → mean over the unmasked positions → logits."""

    def __init__(self, seed: int, vocab: int = 20):
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.embed = nn.Embedding(vocab, 8)
            self.head = nn.Linear(8, 2)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.unsqueeze(-1).to(self.embed.weight.dtype)
        pooled = (self.embed(input_ids) * mask).sum(1) / mask.sum(1).clamp_min(1)
        return self.head(pooled)


def keyword_data(n: int = 48, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "features": torch.randn(n, 6, generator=g),
        "mask": (torch.rand(n, 6, generator=g) > 0.2).float(),
    }


def token_data(n: int = 40, length: int = 7, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 20, (n, length), generator=g)
    lengths = torch.randint(2, length + 1, (n,), generator=g)
    mask = (torch.arange(length) < lengths[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask}  # 0 is the padding id


def quiet_geodesic(**params: object) -> GeodesicConnector:
    defaults = dict(n_points=5, max_iter=2, device="cpu", random_state=0, coarse_to_fine=False)
    return GeodesicConnector(**{**defaults, **params})


def fit_quietly(estimator: object, *args: object, **kwargs: object) -> object:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence after two epochs is not the point
        return estimator.fit(*args, **kwargs)


# -- output extraction --------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 5), st.integers(2, 6)),
    output=st.sampled_from([None, "logits", 0]),
)
def test_the_extraction_is_the_identity_on_plain_tensors_and_finds_wrapped_ones(shape, output):
    logits = torch.randn(*shape)
    if output is None:
        assert extract_logits(logits) is logits
        assert extract_logits((logits, "extra")) is logits
        assert extract_logits([logits]) is logits
    assert extract_logits({"logits": logits, "other": 1}, "logits" if output else None) is logits
    assert extract_logits((logits, None), 0) is logits
    assert extract_logits({"x": logits}, lambda out: out["x"]) is logits


def test_a_transformers_model_output_is_read_by_its_logits():
    transformers = pytest.importorskip("transformers")
    logits = torch.randn(3, 2)
    out = transformers.modeling_outputs.SequenceClassifierOutput(logits=logits)
    assert extract_logits(out) is logits


@pytest.mark.parametrize(
    ("kind", "output"),
    [("tuple", None), ("list", None), ("dict", None), ("scores", "scores"), ("second", 1)],
)
@pytest.mark.parametrize("connector", ["linear", "geodesic"])
def test_wrapped_outputs_give_the_numbers_of_the_bare_logits(kind, output, connector):
    X = torch.randn(40, 6)
    y = torch.randint(0, 3, (40,))
    make = (
        (lambda **p: LinearConnector(n_points=5, device="cpu", **p))
        if connector == "linear"
        else quiet_geodesic
    )
    wrapped = fit_quietly(
        make(output=output), X, model_a=Wrapped(kind, 0), model_b=Wrapped(kind, 1)
    )
    bare = fit_quietly(make(), X, model_a=Wrapped("bare", 0), model_b=Wrapped("bare", 1))
    np.testing.assert_allclose(wrapped.transform(X), bare.transform(X), rtol=1e-6, atol=1e-7)
    assert wrapped.score(X, y) == pytest.approx(bare.score(X, y), rel=1e-6)
    assert wrapped.energy_ == pytest.approx(bare.energy_, rel=1e-6)
    # A point of the path still returns what the user's model returns.
    assert type(wrapped.path_[2](X[:2])) is type(Wrapped(kind, 0)(X[:2]))


def test_a_mapping_output_without_logits_asks_for_output():
    X = torch.randn(20, 6)
    geo = quiet_geodesic()
    with pytest.raises(ValueError, match=r"no 'logits'; pass output= .*'scores'"):
        geo.fit(X, model_a=Wrapped("scores", 0), model_b=Wrapped("scores", 1))
    assert not hasattr(geo, "path_")


@pytest.mark.parametrize(
    ("output", "message"),
    [
        (
            "missing",
            r"output='missing'.* no entry 'missing' \(its keys are \['scores', 'features'\]\)",
        ),
        (lambda out: out["scores"].sum(), r"logits have shape \(\)"),
        (lambda out: out["scores"][:1], r"one row per sample"),
        (lambda out: out["features"].tolist(), r"is a list"),
    ],
    ids=["missing-key", "scalar", "wrong-rows", "not-a-tensor"],
)
def test_an_output_that_yields_no_batch_of_logits_is_refused(output, message):
    X = torch.randn(20, 6)
    with pytest.raises(ValueError, match=message):
        LinearConnector(device="cpu", output=output).fit(
            X, model_a=Wrapped("scores", 0), model_b=Wrapped("scores", 1)
        )


def test_output_must_be_a_key_an_index_or_a_callable():
    with pytest.raises(TypeError, match="output must be None"):
        ModelPath.linear(nn.Linear(2, 2), nn.Linear(2, 2), 3).output = 1.5
    with pytest.raises(ValueError, match="'output' parameter"):
        LinearConnector(output=1.5).fit(
            torch.randn(4, 6), model_a=Wrapped("tuple", 0), model_b=Wrapped("tuple", 1)
        )


def scores(out: dict) -> torch.Tensor:
    return out["scores"]


def test_a_path_saves_its_output_key_and_asks_again_for_a_callable(tmp_path):
    X = torch.randn(10, 6)
    a, b = Wrapped("scores", 0), Wrapped("scores", 1)
    path = ModelPath.linear(a, b, 3)
    path.output = "scores"
    loaded = ModelPath.load(path.save(tmp_path / "key.safetensors"), template=Wrapped("scores", 5))
    assert loaded.output == "scores"
    torch.testing.assert_close(loaded.logits(X), path.logits(X), rtol=0, atol=0)

    path.output = scores
    file = path.save(tmp_path / "callable.safetensors")
    with pytest.raises(ValueError, match=r"callable .*scores.* output=that_callable"):
        ModelPath.load(file, template=Wrapped("scores", 5))
    again = ModelPath.load(file, template=Wrapped("scores", 5), output=scores)
    torch.testing.assert_close(again.logits(X), path.logits(X), rtol=0, atol=0)
    with pytest.raises(ValueError, match="records output='scores'"):
        ModelPath.load(tmp_path / "key.safetensors", template=Wrapped("scores", 5), output=0)


def test_a_connector_with_a_named_output_function_pickles():
    X = torch.randn(20, 6)
    line = LinearConnector(n_points=3, device="cpu", output=scores)
    line.fit(X, model_a=Wrapped("scores", 0), model_b=Wrapped("scores", 1))
    again = pickle.loads(pickle.dumps(line))
    np.testing.assert_array_equal(again.transform(X), line.transform(X))


# -- mapping X ------------------------------------------------------------------------------


def test_mapping_x_reaches_forward_as_keywords_in_every_pass():
    X = keyword_data()
    y = torch.randint(0, 3, (48,))
    before = {k: v.clone() for k, v in X.items()}
    geo = fit_quietly(quiet_geodesic(), X, y, model_a=Keywords(0), model_b=Keywords(1))
    n = len(geo.path_)
    assert geo.transform(X).shape == (48, n * 3)
    assert geo.predict_proba(X).shape == (48, 3)
    assert geo.predict(X).shape == (48,)
    evaluation = geo.evaluate(X, y)
    assert np.isfinite(evaluation.loss).all() and np.isfinite(geo.score(X, y))
    assert not hasattr(geo, "n_features_in_")
    for key, value in X.items():  # the user's data is untouched
        assert torch.equal(value, before[key])
    # The ends compute what the models compute, on the same keywords.
    with torch.no_grad():
        torch.testing.assert_close(geo.path_[0](**X), Keywords(0)(**X), rtol=0, atol=0)
        torch.testing.assert_close(geo.path_[-1](**X), Keywords(1)(**X), rtol=0, atol=0)


def test_batchnorm_statistics_are_recomputed_on_mapping_x():
    X = keyword_data(64)
    a, b = Keywords(0, batchnorm=True), Keywords(1, batchnorm=True)
    line = LinearConnector(n_points=3, device="cpu").fit(X, model_a=a, model_b=b)
    middle = line.path_[1]
    with torch.no_grad():
        hidden = middle.hidden(X["features"] * X["mask"])
    torch.testing.assert_close(middle.norm.running_mean, hidden.mean(0), rtol=1e-5, atol=1e-5)
    # Positions between points recompute them on a mapping too.
    assert isinstance(line.path_.at(0.25, X), Keywords)


def test_integer_token_ids_keep_their_dtype_and_the_numbers_match_the_models():
    X = token_data()
    a, b = Tokens(0), Tokens(1)
    line = LinearConnector(n_points=3, device="cpu").fit(X, model_a=a, model_b=b)
    seen = []
    hook = line.path_.template.embed.register_forward_pre_hook(lambda m, i: seen.append(i[0].dtype))
    try:
        line.transform(X)
    finally:
        hook.remove()
    assert set(seen) == {torch.long}
    with torch.no_grad():
        expected = torch.softmax(a(**X).double(), -1)
    np.testing.assert_allclose(line.transform(X)[:, :2], expected.numpy(), rtol=1e-6)


def test_numpy_and_bool_entries_are_accepted():
    X = token_data()
    as_numpy = {"input_ids": X["input_ids"].numpy(), "attention_mask": X["attention_mask"].bool()}
    line = LinearConnector(n_points=3, device="cpu").fit(
        as_numpy, model_a=Tokens(0), model_b=Tokens(1)
    )
    reference = LinearConnector(n_points=3, device="cpu").fit(
        X, model_a=Tokens(0), model_b=Tokens(1)
    )
    np.testing.assert_allclose(line.transform(as_numpy), reference.transform(X), rtol=1e-6)


class KeywordDataset(Dataset):
    def __init__(self, X: dict[str, torch.Tensor], y: torch.Tensor | None):
        self.X, self.y = X, y

    def __len__(self) -> int:
        return len(self.y) if self.y is not None else len(next(iter(self.X.values())))

    def __getitem__(self, i: int) -> object:
        item = {k: v[i] for k, v in self.X.items()}
        return item if self.y is None else (item, self.y[i])


@pytest.mark.parametrize("labelled", [True, False])
def test_a_dataloader_of_mappings_gives_the_in_memory_numbers(labelled):
    X = token_data(48)
    y = torch.randint(0, 2, (48,))
    loader = DataLoader(KeywordDataset(X, y if labelled else None), batch_size=16)
    streamed = LinearConnector(n_points=3, device="cpu").fit(
        loader, model_a=Tokens(0), model_b=Tokens(1)
    )
    held = LinearConnector(n_points=3, device="cpu").fit(X, model_a=Tokens(0), model_b=Tokens(1))
    np.testing.assert_allclose(streamed.transform(loader), held.transform(X), rtol=1e-6)
    assert streamed.length_ == pytest.approx(held.length_, rel=1e-6)
    if labelled:
        assert streamed.score(loader) == pytest.approx(held.score(X, y), rel=1e-6)


def test_a_geodesic_fit_on_a_stream_of_mappings_matches_the_in_memory_fit():
    X = token_data(48)
    loader = DataLoader(KeywordDataset(X, None), batch_size=48)
    streamed = fit_quietly(
        quiet_geodesic(batch_size=48), loader, model_a=Tokens(0), model_b=Tokens(1)
    )
    held = fit_quietly(quiet_geodesic(batch_size=48), X, model_a=Tokens(0), model_b=Tokens(1))
    torch.testing.assert_close(streamed.path_.parameters_vector(), held.path_.parameters_vector())


def test_a_checkpointed_fit_on_mapping_x_resumes(tmp_path):
    X = token_data(32)
    make = lambda: quiet_geodesic(max_iter=3, checkpoint=tmp_path)  # noqa: E731
    first = fit_quietly(make(), X, model_a=Tokens(0), model_b=Tokens(1))
    again = fit_quietly(make(), X, model_a=Tokens(0), model_b=Tokens(1))  # resumes at its end
    torch.testing.assert_close(
        again.path_.parameters_vector(), first.path_.parameters_vector(), rtol=0, atol=0
    )
    other = {**X, "attention_mask": torch.ones_like(X["attention_mask"])}
    with pytest.raises(ValueError, match="X differs"):
        make().fit(other, model_a=Tokens(0), model_b=Tokens(1))


# -- bad mapping input ------------------------------------------------------------------------


def test_entries_of_different_lengths_are_refused_with_their_lengths():
    X = {"features": torch.randn(10, 6), "mask": torch.ones(9, 6)}
    line = LinearConnector(device="cpu")
    with pytest.raises(
        ValueError, match=r"same number of samples.*'features' has 10, 'mask' has 9"
    ):
        line.fit(X, model_a=Keywords(0), model_b=Keywords(1))
    assert not hasattr(line, "path_")


def test_a_key_forward_does_not_take_is_named():
    X = {**keyword_data(10), "token_type_ids": torch.zeros(10, 6, dtype=torch.long)}
    with pytest.raises(ValueError, match=r"key 'token_type_ids'.*among \['features', 'mask'\]"):
        LinearConnector(device="cpu").fit(X, model_a=Keywords(0), model_b=Keywords(1))


def test_a_fitted_connector_names_a_wrong_key_at_transform():
    line = LinearConnector(n_points=3, device="cpu").fit(
        keyword_data(10), model_a=Keywords(0), model_b=Keywords(1)
    )
    with pytest.raises(ValueError, match="key 'extra'"):
        line.transform({**keyword_data(10), "extra": torch.zeros(10)})


@pytest.mark.parametrize(
    ("X", "error", "message"),
    [
        ({}, ValueError, "empty mapping"),
        ({1: torch.zeros(3, 6)}, TypeError, "str keys"),
        (
            {"features": np.array(["a", "b"]), "mask": np.ones(2)},
            TypeError,
            r"X\['features'\] must hold numbers",
        ),
        ({"features": torch.tensor(1.0), "mask": torch.ones(1)}, ValueError, "scalar"),
        (
            {"features": torch.full((3, 6), float("nan")), "mask": torch.ones(3, 6)},
            ValueError,
            r"X\['features'\] contains NaN",
        ),
        ({"features": torch.zeros(0, 6), "mask": torch.zeros(0, 6)}, ValueError, "empty"),
    ],
    ids=["empty", "int-key", "strings", "scalar", "nan", "no-samples"],
)
def test_malformed_mappings_get_clear_errors(X, error, message):
    with pytest.raises(error, match=message):
        LinearConnector(device="cpu").fit(X, model_a=Keywords(0), model_b=Keywords(1))


def test_without_models_a_mapping_x_asks_for_them():
    X, y = keyword_data(20), np.arange(20) % 3
    with pytest.raises(ValueError, match=r"(?i)pass model_a and model_b"):
        LinearConnector(device="cpu").fit(X, y)


def test_a_model_that_fails_on_the_mapping_says_what_it_was_given():
    class Strict(Keywords):
        def forward(self, features, mask):
            raise RuntimeError("boom")

    with pytest.raises(
        ValueError, match=r"cannot be applied to X: a batch of \{'features': shape \(2, 6\)"
    ):
        LinearConnector(device="cpu").fit(keyword_data(10), model_a=Strict(0), model_b=Strict(1))


# -- Hugging Face models built from configs ---------------------------------------------------


def tiny_bert_config(transformers: object) -> object:
    """A one-layer BERT of width 16 over 20 tokens, for two labels."""
    return transformers.BertConfig(  # type: ignore[attr-defined]
        vocab_size=20,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=2,
    )


@pytest.fixture(scope="module")
def bert_pair():
    transformers = pytest.importorskip("transformers")
    config = tiny_bert_config(transformers)
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(transformers.BertForSequenceClassification(config).eval())
    return models


@pytest.fixture(scope="module")
def vit_pair():
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=1,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=3,
    )
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(transformers.ViTForImageClassification(config).eval())
    return models


def _no_batching_warnings(caught: list) -> None:
    assert not [w for w in caught if "batching rule" in str(w.message)]


def test_a_bert_pair_goes_through_the_whole_estimator_surface(bert_pair, tmp_path):
    a, b = bert_pair
    X = token_data(32, length=8)
    y = torch.randint(0, 2, (32,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        geo = quiet_geodesic().fit(X, y, model_a=a, model_b=b)
        line = LinearConnector(n_points=3, device="cpu").fit(X, y, model_a=a, model_b=b)
        geo.transform(X), geo.score(X, y), line.evaluate(X, y)
    _no_batching_warnings(caught)
    assert geo.strategy_ == "loop"  # attention has no vmap batching rule in torch 2.13
    with torch.no_grad():
        for path in (geo.path_, line.path_):
            torch.testing.assert_close(path[0](**X).logits, a(**X).logits, rtol=0, atol=0)
            torch.testing.assert_close(path[-1](**X).logits, b(**X).logits, rtol=0, atol=0)
    assert type(geo.path_[1](**X)).__name__ == "SequenceClassifierOutput"
    again = pickle.loads(pickle.dumps(geo))
    np.testing.assert_array_equal(again.transform(X), geo.transform(X))
    loaded = ModelPath.load(geo.path_.save(tmp_path / "bert.safetensors"), template=a)
    torch.testing.assert_close(loaded.logits(X), geo.path_.logits(X), rtol=0, atol=0)


def test_a_bert_pair_fits_on_a_dataloader_of_padded_mappings(bert_pair):
    a, b = bert_pair
    X = token_data(24, length=8)
    y = torch.randint(0, 2, (24,))
    loader = DataLoader(KeywordDataset(X, y), batch_size=8, shuffle=True)
    geo = fit_quietly(quiet_geodesic(batch_size=8), loader, model_a=a, model_b=b)
    assert np.isfinite(geo.energy_) and np.isfinite(geo.score(loader))


def test_a_vit_pair_connects_on_tensor_and_mapping_x(vit_pair):
    a, b = vit_pair
    images = torch.randn(16, 1, 8, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        on_tensor = quiet_geodesic().fit(images, model_a=a, model_b=b)
        on_mapping = quiet_geodesic().fit({"pixel_values": images}, model_a=a, model_b=b)
    _no_batching_warnings(caught)
    np.testing.assert_allclose(
        on_tensor.transform(images), on_mapping.transform({"pixel_values": images}), rtol=1e-6
    )
    with torch.no_grad():
        torch.testing.assert_close(
            on_tensor.path_[-1](images).logits, b(images).logits, rtol=0, atol=0
        )


def token_task(n: int, seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Padded token sequences (4 to 12 tokens of 18, id 0 the padding) labelled by
    whether more of their tokens are from the vocabulary's upper half."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(4, 13, (n,), generator=g)
    mask = (torch.arange(12) < lengths[:, None]).long()
    ids = torch.randint(2, 20, (n, 12), generator=g) * mask
    upper = ((ids >= 11) & (mask == 1)).sum(1)
    return {"input_ids": ids, "attention_mask": mask}, (2 * upper > lengths).long()


def _train_bert(model: nn.Module, X: dict, y: torch.Tensor, seed: int, steps: int) -> nn.Module:
    with torch.random.fork_rng():  # dropout draws from the global generator
        torch.manual_seed(seed)
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        g = torch.Generator().manual_seed(seed)
        model.train()
        for _ in range(steps):
            index = torch.randint(0, len(y), (32,), generator=g)
            batch = {k: v[index] for k, v in X.items()}
            loss = model(**batch, labels=y[index]).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def fine_tuned_berts():
    """Two fine-tunes (100 steps, two data orders) of one tiny BERT trained 200 steps
    on the token task: 500 fit inputs; 500 held out."""
    transformers = pytest.importorskip("transformers")
    config = tiny_bert_config(transformers)
    X, y = token_task(500, seed=0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        base = _train_bert(transformers.BertForSequenceClassification(config), X, y, 0, 200)
    a, b = (_train_bert(copy.deepcopy(base), X, y, seed, 100) for seed in (1, 2))
    return a, b, X, y, *token_task(500, seed=1)


def test_the_default_geodesic_is_no_worse_than_the_line_held_out_on_fine_tuned_berts(
    fine_tuned_berts,
):
    # Fine-tunes of one model are linearly connected: the line has no barrier, on
    # the fit inputs or held out. A label-free fit on 500 inputs can bend the path
    # to where those inputs' predictions agree and others' do not; the default
    # geodesic must not buy its length with a held-out barrier the line does not have.
    a, b, X, y, X_test, y_test = fine_tuned_berts
    line = LinearConnector(device="cpu").fit(X, model_a=a, model_b=b)
    geo = GeodesicConnector(device="cpu", random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        geo.fit(X, model_a=a, model_b=b)
    line_held, geo_held = (c.evaluate(X_test, y_test) for c in (line, geo))
    assert line_held.barrier < 1e-3  # the case: a line that is already flat held out
    assert geo_held.barrier <= line_held.barrier + 1e-3
    assert geo_held.length <= line_held.length * 1.01
    assert geo.length_ <= line.length_ * 1.01
    assert geo.evaluate(X, y).barrier <= line.evaluate(X, y).barrier + 1e-3


def test_a_bert_key_its_forward_does_not_name_is_warned_about(bert_pair):
    # BertForSequenceClassification.forward takes **kwargs: a misspelt key would be
    # swallowed there, so it is named in a warning.
    a, b = bert_pair
    X = {**token_data(8), "atention_mask": torch.zeros(8, 7, dtype=torch.long)}
    with pytest.warns(UserWarning, match=r"'atention_mask'.*\*\*kwargs.*'attention_mask'"):
        LinearConnector(device="cpu").fit(X, model_a=a, model_b=b)


def test_alignment_checks_the_aligned_copy_on_mapping_x():
    X = keyword_data(32)
    line = LinearConnector(n_points=3, device="cpu", align="weight_matching", random_state=0)
    line.fit(X, model_a=Keywords(0), model_b=Keywords(1))
    assert line.path_.alignment  # units were permuted …
    with torch.no_grad():  # … and the last point still computes model_b
        torch.testing.assert_close(line.path_[-1](**X), Keywords(1)(**X), rtol=1e-5, atol=1e-6)


# -- output conventions: probabilities, log-probabilities, one binary logit ------------------


class Softmaxed(nn.Module):
    """An MLP ending in a softmax (skorch's NLLLoss convention) or a log-softmax."""

    def __init__(self, seed: int, log: bool = False):
        super().__init__()
        self.body = Wrapped("bare", seed).body
        self.log = log

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.body(x)
        return logits.log_softmax(-1) if self.log else logits.softmax(-1)


class OneLogit(nn.Module):
    def __init__(self, seed: int):
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.body = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@pytest.mark.parametrize("log", [False, True], ids=["probabilities", "log-probabilities"])
def test_probability_outputs_give_the_losses_of_the_logits(log):
    X, y = torch.randn(40, 6), torch.randint(0, 3, (40,))
    line = LinearConnector(n_points=5, device="cpu")
    line.fit(X, model_a=Softmaxed(0, log), model_b=Softmaxed(1, log))
    bare = LinearConnector(n_points=5, device="cpu")
    bare.fit(X, model_a=Wrapped("bare", 0), model_b=Wrapped("bare", 1))
    np.testing.assert_allclose(line.evaluate(X, y).loss, bare.evaluate(X, y).loss, rtol=1e-5)
    np.testing.assert_allclose(line.transform(X), bare.transform(X), rtol=1e-5, atol=1e-7)
    with torch.no_grad():  # the end's loss is the model's own cross-entropy
        own = F.nll_loss(Softmaxed(0, log)(X).log() if not log else Softmaxed(0, log)(X), y)
    assert line.evaluate(X, y).loss[0] == pytest.approx(float(own), rel=1e-5)


def test_a_single_logit_binary_classifier_is_read_as_two_logits(tmp_path):
    X, y = torch.randn(40, 6), torch.randint(0, 2, (40,))
    geo = fit_quietly(quiet_geodesic(), X, y, model_a=OneLogit(0), model_b=OneLogit(1))
    assert geo.n_classes_ == 2 and geo.transform(X).shape == (40, 5 * 2)
    with torch.no_grad():
        bce = F.binary_cross_entropy_with_logits(OneLogit(1)(X)[:, 0], y.float())
    assert geo.evaluate(X, y).loss[-1] == pytest.approx(float(bce), rel=1e-5)
    loaded = ModelPath.load(geo.path_.save(tmp_path / "binary.safetensors"), template=OneLogit(5))
    torch.testing.assert_close(loaded.logits(X), geo.path_.logits(X), rtol=0, atol=0)


def test_ends_of_different_output_conventions_are_refused():
    X = torch.randn(20, 6)
    with pytest.raises(
        ValueError, match="model_a's outputs read as probabilities but model_b's as logits"
    ):
        LinearConnector(device="cpu").fit(X, model_a=Softmaxed(0), model_b=Wrapped("bare", 1))


def test_an_output_of_one_number_per_sample_says_regression_is_not_supported():
    class Regressor(OneLogit):
        def forward(self, x):
            return self.body(x)[:, 0]

    with pytest.raises(ValueError, match="regression is not supported"):
        LinearConnector(device="cpu").fit(
            torch.randn(20, 6), model_a=Regressor(0), model_b=Regressor(1)
        )
