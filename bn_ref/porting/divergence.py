"""Divergence finder: where does a ported model first stop agreeing with its source?

:func:`find_divergence` runs a PyTorch model and its Flax linen port on the same input, captures
every paired layer's output (PyTorch forward hooks; linen ``capture_intermediates``), and compares
them in the source's execution order with the tolerance of ``docs/spec.md`` §8.4
(:func:`bn_ref.tolerances.error_units`). It does so in three phases:

1. ``eval`` -- both models in inference mode;
2. ``train`` -- one training-mode forward (batch statistics, §2), then one SGD step on the loss
   ``sum(logits * g)`` with the same fixed ``g`` on both sides (the running statistics move once);
   ``after-step`` compares every
   paired layer's updated parameters and running statistics (converted to the Flax layout);
3. ``eval-after-step`` -- inference again with the updated weights and statistics.

The first comparison above 1 unit in each phase names the layer (with the worst element, its
index in the PyTorch layout, and both values). A layer whose conversion is wrong shows up in
``eval``; a BN whose *convention* differs (momentum term, biased vs unbiased running variance,
§3.5) agrees in ``eval`` and ``train`` but not ``after-step``.

Layers are paired as in :func:`bn_ref.porting.convert.pair_layers` (by name, by order with shape
checks, or by ``mapping``). NNX models are supported too: their outputs are captured with
``nnx.capture(..., method_outputs=nnx.Intermediate)`` on clones, so the model is not changed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from ..tolerances import error_units
from . import convert

__all__ = ["LayerComparison", "DivergenceReport", "find_divergence"]

PHASES = ("eval", "train", "after-step", "eval-after-step")


@dataclass
class LayerComparison:
    """One compared array: ``units`` of the §8.4 bound (> 1 diverges); ``index`` is the worst
    element's index (PyTorch layout for layer outputs, Flax layout for the ``after-step``
    parameters and statistics); ``torch_value`` / ``flax_value`` its two values."""

    phase: str
    torch_name: str
    flax_name: str
    kind: str
    what: str
    units: float
    index: tuple[int, ...] = ()
    torch_value: float = 0.0
    flax_value: float = 0.0

    @property
    def diverges(self) -> bool:
        return not self.units <= 1.0

    def __str__(self) -> str:
        s = (f"[{self.phase}] {self.torch_name or '<root>'} -> {self.flax_name} ({self.kind}) {self.what}: "
             f"{self.units:.3g} x tolerance")
        if self.diverges:
            s += f"; worst element {self.index}: torch {self.torch_value:.7g} vs flax {self.flax_value:.7g}"
        return s


@dataclass
class DivergenceReport:
    """Every comparison made, in order; :meth:`first` gives the first divergent one of a phase."""

    dtype: str
    comparisons: list[LayerComparison] = field(default_factory=list)

    def first(self, phase: str | None = None) -> LayerComparison | None:
        for c in self.comparisons:
            if (phase is None or c.phase == phase) and c.diverges:
                return c
        return None

    @property
    def agree(self) -> bool:
        return self.first() is None

    def __str__(self) -> str:
        lines = []
        for phase in PHASES:
            cs = [c for c in self.comparisons if c.phase == phase]
            if not cs:
                continue
            f = self.first(phase)
            worst = max(cs, key=lambda c: c.units if np.isfinite(c.units) else np.inf)
            if f is None:
                lines.append(f"[{phase}] {len(cs)} arrays agree (worst {worst.units:.3g} x tolerance at "
                             f"{worst.torch_name} {worst.what})")
            else:
                lines.append(f"FIRST DIVERGENCE {f}")
        return "\n".join(lines)


def _compare(phase: str, t: convert.Layer, f: convert.Layer, what: str, a_torch: np.ndarray, a_flax: np.ndarray,
             dtype: str, torch_layout: bool) -> LayerComparison:
    """``a_torch`` in the PyTorch layout, ``a_flax`` in Flax's; NCHW outputs are moved to compare."""
    at = np.asarray(a_torch, np.float64)
    af = np.asarray(a_flax, np.float64)
    af_t = np.moveaxis(af, -1, 1) if (torch_layout and af.ndim >= 3) else af
    units = error_units(af_t, at, dtype)
    idx: tuple[int, ...] = ()
    tv = fv = 0.0
    if at.shape == af_t.shape and at.size:
        with np.errstate(invalid="ignore"):
            d = np.abs(af_t - at)
        d = np.where(np.isnan(d), np.inf, d)
        k = int(np.argmax(d))
        idx = tuple(int(i) for i in np.unravel_index(k, at.shape))
        tv, fv = float(at[idx]), float(af_t[idx])
    return LayerComparison(phase, t.name, f.name, t.kind, what, units, idx, tv, fv)


def _torch_forward(model: Any, pairs: Sequence[tuple[convert.Layer, convert.Layer]], x: Any) -> tuple[Any, dict[str, np.ndarray], list[str]]:
    mods = dict(model.named_modules())
    outs: dict[str, np.ndarray] = {}
    order: list[str] = []
    handles = []
    for t, _ in pairs:
        def hook(_m: Any, _i: Any, o: Any, name: str = t.name) -> None:
            if name not in outs:
                order.append(name)
            outs[name] = o.detach().double().cpu().numpy().copy()
        handles.append(mods[t.name].register_forward_hook(hook))
    try:
        y = model(x)
    finally:
        for h in handles:
            h.remove()
    return y, outs, order


def _flax_intermediate(inter: Mapping[str, Any], path: tuple[str, ...]) -> np.ndarray | None:
    node: Any = inter
    for p in path:
        if not isinstance(node, Mapping) or p not in node:
            return None
        node = node[p]
    val = node.get("__call__") if isinstance(node, Mapping) else None
    if val is None:
        return None
    return np.asarray(val[0] if isinstance(val, (tuple, list)) else val, np.float64)


class _Linen:
    """The Flax side as linen module + variables."""

    def __init__(self, model: Any, variables: Mapping[str, Any], eval_kwargs: Mapping[str, Any],
                 train_kwargs: Mapping[str, Any]) -> None:
        self.model, self.variables = model, variables
        self.eval_kwargs, self.train_kwargs = dict(eval_kwargs), dict(train_kwargs)

    def layers(self) -> list[convert.Layer]:
        return convert.flax_layers(self.variables)

    def forward(self, xf: Any, training: bool) -> tuple[Any, Any]:
        kw = self.train_kwargs if training else self.eval_kwargs
        mutable = ["intermediates"] + (["batch_stats"] if training else [])
        y, state = self.model.apply(self.variables, xf, capture_intermediates=True, mutable=mutable, **kw)
        inter = state["intermediates"]
        return y, lambda path: _flax_intermediate(inter, path)

    def step(self, xf: Any, gf: Any, lr: float) -> "_Linen":
        import jax
        import jax.numpy as jnp

        v = self.variables

        def loss(params: Any) -> Any:
            out, upd = self.model.apply({**v, "params": params}, xf, mutable=["batch_stats"], **self.train_kwargs)
            return jnp.sum(out * gf), upd

        grads, upd = jax.grad(loss, has_aux=True)(v["params"])
        params = jax.tree_util.tree_map(lambda p, d: p - lr * d, v["params"], grads)
        new = {**v, "params": params, "batch_stats": upd.get("batch_stats", v.get("batch_stats", {}))}
        return _Linen(self.model, new, self.eval_kwargs, self.train_kwargs)

    def ported(self, torch_model: Any, mapping: Mapping[str, str] | None) -> list[convert.Layer]:
        return convert.flax_layers(convert.torch_to_flax(torch_model, self.variables, mapping))


class _NNX:
    """The Flax side as an NNX module (cloned, never modified)."""

    def __init__(self, model: Any) -> None:
        from flax import nnx

        self.model = nnx.clone(model)

    def layers(self) -> list[convert.Layer]:
        return convert.flax_layers(self.model)

    def forward(self, xf: Any, training: bool) -> tuple[Any, Any]:
        from flax import nnx

        m = nnx.clone(self.model)
        m.train() if training else m.eval()
        y, inter = nnx.capture(m, nnx.Intermediate, method_outputs=nnx.Intermediate)(xf)

        def lookup(path: tuple[str, ...]) -> np.ndarray | None:
            node: Any = inter
            try:
                for p in path:
                    node = node[int(p)] if p.isdigit() and not hasattr(node, "keys") else node[p]
                val = node["__call__"]
            except (KeyError, IndexError, TypeError):
                return None
            val = val.get_value() if hasattr(val, "get_value") else getattr(val, "value", val)
            return np.asarray(val[0] if isinstance(val, (tuple, list)) else val, np.float64)

        return y, lookup

    def step(self, xf: Any, gf: Any, lr: float) -> "_NNX":
        import jax
        import jax.numpy as jnp
        from flax import nnx

        m = nnx.clone(self.model)
        m.train()

        def loss(mod: Any) -> Any:
            return jnp.sum(mod(xf) * gf)

        grads = nnx.grad(loss)(m)
        params = nnx.state(m, nnx.Param)
        nnx.update(m, jax.tree_util.tree_map(lambda p, d: p - lr * d, params, grads))
        m.eval()
        return _NNX(m)

    def ported(self, torch_model: Any, mapping: Mapping[str, str] | None) -> list[convert.Layer]:
        from flax import nnx

        target = nnx.clone(self.model)
        convert.torch_to_flax(torch_model, target, mapping)
        return convert.flax_layers(target)


def find_divergence(
    torch_model: Any,
    flax_model: Any,
    variables: Mapping[str, Any] | None,
    x: np.ndarray,
    *,
    mapping: Mapping[str, str] | None = None,
    eval_kwargs: Mapping[str, Any] | None = None,
    train_kwargs: Mapping[str, Any] | None = None,
    dtype: str = "float32",
    train_step: bool = True,
    lr: float = 0.1,
    seed: int = 0,
) -> DivergenceReport:
    """Compare a PyTorch model and its Flax port layer by layer (see the module docstring).

    Args:
        torch_model: the source ``torch.nn.Module`` (not changed: the training step runs on a copy).
        flax_model: a linen module (with ``variables`` its ``{"params", "batch_stats"}``), or an NNX
            module (``variables=None``; cloned, not changed; outputs captured with ``nnx.capture``).
        x: the input in the PyTorch layout (N, C, ...) as NumPy; the Flax model receives it with
            the channels moved last when ``x.ndim >= 3``.
        mapping: ``{torch name: flax path}`` for :func:`~bn_ref.porting.convert.pair_layers`.
        eval_kwargs, train_kwargs: linen only: extra keyword arguments of ``flax_model.apply``
            selecting eval and training (default ``{"train": False}`` / ``{"train": True}``). NNX
            models switch with ``.eval()`` / ``.train()``.
        dtype: the dtype whose §8.4 tolerance applies (the models' compute dtype).
        train_step: also run the training phases.
        lr: the SGD learning rate of the step.

    Returns:
        A :class:`DivergenceReport`; ``report.first("eval")`` etc. name the first divergent layer.
    """
    import copy

    import jax.numpy as jnp
    import torch

    if convert._is_nnx(flax_model):
        side: Any = _NNX(flax_model)
    else:
        if variables is None:
            raise TypeError("variables are required with a linen module (pass None only with an NNX module)")
        side = _Linen(flax_model, variables, eval_kwargs if eval_kwargs is not None else {"train": False},
                      train_kwargs if train_kwargs is not None else {"train": True})
    pairs = convert.pair_layers(convert.torch_layers(torch_model), side.layers(), mapping)
    by_t = {t.name: (t, f) for t, f in pairs}
    rep = DivergenceReport(dtype)
    x = np.asarray(x)
    xt = torch.from_numpy(np.ascontiguousarray(x))
    xf = jnp.asarray(np.moveaxis(x, 1, -1) if x.ndim >= 3 else x)
    tm = copy.deepcopy(torch_model)

    def outputs(phase: str, flax_side: Any, training: bool) -> Any:
        tm.train(training)
        y_t, outs, order = _torch_forward(tm, pairs, xt)
        _, lookup = flax_side.forward(xf, training)
        for name in order:
            t, f = by_t[name]
            got = lookup(tuple(f.name.split("/")) if f.name else ())
            if got is None:
                rep.comparisons.append(LayerComparison(phase, t.name, f.name, t.kind, "output (not captured)", float("inf")))
                continue
            rep.comparisons.append(_compare(phase, t, f, "output", outs[name], got, dtype, True))
        return y_t

    with torch.no_grad():
        outputs("eval", side, False)
    if not train_step:
        return rep

    # one training step on both sides: loss = sum(logits * g)
    y_t = outputs("train", side, True)
    g = np.random.default_rng(seed).standard_normal(tuple(y_t.shape))
    tm.zero_grad()
    (y_t * torch.from_numpy(g).to(y_t.dtype)).sum().backward()
    with torch.no_grad():
        for p in tm.parameters():
            if p.grad is not None:
                p -= lr * p.grad
    # the training forward above updated tm's running statistics once, as the Flax step does
    gf = jnp.asarray(g if g.ndim < 3 else np.moveaxis(g, 1, -1))
    new_side = side.step(xf, gf, lr)

    # updated parameters and statistics, layer by layer (PyTorch's converted to the Flax layout)
    ported = {ly.name: ly for ly in new_side.ported(tm, mapping)}
    mine = {ly.name: ly for ly in new_side.layers()}
    for t, f in pairs:
        a, b = ported[f.name].arrays, mine[f.name].arrays
        for leaf in sorted(b):
            rep.comparisons.append(_compare("after-step", t, f, leaf, a[leaf], b[leaf], dtype, False))
    with torch.no_grad():
        outputs("eval-after-step", new_side, False)
    return rep
