"""Stateful ``nn.Module`` shells around :func:`bn_ref.torch.functional.batch_norm`.

The modules hold parameters and buffers, pick train or eval from ``self.training`` (never from
the grad mode), count training steps in ``num_batches_tracked`` and delegate every number to the
functional core. Parameters and buffers are registered under the names and shapes that
``torch.nn.BatchNorm1d/2d/3d`` use, so a ``state_dict`` loads strictly in either direction.

State of a module with ``track_running_stats=True`` (``docs/spec.md`` §3), per training call::

    count = num_batches_tracked                      (steps already taken)
    running_mean <- w_r * running_mean + w_b * batch_mean
    running_var  <- w_r * running_var  + w_b * batch_var * variance_correction(n)
    num_batches_tracked <- count + 1

with ``(w_r, w_b) = convention.update_weights(count)``: ``(1 - m, m)`` for ``momentum_on="batch"``
(§3.1), ``(m, 1 - m)`` for ``"running"`` (§3.2), ``(1 - 1/(count+1), 1/(count+1))`` for
``momentum=None`` (§3.3, the cumulative average; the same factor ``1 / num_batches_tracked``
after the increment that PyTorch uses).
"""

from __future__ import annotations

from typing import Any, Final

import torch
from torch import nn

from .. import _checks
from ..conventions import DEFAULT, Convention, ConventionLike, resolve
from ..variants import Variant
from .functional import batch_norm, check_implementation
from .variants import RenormState, batch_norm_variant

__all__ = ["BatchNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]


class _ConventionDefault(float):
    """A constructor default that reads as PyTorch's value but means "the convention's own".

    ``inspect.signature(bn_ref.torch.BatchNorm2d)`` shows ``eps=1e-05, momentum=0.1`` exactly as
    ``torch.nn.BatchNorm2d``'s, and under ``convention="pytorch"`` those are the values used. Under
    another convention an argument left at its default takes that convention's value (``"keras"``:
    eps 1e-3, momentum 0.99 on the running term), while any value passed explicitly -- ``1e-05``
    included -- overrides it. The two defaults below are told from user values by identity.
    """

    __slots__ = ()

    def __repr__(self) -> str:
        return float.__repr__(self)


TORCH_EPS: Final = _ConventionDefault(1e-5)
"""Default ``eps`` of the layers: torch.nn's 1e-05, standing for ``convention.eps`` (§2.2)."""

TORCH_MOMENTUM: Final = _ConventionDefault(0.1)
"""Default ``momentum`` of the layers: torch.nn's 0.1, standing for ``convention.momentum`` (§3)."""


def layer_convention(
    convention: ConventionLike, eps: Any, momentum: Any, feature_axis: int | None
) -> Convention:
    """The convention a layer runs under: ``convention`` with the explicitly passed overrides (§3.5, §9).

    ``eps`` and ``momentum`` left at :data:`TORCH_EPS` / :data:`TORCH_MOMENTUM` (or given as
    ``None`` / :data:`bn_ref.DEFAULT` respectively) keep the convention's values;
    ``momentum=None`` is the cumulative average (§3.3).
    """
    return resolve(
        convention,
        eps=None if (eps is None or eps is TORCH_EPS) else eps,
        momentum=DEFAULT if momentum is TORCH_MOMENTUM else momentum,
        feature_axis=feature_axis,
    )


class BatchNorm(nn.Module):
    """Batch Normalization over any input of rank >= 2, under a :class:`bn_ref.Convention`.

    Training (``module.train()``) normalizes with the batch statistics and updates the running
    ones; eval (``module.eval()``) normalizes with the running statistics (§4) -- whatever the
    grad mode. ``track_running_stats=False`` has no running statistics and uses batch statistics
    in eval too, as ``torch.nn.BatchNorm*d`` does.

    The constructor takes ``torch.nn.BatchNorm*d``'s arguments in torch 2.13's order and with its
    defaults (``BatchNorm1d(10, 1e-3, None)`` works as there), then bn-ref's own options,
    keyword-only.

    Args:
        num_features: C, the size of the feature axis.
        eps: added to the variance (§2.2). Left at its default (shown as torch's 1e-05) it is
            ``convention.eps``; any value passed overrides the convention's. ``None`` also keeps it.
        momentum: the running-update momentum (§3); ``None`` is the cumulative average (§3.3).
            Left at its default (shown as torch's 0.1) it is ``convention.momentum``; a value
            passed is read as the convention reads it (``momentum_on``), so ``momentum=0.9``
            under ``"flax"`` weights the running term. :data:`bn_ref.DEFAULT` also keeps it.
        affine: learnable ``weight`` (ones) and ``bias`` (zeros), shaped (C,).
        track_running_stats: keep ``running_mean`` (zeros), ``running_var`` (ones) and
            ``num_batches_tracked`` (int64 scalar 0) as buffers.
        device, dtype: where and in which dtype parameters and running statistics live. Inputs
            may have another floating dtype (bfloat16 input with float32 parameters, say).
        bias: with ``affine=True``, whether there is a learnable ``bias`` (torch 2.13's keyword:
            ``bias=False`` keeps ``weight`` and registers ``bias`` as None). Ignored without
            ``affine``, as in torch.
        convention: preset name or :class:`bn_ref.Convention` (default ``"pytorch"``).
        feature_axis: overrides ``convention.feature_axis`` (1 for (N, C, ...), -1 for (N, ..., C)).
        implementation: ``"function"`` (closed-form backward, §5) or ``"autograd"``.
        variant: a :class:`bn_ref.variants.Variant` (``docs/spec.md`` §13-§17) or None (plain BN,
            every behaviour above unchanged). With a variant every call goes through
            :func:`bn_ref.torch.variants.batch_norm_variant`: Batch Renormalization (§13), ghost
            batches (§14), frozen BN (§15, ``"statistics"``: running statistics in training too,
            never updated; ``"all"``: also no gradient to ``weight``/``bias``), no running
            statistics (§16.1). ``variant.track_running_stats`` must equal ``track_running_stats``
            (a ValueError names both otherwise). When renorm's correction pair differs from the
            running pair (``renorm_momentum`` set, or ``renorm_track="stddev"``, §13.3) it is held
            in two more buffers, ``renorm_mean`` and ``renorm_stat`` (a variance or a stddev, (C,)),
            started from the running pair's initial values; a ``state_dict`` without them (a plain
            checkpoint) loads and starts them from the loaded running pair. Otherwise the
            ``state_dict`` keys are exactly the plain layer's. A ghost step advances
            ``num_batches_tracked`` by its number of sub-batches (§14.2); a frozen step leaves it.

    Shapes:
        input (N, C, ...) or (N, ..., C) per the feature axis; output the same shape and dtype.

    State recursion per training call (§3), ``count = num_batches_tracked`` before the call::

        (w_r, w_b) = convention.update_weights(count)       # (1-m, m) | (m, 1-m) | (1-1/k, 1/k), k = count+1
        running_mean <- w_r * running_mean + w_b * batch_mean
        running_var  <- w_r * running_var + w_b * batch_var * convention.variance_correction(n)   # §3.4
        num_batches_tracked <- count + 1

    Attributes:
        convention: the resolved :class:`bn_ref.Convention`, overrides applied. ``eps``,
            ``momentum`` and ``feature_axis`` read it; assigning them replaces it.
    """

    _version = 2  # as torch.nn.BatchNorm*d: version 2 added num_batches_tracked
    _expected_ranks: tuple[int, ...] | None = None  # None: any rank >= 2

    num_features: int
    affine: bool
    track_running_stats: bool
    convention: Convention
    implementation: str

    def __init__(
        self,
        num_features: int,
        eps: float = TORCH_EPS,
        momentum: float | None = TORCH_MOMENTUM,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
        convention: ConventionLike = "pytorch",
        feature_axis: int | None = None,
        implementation: str = "function",
        variant: Variant | None = None,
    ) -> None:
        super().__init__()
        if dtype is not None and not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating dtype; got {dtype}")
        self.num_features = _checks.check_num_features(num_features)
        self.convention = layer_convention(convention, eps, momentum, feature_axis)
        self.affine = _checks.check_flag("affine", affine)
        use_bias = _checks.check_flag("bias", bias)
        self.track_running_stats = _checks.check_flag("track_running_stats", track_running_stats)
        self.implementation = check_implementation(implementation)
        self._variant = check_layer_variant(variant, self.track_running_stats)
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        if self.affine:
            self.weight = nn.Parameter(torch.empty(self.num_features, **factory))
            if use_bias:
                self.bias = nn.Parameter(torch.empty(self.num_features, **factory))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if self.track_running_stats:
            self.register_buffer("running_mean", torch.zeros(self.num_features, **factory))
            self.register_buffer("running_var", torch.ones(self.num_features, **factory))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        if self._variant is not None and separate_renorm_pair(self._variant):  # §13.3
            self.register_buffer("renorm_mean", torch.zeros(self.num_features, **factory))
            self.register_buffer("renorm_stat", torch.ones(self.num_features, **factory))
        self.reset_parameters()

    # -- convention-backed hyper-parameters ------------------------------------------------------

    @property
    def eps(self) -> float:
        """``convention.eps`` (§2.2, §4)."""
        return self.convention.eps

    @eps.setter
    def eps(self, value: float) -> None:
        self.convention = resolve(self.convention, eps=value)

    @property
    def momentum(self) -> float | None:
        """``convention.momentum``; None is the cumulative average (§3.3)."""
        return self.convention.momentum

    @momentum.setter
    def momentum(self, value: float | None) -> None:
        self.convention = resolve(self.convention, momentum=value)

    @property
    def feature_axis(self) -> int:
        """``convention.feature_axis`` (§6)."""
        return self.convention.feature_axis

    @feature_axis.setter
    def feature_axis(self, value: int) -> None:
        self.convention = resolve(self.convention, feature_axis=value)

    @property
    def variant(self) -> Variant | None:
        """The :class:`bn_ref.variants.Variant` the layer runs (§13-§17); None for plain BN.
        Fixed at construction (it decides which buffers exist)."""
        return self._variant

    # -- state ---------------------------------------------------------------------------------------

    def _has_renorm_pair(self) -> bool:
        return self._variant is not None and separate_renorm_pair(self._variant)

    def reset_running_stats(self) -> None:
        """running_mean = 0, running_var = 1, num_batches_tracked = 0 (when tracked); renorm's own
        correction pair (when held) back to the running pair's initial values (§13.3)."""
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1.0)
            self.num_batches_tracked.zero_()
        if self._has_renorm_pair():
            assert self._variant is not None  # a renorm pair exists only with a variant
            init = RenormState.from_running(self.running_mean, self.running_var, self._variant, self.eps)
            self.renorm_mean.copy_(init.mean)
            self.renorm_stat.copy_(init.stat)

    def reset_parameters(self) -> None:
        """Reset the running statistics, weight = 1 and bias = 0 (those that exist)."""
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            if self.bias is not None:
                nn.init.zeros_(self.bias)

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # A state_dict written before num_batches_tracked existed (no version, or version < 2)
        # loads strictly: the missing counter keeps the module's value (or 0), as in torch.
        version = local_metadata.get("version", None)
        key = prefix + "num_batches_tracked"
        if (version is None or version < 2) and self.track_running_stats and key not in state_dict:
            nbt = self.num_batches_tracked
            if nbt is not None and nbt.device.type != "meta":
                state_dict[key] = nbt
            else:
                state_dict[key] = torch.tensor(0, dtype=torch.long)
        if self._has_renorm_pair():
            # A checkpoint of the plain layer (or of torch.nn's) has no correction pair: start it
            # from the loaded running pair, as a fresh renorm layer starts it from its own (§13.3).
            assert self._variant is not None  # a renorm pair exists only with a variant
            rm_key, rv_key = prefix + "running_mean", prefix + "running_var"
            if prefix + "renorm_mean" not in state_dict and prefix + "renorm_stat" not in state_dict \
                    and rm_key in state_dict and rv_key in state_dict:
                init = RenormState.from_running(torch.as_tensor(state_dict[rm_key]),
                                                torch.as_tensor(state_dict[rv_key]), self._variant, self.eps)
                state_dict[prefix + "renorm_mean"], state_dict[prefix + "renorm_stat"] = init.mean, init.stat
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, convention={self.convention.name!r}, eps={self.eps}, "
            f"momentum={self.momentum}, momentum_on={self.convention.momentum_on!r}, "
            f"running_var={self.convention.running_var!r}, feature_axis={self.feature_axis}, "
            f"affine={self.affine}, bias={self.bias is not None}, track_running_stats={self.track_running_stats}, "
            f"implementation={self.implementation!r}"
            + ("" if self._variant is None else f", variant={self._variant!r}")
        )

    # -- forward -----------------------------------------------------------------------------------

    def _check_input_dim(self, x: torch.Tensor) -> None:
        """Rank and channel checks, naming the expected and received values.

        A wrong rank is a ``ValueError`` (as in torch.nn); a feature count other than
        ``num_features`` is a :class:`bn_ref._checks.ShapeMismatchError` (a ``ValueError`` and the
        ``RuntimeError`` torch.nn raises for it).
        """
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"input must be a torch.Tensor; got {type(x).__name__}")
        ranks = self._expected_ranks
        if ranks is not None and x.ndim not in ranks:
            want = " or ".join(f"{r}D" for r in ranks)
            raise ValueError(f"{type(self).__name__} expected {want} input (got {x.ndim}D input of shape {tuple(x.shape)})")
        c = _checks.layout(x.shape, self.feature_axis, name="input").c
        if c != self.num_features:
            raise _checks.ShapeMismatchError(
                f"{type(self).__name__}({self.num_features}) expected {self.num_features} features on axis "
                f"{self.feature_axis} of the input; got {c} (input shape {tuple(x.shape)})"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalize ``x``; in training also update the running statistics (§2, §3, §4).

        Every check (rank, channels, dtype, n = 1 under ``single_value="error"``) runs before
        any buffer changes; ``num_batches_tracked`` increments only after a successful training
        call with tracked statistics.
        """
        self._check_input_dim(x)
        if self._variant is not None:
            return self._forward_variant(x)
        tracked = self.running_mean is not None and self.running_var is not None
        # Batch statistics in training, and in eval when there are no running statistics.
        use_batch = self.training or not tracked
        update = self.training and self.track_running_stats and tracked
        nbt = self.num_batches_tracked
        count: Any = nbt if (update and nbt is not None) else 0
        y = batch_norm(
            x,
            self.running_mean if (update or not use_batch) else None,
            self.running_var if (update or not use_batch) else None,
            self.weight,
            self.bias,
            training=use_batch,
            convention=self.convention,
            count=count,
            implementation=self.implementation,
        )
        if update and nbt is not None:
            nbt.add_(1)
        return y

    def _forward_variant(self, x: torch.Tensor) -> torch.Tensor:
        """One step of ``self.variant`` through :func:`bn_ref.torch.variants.batch_norm_variant`
        (§13-§16; what is used and updated per mode: §17). ``num_batches_tracked`` takes the
        count the step returns (one more per step, one more per ghost sub-batch, §14.2)."""
        v = self._variant
        assert v is not None
        if not x.is_floating_point():
            raise TypeError(f"input must be a floating tensor; got {x.dtype}")
        rm, rv, nbt = self.running_mean, self.running_var, self.num_batches_tracked
        if v.track_running_stats and (rm is None or rv is None):
            raise ValueError(f"variant {v!r} needs the running_mean and running_var buffers; one of them is None")
        count = 0 if nbt is None else int(nbt)
        state: RenormState | None = None
        if v.renorm and self.training:
            if self._has_renorm_pair():  # updated in place
                state = RenormState(self.renorm_mean, self.renorm_stat)
            else:  # the running pair is the correction pair (§13.3): a copy taken before the step
                assert rm is not None and rv is not None
                state = RenormState.from_running(rm, rv, v, self.eps)
        y, new_count = batch_norm_variant(
            x, rm, rv, self.weight, self.bias, training=self.training, variant=v, convention=self.convention,
            count=count, renorm=state, implementation=self.implementation,
        )
        if nbt is not None and new_count != count:
            nbt.fill_(new_count)
        return y


def separate_renorm_pair(variant: Variant) -> bool:
    """Whether renorm's correction pair differs from the running pair and so needs buffers of its
    own: ``renorm_momentum`` set, or a stddev tracked (§13.3)."""
    return variant.renorm and (variant.renorm_momentum is not None or variant.renorm_track == "stddev")


def check_layer_variant(variant: object, track_running_stats: bool) -> Variant | None:
    """``variant`` checked against the layer's ``track_running_stats`` (§16.1), before any state exists.

    Raises:
        TypeError: not a :class:`bn_ref.variants.Variant` or None.
        ValueError: ``variant.track_running_stats`` differs from ``track_running_stats``; ghost
            batches without running statistics (not specified: §14 splits the batch, §16.1
            normalizes the whole batch).
    """
    if variant is None:
        return None
    if not isinstance(variant, Variant):
        raise TypeError(f"variant must be a bn_ref.variants.Variant or None; got {type(variant).__name__}")
    if variant.track_running_stats != track_running_stats:
        raise ValueError(
            f"track_running_stats={track_running_stats} disagrees with variant.track_running_stats="
            f"{variant.track_running_stats}; pass the same value to both (spec §16.1)"
        )
    return variant


class BatchNorm1d(BatchNorm):
    """:class:`BatchNorm` for (N, C) or (N, C, L) inputs (rank 2 or 3), like ``torch.nn.BatchNorm1d``.

    Under a channels-last convention (feature axis -1) a rank-3 input is (N, L, C).
    """

    _expected_ranks = (2, 3)


class BatchNorm2d(BatchNorm):
    """:class:`BatchNorm` for rank-4 inputs, (N, C, H, W) or (N, H, W, C) per the feature axis."""

    _expected_ranks = (4,)


class BatchNorm3d(BatchNorm):
    """:class:`BatchNorm` for rank-5 inputs, (N, C, D, H, W) or (N, D, H, W, C) per the feature axis."""

    _expected_ranks = (5,)
