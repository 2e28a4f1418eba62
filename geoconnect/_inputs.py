"""What a model is fed, and what it returns: one place for both.

A batch of inputs is either one tensor ``(batch, *input_shape)``, passed to the
model's forward as its one positional argument, or a mapping of names to tensors of
equal length (``{"input_ids": …, "attention_mask": …}``), passed as keyword
arguments. Every function here takes either, so the rest of the library never asks
which it has.

A model's output becomes logits by :func:`extract_logits`: a tensor as it is, a
tuple or list by its first element, a mapping (a ``transformers`` ``ModelOutput``
among them) by its ``"logits"`` entry — or by the user's ``output=``: a key, an
index or a callable.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Mapping

import torch
from scipy import sparse
from torch import Tensor, nn

#: A batch of inputs: one tensor, or a mapping of keyword arguments to tensors.
Inputs = Tensor | dict[str, Tensor]

#: How logits are read off a model's output: automatic (None), a key, an index, or a
#: callable ``output(model_output) -> logits``.
Output = str | int | Callable[[object], Tensor] | None


def is_mapping(X: object) -> bool:
    """Whether X is a mapping of keyword inputs (a sparse DOK matrix is not one)."""
    return isinstance(X, Mapping) and not sparse.issparse(X)


def n_rows(x: Inputs) -> int:
    """The number of samples in a batch.

    Examples
    --------
    >>> import torch
    >>> from geoconnect._inputs import n_rows
    >>> n_rows({"input_ids": torch.zeros(3, 5), "attention_mask": torch.ones(3, 5)})
    3
    """
    if isinstance(x, Tensor):
        return int(x.shape[0])
    return int(next(iter(x.values())).shape[0])


def rows(x: Inputs, index: Tensor | slice) -> Inputs:
    """The samples at ``index`` (a slice or an index tensor) of a batch."""
    if isinstance(x, Tensor):
        return x[index]
    return {key: value[index] for key, value in x.items()}


def move(x: Inputs, device: torch.device, *, non_blocking: bool = False) -> Inputs:
    """A batch on ``device`` (the same tensors when they are there already)."""
    if isinstance(x, Tensor):
        return x.to(device, non_blocking=non_blocking)
    return {key: value.to(device, non_blocking=non_blocking) for key, value in x.items()}


def concat(blocks: list[Inputs]) -> Inputs:
    """Batches joined along the samples."""
    if isinstance(blocks[0], Tensor):
        return torch.cat(blocks)  # type: ignore[arg-type]
    return {key: torch.cat([block[key] for block in blocks]) for key in blocks[0]}  # type: ignore[index]


def stack_inputs(blocks: list[Inputs]) -> Inputs:
    """Batches of equal size stacked along a new leading axis (a mapping: key by key)."""
    if isinstance(blocks[0], Tensor):
        return torch.stack(blocks)  # type: ignore[arg-type]
    return {k: torch.stack([b[k] for b in blocks]) for k in blocks[0]}  # type: ignore[index]


def repeat_rows(x: Inputs, times: int) -> Inputs:
    """Each tensor of the batch repeated ``times`` along the samples."""
    if isinstance(x, Tensor):
        return x.repeat(times, *([1] * (x.ndim - 1)))
    return {key: repeat_rows(value, times) for key, value in x.items()}  # type: ignore[misc]


def named_tensors(x: Inputs, name: str) -> dict[str, Tensor]:
    """A batch as named tensors: ``{name: x}``, or ``{"name/key": x[key]}``."""
    if isinstance(x, Tensor):
        return {name: x}
    return {f"{name}/{key}": value for key, value in x.items()}


def arguments(x: Inputs) -> tuple[tuple[Tensor, ...], dict[str, Tensor]]:
    """The positional and keyword arguments the model's forward gets for a batch.

    Examples
    --------
    >>> import torch
    >>> from geoconnect._inputs import arguments
    >>> arguments({"input_ids": torch.zeros(2, 4)})[1].keys()
    dict_keys(['input_ids'])
    """
    if isinstance(x, Tensor):
        return (x,), {}
    return (), dict(x)


def call(module: nn.Module, x: Inputs) -> object:
    """``module`` applied to a batch: ``module(x)`` or ``module(**x)``."""
    args, kwargs = arguments(x)
    return module(*args, **kwargs)


def describe(x: Inputs) -> str:
    """A batch in words, for error messages: its shape, or each entry's.

    Examples
    --------
    >>> import torch
    >>> from geoconnect._inputs import describe
    >>> describe(torch.zeros(2, 3))
    'a batch of shape (2, 3) (dtype torch.float32)'
    >>> describe({"input_ids": torch.zeros(2, 4, dtype=torch.long)})
    "a batch of {'input_ids': shape (2, 4) (dtype torch.int64)}"
    """
    if isinstance(x, Tensor):
        return f"a batch of shape {tuple(x.shape)} (dtype {x.dtype})"
    parts = ", ".join(f"{k!r}: shape {tuple(v.shape)} (dtype {v.dtype})" for k, v in x.items())
    return "a batch of {" + parts + "}"


def check_keywords(module: nn.Module, x: Inputs, name: str) -> None:
    """Check a mapping batch's keys against ``module.forward``'s arguments.

    A key forward does not take is refused, naming it; a key that only a ``**kwargs``
    would take (which may ignore it, as a misspelt ``attention_mask`` would be) is
    warned about.
    """
    if isinstance(x, Tensor):
        return
    try:
        signature = inspect.signature(module.forward)
    except (TypeError, ValueError):  # a forward without a signature: let the call say
        return
    accepted = signature.parameters
    names = [
        key
        for key, p in accepted.items()
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    ]
    catch_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    for key in x:
        if key in names:
            continue
        if catch_all:
            warnings.warn(
                f"X has the key {key!r}, which {name}'s forward "
                f"({type(module).__name__}.forward) does not name: it goes to its "
                f"**kwargs, which may ignore it. Its named arguments are {names}; check "
                f"the spelling of {key!r}.",
                UserWarning,
                stacklevel=2,
            )
        else:
            raise ValueError(
                f"X has the key {key!r}, but {name}'s forward "
                f"({type(module).__name__}.forward) takes no argument of that name; a "
                f"mapping X is passed to forward as keyword arguments, so its keys must "
                f"be among {names}. Rename or drop {key!r}."
            )


def check_output(output: object) -> Output:
    """Validate the ``output`` parameter of a connector or a path."""
    if output is None or callable(output):
        return output  # type: ignore[return-value]
    if isinstance(output, bool) or not isinstance(output, (str, int)):
        raise TypeError(
            "output must be None (logits taken from a tensor, the first element of a "
            "tuple, or the 'logits' entry of a mapping or ModelOutput), a key (str), an "
            "index (int) or a callable output(model_output) -> logits; got "
            f"{type(output).__name__}."
        )
    return output


def extract_logits(out: object, output: Output = None) -> Tensor:
    """The logits in a model's output.

    Parameters
    ----------
    out : object
        What the model's forward returned.
    output : None, str, int or callable, default=None
        ``None`` takes a tensor as it is, the first element of a tuple or list, and
        the ``"logits"`` entry of a mapping (a ``transformers`` ``ModelOutput`` is
        one); a ``str`` is a key, an ``int`` an index, a callable is applied.

    Returns
    -------
    Tensor

    Raises
    ------
    ValueError
        When the output holds no such entry, or the result is not a tensor; the
        message says what the output was and how to pass ``output=``.

    Examples
    --------
    >>> import torch
    >>> from geoconnect._inputs import extract_logits
    >>> logits = torch.zeros(2, 3)
    >>> extract_logits(logits) is logits
    True
    >>> extract_logits({"logits": logits, "hidden": None}) is logits
    True
    >>> extract_logits((logits, "attention"), output=0) is logits
    True
    """
    if output is None:
        if isinstance(out, Tensor):
            return out
        if isinstance(out, Mapping):
            if "logits" not in out:
                raise ValueError(
                    f"The model returned a {type(out).__name__} with the keys "
                    f"{list(out)[:8]} and no 'logits'; pass output= to the connector to "
                    "say where the logits are: a key (output='scores'), an index, or a "
                    "callable output(model_output) -> logits."
                )
            value = out["logits"]
        elif isinstance(out, (tuple, list)) and out:
            value = out[0]
        else:
            value = out
        where = "its first element" if isinstance(out, (tuple, list)) else "'logits'"
    elif callable(output):
        value = output(out)
        where = f"output={getattr(output, '__name__', output)!r}"
    else:
        try:
            value = out[output]  # type: ignore[index]
        except (KeyError, IndexError, TypeError):
            raise ValueError(
                f"output={output!r}: the model returned a {type(out).__name__}, which has "
                f"no entry {output!r}{_entries(out)}. Pass the key or index of the logits, "
                "or a callable output(model_output) -> logits."
            ) from None
        where = f"output={output!r}"
    if not isinstance(value, Tensor):
        raise ValueError(
            f"The model's logits must be a tensor of shape (batch, n_classes), but "
            f"{where} of its {type(out).__name__} output is a {type(value).__name__}. "
            "Pass output= (a key, an index or a callable output(model_output) -> logits) "
            "to say where the logits are."
        )
    return value


class Probabilities:
    """Read a model's output as class probabilities: the logits are their logarithms.

    The connectors wrap the ``output`` in it when a model's rows on the first samples
    of X are non-negative and sum to one (a softmax at the end, skorch's ``NLLLoss``
    convention); log-probabilities need nothing, being logits already.

    Examples
    --------
    >>> import torch
    >>> from geoconnect._inputs import Probabilities
    >>> Probabilities()(torch.tensor([[0.25, 0.75]])).exp()
    tensor([[0.2500, 0.7500]])
    """

    kind = "probabilities"

    def __init__(self, output: Output = None):
        self.output = output

    def __call__(self, out: object) -> Tensor:
        return torch.log(extract_logits(out, self.output))

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.output == self.output  # type: ignore[attr-defined]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.output!r})"


class BinaryLogit(Probabilities):
    """Read a model's single output ``z`` as a binary classifier's logit: ``[0, z]``.

    ``softmax([0, z])`` is ``[1 − σ(z), σ(z)]``, the probabilities the logit means.

    Examples
    --------
    >>> import torch
    >>> from geoconnect._inputs import BinaryLogit
    >>> BinaryLogit()(torch.tensor([[2.0]]))
    tensor([[0., 2.]])
    """

    kind = "binary-logit"

    def __call__(self, out: object) -> Tensor:
        z = extract_logits(out, self.output)
        return torch.cat([torch.zeros_like(z), z], dim=-1)


_CONVENTIONS = {c.kind: c for c in (Probabilities, BinaryLogit)}


def adapt_output(logits: Tensor, output: Output) -> Output:
    """``output``, wrapped for what ``logits`` (on the first samples) show they are.

    One column: a binary classifier's logit (:class:`BinaryLogit`). Rows that are
    non-negative and sum to one: probabilities (:class:`Probabilities`). Anything
    else: logits, ``output`` as it is.
    """
    if isinstance(output, Probabilities) or logits.ndim != 2:
        return output
    if logits.shape[1] == 1:
        return BinaryLogit(output)
    finite = bool(torch.isfinite(logits).all())
    if finite and logits.shape[1] >= 2 and bool((logits >= 0).all()):
        sums = logits.double().sum(-1)
        if bool(torch.allclose(sums, torch.ones_like(sums), rtol=0.0, atol=1e-4)):
            return Probabilities(output)
    return output


def _entries(out: object) -> str:
    if isinstance(out, Mapping):
        return f" (its keys are {list(out)[:8]})"
    if isinstance(out, (tuple, list)):
        return f" (it has {len(out)} elements)"
    return ""


def describe_output(output: Output) -> str | int | dict | None:
    """``output`` as a file records it: itself, a convention, or a callable's name."""
    if output is None or isinstance(output, (str, int)):
        return output
    if isinstance(output, Probabilities):
        return {"convention": output.kind, "output": describe_output(output.output)}
    module = getattr(output, "__module__", "?")
    return f"callable:{module}.{getattr(output, '__qualname__', type(output).__name__)}"


def convention(record: dict, inner: Output) -> Output:
    """The :class:`Probabilities` or :class:`BinaryLogit` a file's record describes."""
    return _CONVENTIONS[record["convention"]](inner)
