"""
Two fine-tunes of one small BERT
================================

The linear-mode-connectivity literature asks of fine-tuned transformers whether two
fine-tunes of one pre-trained network lie in one basin of the loss: Neyshabur et al.
(2020) found no barrier on the straight line between two fine-tunes of one
pre-trained checkpoint, unlike between two networks trained from scratch, and
Juneja et al. (2023) found BERT fine-tunes that fall into separate basins. This
example is that experiment in miniature, on the CPU and with nothing to download:
a two-layer BERT built from a config, pre-trained briefly on masked tokens of a
synthetic language, then fine-tuned to classify variable-length, padded sentences of it.

The connectors take the tokenizer's dict of ``input_ids`` and ``attention_mask`` as
X, and read the logits off the ``SequenceClassifierOutput`` the models return.
"""

# %%
# A synthetic language
# --------------------
# 32 words in two groups of 16. Sentences are walks of a Markov chain: each word is
# followed by one of three words of its own group (85 %) or by one word of the other
# group (15 %), so a masked word can be guessed from its neighbours and a sentence
# tends to stay in one group. Token ids as a tokenizer would give them: ``[PAD]``,
# ``[CLS]``, ``[SEP]`` and ``[MASK]`` first, then the words; sentences of 6 to 22
# words, framed by ``[CLS]`` … ``[SEP]`` and padded to 24 tokens.
import numpy as np
import torch

PAD, CLS, SEP, MASK = 0, 1, 2, 3
N_SPECIAL, N_WORDS, HALF = 4, 32, 16
MAX_LEN = 24
MIN_WORDS, MAX_WORDS = 6, MAX_LEN - 2

language = np.random.default_rng(0)
transition = np.full((N_WORDS, N_WORDS), 1e-3)
for word in range(N_WORDS):
    own = np.arange(HALF) + (word >= HALF) * HALF
    other = np.arange(HALF) + (word < HALF) * HALF
    transition[word, language.choice(own, 3, replace=False)] += 0.85 / 3
    transition[word, language.choice(other)] += 0.15
transition /= transition.sum(1, keepdims=True)


def sample_sentences(rng, n):
    """Token ids and attention masks of n sentences: LongTensors of shape (n, MAX_LEN)."""
    lengths = rng.integers(MIN_WORDS, MAX_WORDS + 1, n)
    words = np.empty((n, MAX_WORDS), dtype=np.int64)
    words[:, 0] = rng.integers(0, N_WORDS, n)
    cdf = transition.cumsum(1)
    for j in range(1, MAX_WORDS):
        u = rng.random(n)[:, None]
        words[:, j] = np.minimum((u > cdf[words[:, j - 1]]).sum(1), N_WORDS - 1)
    ids = np.full((n, MAX_LEN), PAD, dtype=np.int64)
    ids[:, 0] = CLS
    ids[:, 1 : MAX_WORDS + 1] = words + N_SPECIAL
    ids[np.arange(n), lengths + 1] = SEP
    mask = np.arange(MAX_LEN) < lengths[:, None] + 2
    ids[~mask] = PAD
    return torch.as_tensor(ids), torch.as_tensor(mask, dtype=torch.int64)


ids, mask = sample_sentences(np.random.default_rng(1), 2)
print(ids)
print(mask)

# %%
# A small BERT, pre-trained on masked tokens
# ------------------------------------------
# Two layers of width 64 and four heads: about 75 000 parameters. Pre-training is a
# few hundred steps of masked-token prediction on freshly sampled sentences (15 % of
# the words replaced by ``[MASK]``), from two seeds: two different pre-trained
# networks. Dropout is on while training; every network is evaluated in eval mode
# (the connectors put their copies in eval mode).
import transformers
from transformers import BertForMaskedLM, BertForSequenceClassification

config = transformers.BertConfig(
    vocab_size=N_SPECIAL + N_WORDS,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    max_position_embeddings=MAX_LEN,
    pad_token_id=PAD,
    num_labels=2,
)


def mask_words(ids, generator):
    """Replace 15 % of the words by [MASK]: the masked ids and the MLM labels."""
    chosen = (ids >= N_SPECIAL) & (torch.rand(ids.shape, generator=generator) < 0.15)
    return torch.where(chosen, MASK, ids), torch.where(chosen, ids, -100)


def pretrain(seed, steps=200, batch_size=128, lr=3e-3):
    torch.manual_seed(seed)  # initialisation and dropout
    rng, generator = np.random.default_rng(100 + seed), torch.Generator().manual_seed(seed)
    model = BertForMaskedLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 20))
    model.train()
    for _ in range(steps):
        ids, mask = sample_sentences(rng, batch_size)
        inputs, labels = mask_words(ids, generator)
        loss = model(input_ids=inputs, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        warmup.step()
    return model.eval()


def masked_accuracy(model, rng, generator, n=1024):
    ids, mask = sample_sentences(rng, n)
    inputs, labels = mask_words(ids, generator)
    with torch.no_grad():
        predicted = model(input_ids=inputs, attention_mask=mask).logits.argmax(-1)
    chosen = labels != -100
    return (predicted[chosen] == labels[chosen]).float().mean().item()


pretrained = {seed: pretrain(seed) for seed in (0, 1)}
print(f"{sum(p.numel() for p in pretrained[0].parameters())} parameters")
for seed, model in pretrained.items():
    accuracy = masked_accuracy(model, np.random.default_rng(7), torch.Generator().manual_seed(7))
    print(f"pre-training {seed}: masked-word accuracy {accuracy:.1%} (chance {1 / N_WORDS:.1%})")

# %%
# Fine-tuning to classify sentences
# ---------------------------------
# The task: does a sentence have more words of the first group than of the second?
# (Ties are left out.) The answer depends on every word up to the ``[SEP]``, and on
# none of the padding, which the ``attention_mask`` hides. 1024 sentences to train on,
# 1024 to test on, as the dicts a tokenizer returns.
#
# A fine-tune is a ``BertForSequenceClassification`` whose embeddings and encoder are
# copied from a pre-trained network; its pooler and classifier are initialised from
# the fine-tune's seed, which also orders the training batches. Three fine-tunes:
# A and B from pre-training 0, C from pre-training 1.


def classification_data(rng, n):
    ids, mask = sample_sentences(rng, 2 * n)
    words = (ids >= N_SPECIAL).sum(1).numpy()
    first = ((ids >= N_SPECIAL) & (ids < N_SPECIAL + HALF)).sum(1).numpy()
    keep = np.flatnonzero(2 * first != words)[:n]  # no ties
    X = {"input_ids": ids[keep], "attention_mask": mask[keep]}
    return X, (2 * first[keep] > words[keep]).astype(np.int64)


X_train, y_train = classification_data(np.random.default_rng(2), 1024)
X_test, y_test = classification_data(np.random.default_rng(3), 1024)
print(f"{y_train.mean():.1%} of the training sentences are of class 1")


def finetune(pretrained_model, seed, steps=150, batch_size=64, lr=1e-3):
    torch.manual_seed(seed)  # the head's initialisation and dropout
    model = BertForSequenceClassification(config)
    missing = model.bert.load_state_dict(pretrained_model.bert.state_dict(), strict=False)
    assert all(key.startswith("pooler.") for key in missing.missing_keys)
    order = torch.Generator().manual_seed(seed)
    labels = torch.as_tensor(y_train)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    batches = torch.randperm(len(labels), generator=order).split(batch_size)
    for step in range(steps):
        if step % len(batches) == 0:
            batches = torch.randperm(len(labels), generator=order).split(batch_size)
        batch = batches[step % len(batches)]
        inputs = {key: value[batch] for key, value in X_train.items()}
        loss = model(**inputs, labels=labels[batch]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


bert_a = finetune(pretrained[0], seed=10)
bert_b = finetune(pretrained[0], seed=11)
bert_c = finetune(pretrained[1], seed=12)
for name, model in {"A": bert_a, "B": bert_b, "C": bert_c}.items():
    with torch.no_grad():
        predicted = model(**X_test).logits.argmax(1).numpy()
    print(f"fine-tune {name}: test accuracy {(predicted == y_test).mean():.1%}")

# %%
# The straight lines
# ------------------
# A [`LinearConnector`][geoconnect.LinearConnector] takes the dict as X, passes its
# entries to the models' forward as keyword arguments, and reads the logits off the
# ``SequenceClassifierOutput``; the straight line needs no fitting. The barriers are
# measured on the test sentences.
from geoconnect import GeodesicConnector, LinearConnector

N_POINTS = 7
line_ab = LinearConnector(n_points=N_POINTS, device="cpu")
line_ab.fit(X_train, model_a=bert_a, model_b=bert_b)
line_ac = LinearConnector(n_points=N_POINTS, device="cpu")
line_ac.fit(X_train, model_a=bert_a, model_b=bert_c)
test = {
    "linear, A–B (one pre-training)": line_ab.evaluate(X_test, y_test),
    "linear, A–C (two pre-trainings)": line_ac.evaluate(X_test, y_test),
}
for name, ev in test.items():
    print(f"{name:<32} test barrier {ev.barrier:.3f} nats, lowest accuracy {ev.min_accuracy:.1%}")

# %%
# The two fine-tunes of one pre-training are close to linearly connected, as
# Neyshabur et al. found: the barrier of the line between A and B, printed above, is
# a small fraction of that of the line between A and C, whose ends were fine-tuned
# from two different pre-trainings, and its accuracy hardly drops. The second pair
# is the one with a barrier to remove.

# %%
# The geodesic between the fine-tunes of two pre-trainings
# --------------------------------------------------------
# The [`GeodesicConnector`][geoconnect.GeodesicConnector] is fitted on the training
# sentences, without their labels, with its defaults: the continuous curve, for its
# budget of 20 epochs. Attention has no ``vmap`` batching rule, so the networks are
# evaluated in a loop (``strategy_``).
geodesic = GeodesicConnector(n_points=N_POINTS, batch_size=64, device="cpu", random_state=0)
geodesic.fit(X_train, model_a=bert_a, model_b=bert_c)
print(f"geodesic fit: {geodesic.n_iter_} epochs, strategy {geodesic.strategy_!r}")

test["geodesic, A–C (two pre-trainings)"] = geodesic.evaluate(X_test, y_test)
line_barrier = test["linear, A–C (two pre-trainings)"].barrier
geodesic_barrier = test["geodesic, A–C (two pre-trainings)"].barrier
for name, ev in test.items():
    print(f"{name:<34} test barrier {ev.barrier:.3f} nats, lowest accuracy {ev.min_accuracy:.1%}")
print(f"the geodesic's test barrier is {geodesic_barrier / line_barrier:.1%} of the line's")

# %%
# Loss and accuracy along the three paths
# ---------------------------------------
# On the test sentences; each legend entry gives that path's barrier. Between the
# fine-tunes of two pre-trainings the line climbs far above the loss of its ends and
# its accuracy drops, while the geodesic between the same two networks stays at or
# below the loss of its ends; the line between the two fine-tunes of one
# pre-training rises only a little above its ends.
from geoconnect.plotting import plot_loss_profile

axes = plot_loss_profile(test, accuracy=True, title="Fine-tuned BERTs, test sentences")
