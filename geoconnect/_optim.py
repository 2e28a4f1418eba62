"""The fit's optimisers: Adam and SGD over the path's moving tensors, updated in place.

They compute what ``torch.optim.Adam(fused=True)`` and ``torch.optim.SGD`` compute —
the same kernels, bitwise the same steps — without ``torch.optim.Optimizer``, whose
first use in a process imports ``torch._dynamo``: about 2 s, five epochs of a small
network's fit, before the first step. As in optax, an optimiser is its update and its
state; the state is what a checkpoint or a warm start carries
(:meth:`Adam.moments`).
"""

from __future__ import annotations

import torch
from torch import Tensor

#: Devices with torch's fused Adam kernel; elsewhere the same update in plain ops.
_FUSED_DEVICES = ("cpu", "cuda", "mps", "xpu")


class SGD:
    """Plain gradient descent: ``θ ← θ − lr · g``.

    Examples
    --------
    >>> import torch
    >>> from geoconnect._optim import SGD
    >>> w = torch.ones(3)
    >>> w.grad = torch.full((3,), 2.0)
    >>> SGD([w], lr=0.5).step()
    >>> w.tolist()
    [0.0, 0.0, 0.0]
    """

    def __init__(self, params: list[Tensor], lr: float, scales: list[float] | None = None):
        self.params, self.lr = params, lr
        self.scales = [1.0] * len(params) if scales is None else list(scales)

    @torch.no_grad()
    def step(self) -> None:
        for p, scale in zip(self.params, self.scales):
            p.add_(p.grad, alpha=-self.lr * scale)

    def moments(self, *, copy: bool = True) -> dict[int, dict[str, Tensor]]:
        return {}

    def load_moments(self, state: dict[int, dict[str, Tensor]]) -> None:
        """SGD has no state."""


class Adam:
    """Adam (Kingma & Ba), with torch's defaults ``betas=(0.9, 0.999)``, ``eps=1e-8``.

    The state is created at the first step, as torch's is: per tensor ``exp_avg``,
    ``exp_avg_sq`` and ``step``. ``scales`` multiplies ``lr`` tensor by tensor (a
    step size relative to each tensor's own scale); without it every tensor steps
    by ``lr``, in one fused call.

    Examples
    --------
    >>> import torch
    >>> from geoconnect._optim import Adam
    >>> w = torch.zeros(2)
    >>> w.grad = torch.tensor([1.0, -1.0])
    >>> adam = Adam([w], lr=0.1)
    >>> adam.step()
    >>> [round(x, 6) for x in w.tolist()], sorted(adam.moments()[0])
    ([-0.1, 0.1], ['exp_avg', 'exp_avg_sq', 'step'])
    """

    def __init__(
        self,
        params: list[Tensor],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        scales: list[float] | None = None,
    ):
        self.params, self.lr, self.betas, self.eps = params, lr, betas, eps
        self.scales = None if scales is None else list(scales)
        self.state: dict[int, dict[str, Tensor]] = {}

    def _begin(self) -> None:
        """Create the state of the tensors that have none (at the first step)."""
        for index, p in enumerate(self.params):
            if index not in self.state:
                self.state[index] = {
                    "step": torch.zeros((), dtype=torch.float32, device=p.device),
                    "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
                }

    @torch.no_grad()
    def step(self) -> None:
        if len(self.state) < len(self.params):
            self._begin()
        states = [self.state[i] for i in range(len(self.params))]
        steps = [s["step"] for s in states]
        m, v = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
        grads = [p.grad for p in self.params]
        if self.params and self.params[0].device.type in _FUSED_DEVICES:
            torch._foreach_add_(steps, 1)
            if self.scales is None:
                self._fused(self.params, grads, m, v, steps, self.lr)
                return
            for i, scale in enumerate(self.scales):  # one fused call per step size
                self._fused(
                    [self.params[i]], [grads[i]], [m[i]], [v[i]], [steps[i]], self.lr * scale
                )
            return
        scales = [1.0] * len(self.params) if self.scales is None else self.scales
        for p, g, mean, square, step, scale in zip(self.params, grads, m, v, steps, scales):
            self._plain_step(p, g, mean, square, step, self.lr * scale)

    def _fused(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        m: list[Tensor],
        v: list[Tensor],
        steps: list[Tensor],
        lr: float,
    ) -> None:
        """torch's fused Adam kernel on these tensors, their steps already counted."""
        torch._fused_adam_(
            params,
            grads,
            m,
            v,
            [],
            steps,
            amsgrad=False,
            lr=lr,
            beta1=self.betas[0],
            beta2=self.betas[1],
            weight_decay=0.0,
            eps=self.eps,
            maximize=False,
            grad_scale=None,
            found_inf=None,
        )

    def _plain_step(
        self, p: Tensor, g: Tensor, m: Tensor, v: Tensor, step: Tensor, lr: float
    ) -> None:
        """torch's single-tensor Adam, for devices without the fused kernel."""
        beta1, beta2 = self.betas
        step += 1
        t = float(step)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        size = lr / (1 - beta1**t)
        denominator = (v.sqrt() / (1 - beta2**t) ** 0.5).add_(self.eps)
        p.addcdiv_(m, denominator, value=-size)

    def moments(self, *, copy: bool = True) -> dict[int, dict[str, Tensor]]:
        """The state, copied: ``{tensor index: {"exp_avg", "exp_avg_sq", "step"}}``.

        ``copy=False`` hands over the state's own tensors (no second copy of them)
        to a caller that steps no more.
        """
        if not copy:
            return {i: dict(s) for i, s in self.state.items()}
        return {i: {k: v.detach().clone() for k, v in s.items()} for i, s in self.state.items()}

    def load_moments(self, state: dict[int, dict[str, Tensor]]) -> None:
        """Continue from :meth:`moments` of an Adam over tensors of the same shapes."""
        for index, entry in state.items():
            p = self.params[index]
            self.state[index] = {
                # copied: the steps must not move the moments of the fit they came from
                name: value.to(
                    device=p.device,
                    dtype=torch.float32 if name == "step" else p.dtype,
                    copy=True,
                )
                for name, value in entry.items()
            }
