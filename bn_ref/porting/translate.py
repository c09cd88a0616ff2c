"""Settings translation: the target framework's BN constructor that reproduces a source convention.

``bn_ref.translate(source, target)`` takes a source (a preset name, a :class:`~bn_ref.Convention`
or a framework row such as ``"torch.nn"``) and a target (a preset name or a framework row) and
returns a :class:`Translation`: the exact constructor call in the target's own keyword names,
with the momentum converted to the term the target weights (``Convention.momentum_spelled``,
``docs/spec.md`` §3.5), eps, the feature axis, and a list of what cannot be carried over exactly
(the running-variance estimator, the cumulative average, a fixed feature axis, n = 1 behaviour,
fast variance), each with the spec section and the exact alternative.

Command line::

    python -m bn_ref.porting.translate --from pytorch --to keras [--eps 1e-3] [--momentum 0.05] [--axis -1]

Framework rows (targets and sources): ``torch.nn`` and ``torch.nn.functional`` (preset pytorch), ``flax.linen`` and
``flax.nnx`` (flax), ``keras`` (Keras 3; keras), ``tf.keras`` (Keras 2 / TF 2.x; tf_fused on its
fused path, keras on the non-fused one), ``onnx`` (onnx), ``d2l`` (the book's classic layer; d2l).
A preset as target means its framework row.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Sequence

from ..conventions import DEFAULT, PRESETS, Convention, ConventionLike, resolve

__all__ = ["ROWS", "PRESET_ROW", "Translation", "translate", "framework_convention", "main"]


@dataclass(frozen=True)
class _Row:
    """What a framework's BN layer can express: its native convention, the term its momentum
    weights, whether the feature axis / eps / momentum / cumulative average are settable, and
    which running-variance estimators it can store."""

    name: str
    preset: str
    term: str  # "batch" | "running"
    axis_param: str | None  # keyword for the feature axis, None = fixed at the preset's axis
    estimators: tuple[str, ...]
    cumulative: bool
    single_value: str
    eps_settable: bool = True
    momentum_settable: bool = True


ROWS: dict[str, _Row] = {
    "torch.nn": _Row("torch.nn", "pytorch", "batch", None, ("unbiased",), True, "error"),
    "torch.nn.functional": _Row("torch.nn.functional", "pytorch", "batch", None, ("unbiased",), True, "error"),
    "flax.linen": _Row("flax.linen", "flax", "running", "axis", ("biased",), False, "allow"),
    "flax.nnx": _Row("flax.nnx", "flax", "running", "axis", ("biased",), False, "allow"),
    "keras": _Row("keras", "keras", "running", "axis", ("biased",), False, "allow"),
    "tf.keras": _Row("tf.keras", "tf_fused", "running", "axis", ("unbiased", "biased"), False, "allow"),
    "onnx": _Row("onnx", "onnx", "running", None, ("biased",), False, "allow"),
    "d2l": _Row("d2l", "d2l", "running", None, ("biased",), False, "allow"),
}
"""The framework rows, by name."""

PRESET_ROW = {"pytorch": "torch.nn", "flax": "flax.linen", "keras": "keras", "tf_fused": "tf.keras",
              "onnx": "onnx", "d2l": "d2l"}
"""The framework row each preset reproduces (a preset as a target means this row)."""

_ALIASES = {"torch": "torch.nn", "pytorch": "torch.nn", "f.batch_norm": "torch.nn.functional", "linen": "flax.linen", "nnx": "flax.nnx",
            "keras3": "keras", "tf_keras": "tf.keras", "tensorflow": "tf.keras", "onnxruntime": "onnx"}


def _row_name(name: str) -> str | None:
    key = name.strip().lower()
    if key in ROWS:
        return key
    if key.replace("-", "_") in PRESET_ROW:
        return PRESET_ROW[key.replace("-", "_")]
    return _ALIASES.get(key)


def framework_convention(row: str) -> Convention:
    """The convention a framework row's layer follows with its defaults."""
    r = _row_name(row)
    if r is None:
        raise ValueError(f"unknown framework row {row!r}; known: {', '.join(ROWS)}")
    return PRESETS[ROWS[r].preset]


@dataclass
class Translation:
    """The result of :func:`translate`.

    Attributes:
        source: the source convention (overrides applied).
        target: the target framework row.
        call: the constructor call, as code in the target framework.
        kwargs: the keyword arguments of ``call`` that carry settings (target spelling).
        convention: the convention the translated target layer follows (what bn-ref's oracle
            would compute for it); equal to ``source`` up to the name when ``exact``.
        inexact: what cannot be carried over exactly, each with the reason and the alternative.
        notes: exact but worth knowing (layout, train/eval switch).
        exact_alternative: a bn-ref layer that reproduces ``source`` exactly in the target's framework.
    """

    source: Convention
    target: str
    call: str
    kwargs: dict[str, Any]
    convention: Convention
    inexact: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    exact_alternative: str | None = None

    @property
    def exact(self) -> bool:
        return not self.inexact

    def __str__(self) -> str:
        s = self.source
        head = (f"# from {s.name}: eps={s.eps:g}, momentum={s.momentum} on the {s.momentum_on} term, "
                f"{s.running_var} running variance, feature axis {s.feature_axis}, n = 1: {s.single_value}")
        lines = [head, f"# to {self.target}", self.call]
        lines += ["# exact: every setting carries over (spec §3.5)"] if self.exact else []
        lines += [f"# NOT EXACT: {t}" for t in self.inexact]
        lines += [f"# note: {t}" for t in self.notes]
        if self.exact_alternative and not self.exact:
            lines.append(f"# exact alternative: {self.exact_alternative}")
        return "\n".join(lines)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return repr(float(f"{v:.12g}"))
    return repr(v)


def _spell(conv: Convention, term: str) -> float | None:
    m = conv.momentum_spelled(term)
    return None if m is None else float(f"{m:.12g}")


def _conv_literal(c: Convention) -> str:
    return (f"bn_ref.Convention({c.name!r}, eps={c.eps!r}, momentum={c.momentum!r}, momentum_on={c.momentum_on!r}, "
            f"running_var={c.running_var!r}, feature_axis={c.feature_axis!r}, single_value={c.single_value!r})")


def _preset_or_literal(c: Convention) -> str:
    for name, p in PRESETS.items():
        if dataclasses.replace(c, name=name) == p:
            return repr(name)
    return _conv_literal(c)


def translate(
    source: ConventionLike,
    target: str,
    *,
    eps: float | None = None,
    momentum: Any = DEFAULT,
    axis: int | None = None,
    num_features: int | str = "C",
    rank: int = 4,
) -> Translation:
    """The target framework's BN constructor reproducing ``source`` (``docs/spec.md`` §3.5, §9, §10).

    Args:
        source: a preset name, a :class:`~bn_ref.Convention`, or a framework row (its default convention).
        target: a framework row (``torch.nn``, ``torch.nn.functional``, ``flax.linen``, ``flax.nnx``, ``keras``, ``tf.keras``,
            ``onnx``, ``d2l``) or a preset name (its row).
        eps, momentum, axis: overrides of the source's values (``momentum=None``: cumulative average).
        num_features: the channel count to write into the call (a name or an int).
        rank: the input rank, for the PyTorch class name (BatchNorm1d/2d/3d) and tf.keras's fused path.

    Returns:
        A :class:`Translation`; ``str()`` of it is what ``bn-ref translate`` prints.

    Raises:
        ValueError: unknown source or target.
    """
    if isinstance(source, str) and _row_name(source) is not None and source.strip().lower().replace("-", "_") not in PRESETS:
        source = framework_convention(source)
    src = resolve(source, eps=eps, momentum=momentum, feature_axis=axis)
    tname = _row_name(target) if isinstance(target, str) else None
    if tname is None:
        raise ValueError(f"unknown target {target!r}; known: {', '.join(list(ROWS) + list(PRESETS))}")
    row = ROWS[tname]
    native = PRESETS[row.preset]
    inexact: list[str] = []
    notes: list[str] = []
    C = num_features if isinstance(num_features, int) else str(num_features)
    cstr = str(C)

    # momentum (§3.5)
    m = _spell(src, row.term)
    eff_momentum = src.momentum
    if src.momentum is None and not row.cumulative:
        inexact.append(f"momentum=None (cumulative average, spec §3.3) has no {tname} spelling; the call keeps "
                       f"{tname}'s default momentum {native.momentum} on the {row.term} term")
        m = native.momentum
        eff_momentum = native.momentum
        eff_on = row.term
    else:
        eff_on = row.term if src.momentum is not None else src.momentum_on
        if src.momentum is not None:
            eff_momentum = m
    # estimator (§3.4, §3.5)
    estimator = src.running_var if src.running_var in row.estimators else row.estimators[0]
    if estimator != src.running_var:
        inexact.append(
            f"{tname} stores the {estimator} running variance, the source the {src.running_var} one (spec §3.4): every "
            f"training step feeds {'(n-1)/n' if estimator == 'biased' else 'n/(n-1)'} times the source's batch variance, "
            "so after further training the running variance and the eval outputs differ (most for small n: dense "
            "layers, small batches); ported statistics convert only approximately (spec §3.5)")
    # feature axis (§6)
    eff_axis = src.feature_axis
    if row.axis_param is None and src.feature_axis % rank != native.feature_axis % rank:
        notes.append(f"{tname} keeps the features on axis {native.feature_axis}; the source has them on axis "
                     f"{src.feature_axis}: transpose the input (e.g. x.movedim({src.feature_axis}, 1)) -- a layout change, "
                     "not a numerical one (spec §6, §10)")
        eff_axis = native.feature_axis
    if row.axis_param is not None and src.feature_axis % rank != native.feature_axis % rank:
        notes.append(f"{row.axis_param}={src.feature_axis} keeps the source's layout; {tname} models usually feed "
                     f"channels-last data, and then need {row.axis_param}={native.feature_axis} (a layout choice, not a "
                     "numerical one; spec §6)")
    # n = 1 (§7.1)
    if src.single_value != row.single_value:
        if row.single_value == "error":
            inexact.append(f"{tname} raises ValueError when training on one value per channel (n = 1); the source "
                           "trains and outputs beta (spec §7.1)")
        else:
            inexact.append(f"{tname} trains on one value per channel (n = 1) and outputs beta; the source raises "
                           "(spec §7.1)")
    eff = Convention(f"{tname}<-{src.name}", src.eps, eff_momentum, eff_on, estimator, eff_axis, row.single_value)

    kwargs: dict[str, Any] = {}
    exact_alt: str | None = None
    ax = eff_axis
    if tname == "torch.nn":
        cls = {2: "BatchNorm1d", 3: "BatchNorm1d", 4: "BatchNorm2d", 5: "BatchNorm3d"}.get(rank, "BatchNorm2d")
        kwargs = {"eps": src.eps, "momentum": m}
        call = f"torch.nn.{cls}({cstr}, eps={_fmt(src.eps)}, momentum={_fmt(m)})"
        notes.append("train/eval with model.train()/model.eval()")
        exact_alt = f"bn_ref.torch.{cls}({cstr}, convention={_preset_or_literal(src)})"
    elif tname == "torch.nn.functional":
        kwargs = {"eps": src.eps, "momentum": m}
        if m is None:
            mom = "1.0 / (count + 1)"
            notes.append("F.batch_norm has no step counter: pass momentum=1/(count+1) with count the training steps "
                         "already taken (the cumulative average, spec §3.3)")
        else:
            mom = _fmt(m)
        call = (f"torch.nn.functional.batch_norm(x, running_mean, running_var, weight, bias, training=train, "
                f"momentum={mom}, eps={_fmt(src.eps)})")
        notes.append("running_mean/running_var are updated in place in training")
        exact_alt = (f"bn_ref.torch.batch_norm(x, running_mean, running_var, weight, bias, training=train, "
                     f"convention={_preset_or_literal(src)})")
    elif tname in ("flax.linen", "flax.nnx"):
        kwargs = {"axis": ax, "momentum": m, "epsilon": src.eps, "use_fast_variance": False}
        args = f"axis={ax}, momentum={_fmt(m)}, epsilon={_fmt(src.eps)}, use_fast_variance=False"
        if tname == "flax.linen":
            call = f"flax.linen.BatchNorm(use_running_average=not train, {args})"
            notes.append("apply(..., mutable=['batch_stats']) in training to receive the updated statistics")
            exact_alt = f"bn_ref.flax.BatchNorm(use_running_average=not train, convention={_preset_or_literal(src)})"
        else:
            call = f"flax.nnx.BatchNorm({cstr}, {args}, rngs=nnx.Rngs(0))"
            notes.append("nnx layers start in training mode; call model.eval() for inference")
            exact_alt = f"bn_ref.flax.nnx.BatchNorm({cstr}, convention={_preset_or_literal(src)})"
        notes.append("use_fast_variance=False: Flax's default one-pass variance cancels for large-mean inputs (spec §8.2)")
    elif tname == "keras":
        kwargs = {"axis": ax, "momentum": m, "epsilon": src.eps}
        call = f"keras.layers.BatchNormalization(axis={ax}, momentum={_fmt(m)}, epsilon={_fmt(src.eps)})"
        notes.append("call with training=True to train; Keras 3 on the torch and numpy backends computes the "
                     "one-pass variance (spec §8.2); the jax and tensorflow backends are two-pass")
    elif tname == "tf.keras":
        fused = estimator == "unbiased"
        kwargs = {"axis": ax, "momentum": m, "epsilon": src.eps, "fused": fused}
        call = (f"tf.keras.layers.BatchNormalization(axis={ax}, momentum={_fmt(m)}, epsilon={_fmt(src.eps)}, "
                f"fused={fused})")
        if fused:
            notes.append("fused=True (unbiased running variance) needs 4-D or 5-D inputs and axis 1 or -1; "
                         "2-D inputs take the non-fused path, which stores the biased variance")
            if rank not in (4, 5):
                inexact.append("tf.keras's fused path (the unbiased estimator) accepts only 4-D/5-D inputs; "
                               f"at rank {rank} the layer stores the biased running variance")
                eff = dataclasses.replace(eff, running_var="biased")
    elif tname == "onnx":
        kwargs = {"epsilon": src.eps, "momentum": m}
        call = (f"onnx.helper.make_node('BatchNormalization', ['X', 'scale', 'B', 'input_mean', 'input_var'], "
                f"['Y', 'running_mean', 'running_var'], epsilon={_fmt(src.eps)}, momentum={_fmt(m)}, training_mode=1)")
        notes.append("training_mode=1 returns the updated running statistics; training_mode=0 (inference) takes only "
                     "'Y' as output")
    else:  # d2l
        kwargs = {"eps": src.eps, "momentum": m}
        nd = 2 if rank == 2 else 4
        if src.eps == native.eps and m == native.momentum:
            call = f"BatchNorm({cstr}, num_dims={nd})"
        else:
            call = (f"batch_norm(X, self.gamma, self.beta, self.moving_mean, self.moving_var, eps={_fmt(src.eps)}, "
                    f"momentum={_fmt(m)})  # in your BatchNorm.forward: the book's class hard-codes eps=1e-5, "
                    "momentum=0.9")
        exact_alt = f"bn_ref.torch.BatchNorm{'1d' if nd == 2 else '2d'}({cstr}, convention={_preset_or_literal(src)})"
        notes.append("the book's layer trains under torch.is_grad_enabled() (use torch.no_grad() for eval) and "
                     "accepts only 2-D and 4-D inputs")
    return Translation(src, tname, call, kwargs, eff, inexact, notes, exact_alt)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bn_ref.porting.translate --from SRC --to TGT [--eps E] [--momentum M|none] [--axis A]``."""
    p = argparse.ArgumentParser(prog="bn-ref translate",
                                description="Print the target framework's BN constructor that reproduces a source "
                                            "convention, and what cannot be carried over exactly (spec §3.5).")
    p.add_argument("--from", dest="source", required=True,
                   help=f"preset ({', '.join(PRESETS)}) or framework row ({', '.join(ROWS)})")
    p.add_argument("--to", dest="target", required=True, help="framework row or preset")
    p.add_argument("--eps", type=float, help="the source's eps, if not its default")
    p.add_argument("--momentum", help="the source's momentum as the source spells it; 'none' = cumulative average")
    p.add_argument("--axis", type=int, help="the source's feature axis")
    p.add_argument("--rank", type=int, default=4, help="input rank (default 4)")
    p.add_argument("--num-features", default="C", help="channel count to write into the call")
    args = p.parse_args(argv)
    mom: Any = DEFAULT
    if args.momentum is not None:
        mom = None if args.momentum.lower() == "none" else float(args.momentum)
    nf: int | str = int(args.num_features) if str(args.num_features).isdigit() else args.num_features
    try:
        t = translate(args.source, args.target, eps=args.eps, momentum=mom, axis=args.axis, num_features=nf,
                      rank=args.rank)
    except (ValueError, TypeError) as exc:
        p.error(str(exc))
    print(t)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
