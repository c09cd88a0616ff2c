"""Conventions: every choice on which real Batch Normalization implementations disagree.

A :class:`Convention` is a frozen record of seven fields. The oracle and every backend take one
(or a preset name) and read every numerical policy from it; no backend keeps its own copy of eps,
momentum or the running-variance estimator. The meaning of each field is defined in
``docs/spec.md``; the section is cited next to each rule below.

Presets reproduce the defaults of real frameworks (see ``docs/spec.md`` §9)::

    >>> import bn_ref
    >>> bn_ref.get_convention("pytorch").momentum
    0.1
    >>> import dataclasses
    >>> dataclasses.replace(bn_ref.PRESETS["pytorch"], name="pytorch-cma", momentum=None).momentum is None
    True
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any, Final, Literal, Mapping, Union

__all__ = [
    "Convention",
    "PRESETS",
    "PRESET_DOCS",
    "DEFAULT",
    "get_convention",
    "resolve",
]

MomentumOn = Literal["batch", "running"]
RunningVar = Literal["unbiased", "biased"]
SingleValue = Literal["error", "allow"]

_MOMENTUM_ON = ("batch", "running")
_RUNNING_VAR = ("unbiased", "biased")
_SINGLE_VALUE = ("error", "allow")


def _is_real_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclass(frozen=True)
class Convention:
    """The numerical policy of one Batch Normalization implementation.

    Fields (``docs/spec.md`` §1 and §3):

    * ``name`` -- a label, used in reports and error messages.
    * ``eps`` -- added to the variance inside the square root, in training and in eval (§2, §4).
    * ``momentum`` -- the framework's own momentum number, as its users write it; ``None``
      means the cumulative (simple) average of all batch statistics so far (§3.3).
    * ``momentum_on`` -- which term ``momentum`` multiplies in the running update (§3.1, §3.2):
      ``"batch"``:   ``r <- (1 - m) * r + m * b``   (PyTorch);
      ``"running"``: ``r <- m * r + (1 - m) * b``   (Flax, Keras, ONNX, the book's classic layer).
    * ``running_var`` -- the estimator fed into the running variance (§3.4): ``"unbiased"``
      multiplies the biased batch variance by ``n / (n - 1)``; ``"biased"`` stores it as is.
      Normalization itself always uses the biased batch variance (§2.1).
    * ``feature_axis`` -- the axis that holds the features/channels: 1 for (N, C, ...), -1 for
      (N, ..., C) (§6).
    * ``single_value`` -- what training with exactly one value per channel (n = 1) does (§7.1):
      ``"error"`` raises ``ValueError``; ``"allow"`` computes var = 0, so the output equals beta.

    Derive variants with :func:`dataclasses.replace`; every field is validated on construction.
    """

    name: str
    eps: float
    momentum: float | None
    momentum_on: MomentumOn
    running_var: RunningVar
    feature_axis: int
    single_value: SingleValue

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise TypeError(f"Convention.name must be a str; got {type(self.name).__name__}")
        if not _is_real_number(self.eps):
            raise TypeError(f"Convention.eps must be a real number; got {self.eps!r}")
        if not (math.isfinite(self.eps) and self.eps > 0):
            raise ValueError(f"Convention.eps must be finite and > 0; got {self.eps!r}")
        if self.momentum is not None:
            if not _is_real_number(self.momentum):
                raise TypeError(
                    f"Convention.momentum must be a real number in [0, 1] or None; got {self.momentum!r}"
                )
            if not 0.0 <= self.momentum <= 1.0:
                raise ValueError(f"Convention.momentum must lie in [0, 1] or be None; got {self.momentum!r}")
        if self.momentum_on not in _MOMENTUM_ON:
            raise ValueError(f"Convention.momentum_on must be one of {_MOMENTUM_ON}; got {self.momentum_on!r}")
        if self.running_var not in _RUNNING_VAR:
            raise ValueError(f"Convention.running_var must be one of {_RUNNING_VAR}; got {self.running_var!r}")
        if not isinstance(self.feature_axis, numbers.Integral) or isinstance(self.feature_axis, bool):
            raise TypeError(f"Convention.feature_axis must be an int; got {self.feature_axis!r}")
        if self.single_value not in _SINGLE_VALUE:
            raise ValueError(f"Convention.single_value must be one of {_SINGLE_VALUE}; got {self.single_value!r}")

    # -- the rules every backend shares -------------------------------------------------------

    def update_weights(self, count: "int | Any") -> "tuple[Any, Any]":
        """Weights ``(w_running, w_batch)`` of the running update at training step ``count + 1``.

        The new running statistic is ``w_running * r + w_batch * b`` (``docs/spec.md`` §3):

        * ``momentum_on="batch"``:   ``(1 - m, m)``                      (§3.1)
        * ``momentum_on="running"``: ``(m, 1 - m)``                      (§3.2)
        * ``momentum=None``:         ``(1 - 1/k, 1/k)`` with ``k = count + 1``  (§3.3)

        ``count`` is the number of training steps already taken (PyTorch's ``num_batches_tracked``
        before it is incremented): a Python int, or an integer array (torch tensor, JAX value), in
        which case the weights are arrays too. The momentum cases return Python floats.
        """
        if self.momentum is None:
            if isinstance(count, numbers.Number):
                if not isinstance(count, numbers.Integral) or isinstance(count, bool) or count < 0:
                    raise ValueError(f"count must be an int >= 0 (training steps already taken); got {count!r}")
                k = int(count) + 1
                return 1.0 - 1.0 / k, 1.0 / k
            if not hasattr(count, "dtype"):
                raise ValueError(f"count must be an int >= 0 or an integer array (training steps already taken); got {count!r}")
            # An array count (a torch tensor, a traced JAX value): the same rule in array arithmetic.
            w_b = 1.0 / (count + 1)
            return 1.0 - w_b, w_b
        m = float(self.momentum)
        if self.momentum_on == "batch":
            return 1.0 - m, m
        return m, 1.0 - m

    def variance_correction(self, n: "int | Any") -> Any:
        """Factor applied to the biased batch variance before it enters the running variance (§3.4).

        ``n / (n - 1)`` for ``running_var="unbiased"`` and ``n > 1``; 1 otherwise. With n = 1 the
        unbiased estimator is undefined; conventions that allow n = 1 use the factor 1 (as
        TensorFlow's fused kernel does), see §7.1.
        """
        if self.running_var != "unbiased":
            return 1.0
        if isinstance(n, numbers.Real):
            k = float(n)
            return k / (k - 1.0) if k > 1 else 1.0
        # An array n (a global count under cross-device statistics): n / max(n - 1, 1).
        arr: Any = n
        return arr / (arr - 1).clip(1)

    def momentum_spelled(self, term: MomentumOn) -> float | None:
        """This convention's momentum as written by a framework that weights ``term`` (§3.5).

        The same running update is ``r <- (1 - m) r + m b`` with ``m`` on the batch term and
        ``r <- m' r + (1 - m') b`` with ``m'`` on the running term, so ``m' = 1 - m``::

            >>> get_convention("pytorch").momentum_spelled("running")
            0.9
            >>> get_convention("flax").momentum_spelled("running")
            0.99

        ``momentum=None`` (the cumulative average, §3.3) has no fixed spelling and returns None;
        callers whose target cannot express it say so.
        """
        if term not in _MOMENTUM_ON:
            raise ValueError(f"term must be one of {_MOMENTUM_ON}; got {term!r}")
        if self.momentum is None:
            return None
        m = float(self.momentum)
        return m if term == self.momentum_on else 1.0 - m

    def rejects_batch(self, n: int, *, training: bool) -> bool:
        """Whether a step with ``n`` values per channel is an error under this convention (§7).

        Only training reduces over the batch: there, n = 0 is always an error (§7.3) and n = 1
        is one exactly when ``single_value="error"`` (§7.1). Eval never rejects a batch.
        """
        if not training:
            return False
        return n == 0 or (n == 1 and self.single_value == "error")

    @property
    def description(self) -> str:
        """One line saying which framework and version this convention reproduces (presets only)."""
        return PRESET_DOCS.get(self.name, f"custom convention {self.name!r}")


class _Default:
    """Sentinel: "use the convention's value". Lets callers still pass ``momentum=None``."""

    _instance: "_Default | None" = None

    def __new__(cls) -> "_Default":
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "DEFAULT"

    def __reduce__(self) -> str:
        return "DEFAULT"


DEFAULT: Final = _Default()
"""Sentinel for backend arguments that default to the convention's own value."""


PYTORCH = Convention("pytorch", 1e-5, 0.1, "batch", "unbiased", 1, "error")
"""PyTorch 1.x-2.x ``torch.nn.BatchNorm1d/2d/3d`` and ``F.batch_norm`` defaults (checked on torch 2.13)."""

FLAX = Convention("flax", 1e-5, 0.99, "running", "biased", -1, "allow")
"""Flax 0.12 ``flax.linen.BatchNorm`` / ``flax.nnx.BatchNorm`` defaults (statistics as with use_fast_variance=False)."""

KERAS = Convention("keras", 1e-3, 0.99, "running", "biased", -1, "allow")
"""Keras 3 ``keras.layers.BatchNormalization`` defaults (all backends)."""

TF_FUSED = Convention("tf_fused", 1e-3, 0.99, "running", "unbiased", -1, "allow")
"""tf.keras (Keras 2, TF 2.x) ``BatchNormalization`` on its fused path (4-D/5-D inputs), which stores the unbiased variance."""

ONNX = Convention("onnx", 1e-5, 0.9, "running", "biased", 1, "allow")
"""ONNX ``BatchNormalization`` opset 15 (14 too) attribute defaults, training_mode=1 for the running outputs."""

D2L = Convention("d2l", 1e-5, 0.9, "running", "biased", 1, "allow")
"""The d2l book's classic (0.17) from-scratch PyTorch layer: eps 1e-5, momentum 0.9 on the running term."""

PRESET_DOCS: Mapping[str, str] = MappingProxyType(
    {
        "pytorch": "PyTorch 1.x-2.x torch.nn.BatchNorm*d / F.batch_norm defaults (checked on torch 2.13).",
        "flax": "Flax 0.12 flax.linen.BatchNorm / flax.nnx.BatchNorm defaults, two-pass variance.",
        "keras": "Keras 3 keras.layers.BatchNormalization defaults (all backends).",
        "tf_fused": "tf.keras (Keras 2, TF 2.x) BatchNormalization on its fused path, unbiased running variance.",
        "onnx": "ONNX BatchNormalization opset 15 defaults (training_mode=1 for running outputs).",
        "d2l": "The d2l book's classic from-scratch PyTorch layer (0.17 edition): momentum 0.9 on the running term.",
    }
)

PRESETS: Mapping[str, Convention] = MappingProxyType(
    {c.name: c for c in (PYTORCH, FLAX, KERAS, TF_FUSED, ONNX, D2L)}
)
"""The presets by name, in a stable order."""

ConventionLike = Union[str, Convention]


def get_convention(convention: ConventionLike) -> Convention:
    """Return the :class:`Convention` for a preset name, or ``convention`` itself if it is one.

    Raises:
        ValueError: unknown name (the message lists the valid names).
        TypeError: neither a ``str`` nor a ``Convention``.
    """
    if isinstance(convention, Convention):
        return convention
    if isinstance(convention, str):
        key = convention.strip().lower().replace("-", "_")
        try:
            return PRESETS[key]
        except KeyError:
            raise ValueError(
                f"unknown convention {convention!r}; valid names are: {', '.join(PRESETS)}"
            ) from None
    raise TypeError(
        f"convention must be a preset name (one of {', '.join(PRESETS)}) or a bn_ref.Convention; "
        f"got {type(convention).__name__}"
    )


def resolve(
    convention: ConventionLike,
    *,
    eps: float | None = None,
    momentum: "float | None | _Default" = DEFAULT,
    feature_axis: int | None = None,
) -> Convention:
    """The convention with per-layer overrides applied (validated like any Convention).

    ``eps=None`` and ``feature_axis=None`` keep the convention's value; ``momentum=DEFAULT`` keeps
    it, while ``momentum=None`` selects the cumulative average (§3.3).
    """
    conv = get_convention(convention)
    if eps is None and momentum is DEFAULT and feature_axis is None:
        return conv
    return replace(
        conv,
        eps=conv.eps if eps is None else eps,
        momentum=conv.momentum if isinstance(momentum, _Default) else momentum,
        feature_axis=conv.feature_axis if feature_axis is None else feature_axis,
    )


# -- Presets of the framework families (issue 14) ------------------------------------------------
# Each is checked by a row of the matrix in its own environment (bn_ref/conformance/families.py) and
# by a "(defaults)" row built from the framework's defaults. They are kept apart from PRESETS so that
# the preset catalogue (golden vectors, per-preset tests) is unchanged until they are folded in.

HAIKU = Convention("haiku", 1e-5, 0.999, "running", "biased", -1, "allow")
"""dm-haiku 0.0.17 ``hk.BatchNorm``: eps 1e-5, channels last, biased variance; ``decay_rate`` has no
default, 0.999 is what Haiku's own nets (``hk.nets.ResNet``, ``MobileNetV1``) pass. Its default
zero-debiased moving average is not this preset (a ledger deviation, docs/findings.md)."""

EQUINOX = Convention("equinox", 1e-5, 0.99, "running", "biased", 1, "allow")
"""Equinox 0.13 ``eqx.nn.BatchNorm``: eps 1e-5, momentum 0.99 on the running term, features on axis 1
(axis 0 of each vmapped sample), two-pass biased variance. Neither ``mode`` reproduces it exactly:
``"ema"`` (the default) normalizes training batches with blended statistics, ``"batch"`` zero-debiases
a hidden variance that starts at 1 (ledger deviations, docs/findings.md)."""

STAX = Convention("stax", 1e-5, 0.99, "running", "biased", -1, "allow")
"""``jax.example_libraries.stax.BatchNorm``: eps 1e-5, features last (it reduces over axes 0, 1, 2);
it keeps no running statistics, so only the training forward and backward are checked (momentum
here is a placeholder the row never uses)."""

MLX = Convention("mlx", 1e-5, 0.1, "batch", "unbiased", -1, "error")
"""MLX 0.32 ``mlx.nn.BatchNorm``: PyTorch's numbers (eps 1e-5, momentum 0.1 on the batch term, unbiased
running variance since 0.32.1, n = 1 raises in training) with the features last (ranks 2-4 only)."""

PADDLE = Convention("paddle", 1e-5, 0.9, "running", "biased", 1, "allow")
"""PaddlePaddle 3.x ``paddle.nn.BatchNorm1D/2D/3D``: eps 1e-5, momentum 0.9 on the running term,
biased running variance, features on axis 1 (NCHW and kin)."""

MINDSPORE = Convention("mindspore", 1e-5, 0.9, "running", "unbiased", 1, "allow")
"""MindSpore 2.10 ``mindspore.nn.BatchNorm1d/2d/3d`` on CPU: eps 1e-5, momentum 0.9 on the running term
(passed to the kernel as 1 - momentum), features on axis 1, and -- unlike Paddle -- the unbiased
variance in the running statistics (as executed; float16/float32 only)."""

FAMILY_PRESETS: Mapping[str, Convention] = MappingProxyType(
    {c.name: c for c in (HAIKU, EQUINOX, STAX, MLX, PADDLE, MINDSPORE)})
"""Presets of the framework-family rows, by name (not yet in :data:`PRESETS`)."""

PRESET_DOCS = MappingProxyType({  # noqa: F811 - extended, the presets above keep their order
    **PRESET_DOCS,
    "haiku": "dm-haiku hk.BatchNorm: eps 1e-5, decay 0.999 on the running term (Haiku's nets), biased, no zero-debias.",
    "equinox": "Equinox eqx.nn.BatchNorm: eps 1e-5, momentum 0.99 on the running term, features on axis 1, biased.",
    "paddle": "PaddlePaddle paddle.nn.BatchNorm1D/2D/3D: eps 1e-5, momentum 0.9 on the running term, biased, NCHW.",
    "mindspore": "MindSpore mindspore.nn.BatchNorm1d/2d/3d: eps 1e-5, momentum 0.9 on the running term, unbiased, NCHW.",
    "mlx": "MLX mlx.nn.BatchNorm: PyTorch's eps, momentum and unbiased running variance, features last, n = 1 raises.",
    "stax": "jax.example_libraries.stax.BatchNorm: eps 1e-5, features last, batch statistics only (no running ones).",
})
__all__ = [*__all__, "FAMILY_PRESETS"]
