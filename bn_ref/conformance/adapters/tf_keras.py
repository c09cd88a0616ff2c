"""tf.keras (Keras 2, the ``tf-keras`` package on TensorFlow) ``BatchNormalization``.

tf.keras has two code paths that keep *different* running variances:

* the **non-fused** path (``fused=False``, and every input of rank 2 or 3): moments by
  ``tf.nn.moments``, the biased variance stored -- the ``keras`` preset;
* the **fused** path (``fused=True`` or ``None`` on rank-4/5 input with the features on axis 1 or
  the last axis, float16/bfloat16/float32 only): ``tf.compat.v1.nn.fused_batch_norm`` with
  ``exponential_avg_factor = 1 - momentum``, whose kernel stores the Bessel-corrected variance
  ``n/(n-1)·var`` (factor 1 at n = 1) -- the ``tf_fused`` preset.

Rows: each path under its preset with eps/momentum/axis passed, plus two *defaults* rows built
with ``BatchNormalization()`` and nothing else but the dtype policy (ranks 2-3 against ``keras``,
ranks 4-5 against ``tf_fused``). Gradients come from ``tf.GradientTape`` with ``dy`` as the output
gradient. This module runs in the ``tensorflow`` family's environment
(:mod:`bn_ref.conformance.families`).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402
import tf_keras  # noqa: E402

from ...conventions import PRESETS  # noqa: E402
from ..cases import Case  # noqa: E402
from ._defaults import as_f64, defaults_skip  # noqa: E402

__all__ = ["TFKerasAdapter", "TFKerasVariantAdapter", "factory"]

_TF = {"float64": tf.float64, "float32": tf.float32, "float16": tf.float16, "bfloat16": tf.bfloat16}


def _policy(dtype: str) -> str:
    """The dtype policy a tf.keras user sets for this working dtype (mixed precision below float32)."""
    return dtype if dtype in ("float32", "float64") else f"mixed_{dtype}"


class TFKerasAdapter:
    """``fused``: True/False passed to the layer, or None (the defaults rows: tf.keras chooses)."""

    def __init__(self, fused: bool | None, defaults: bool = False, ranks: tuple[int, ...] = (2, 3, 4, 5)) -> None:
        self.fused = fused
        self.defaults = defaults
        self.ranks = ranks
        preset = "tf_fused" if (fused or (defaults and min(ranks) >= 4)) else "keras"
        self.convention = PRESETS[preset]
        if defaults:
            self.name = f"tf_keras.layers.BatchNormalization() rank {min(ranks)}-{max(ranks)} @{preset} (defaults)"
        else:
            self.name = f"tf_keras.layers.BatchNormalization(fused={fused}) @{preset}"
        self.description = (f"tf-keras {tf_keras.__version__} on tensorflow {tf.__version__} BatchNormalization, "
                            + ("nothing passed but the dtype policy" if defaults else f"fused={fused}"))
        self._layers: dict[Any, Any] = {}

    def skip(self, case: Case) -> str | None:
        if case.rank not in self.ranks:
            return f"this row covers input ranks {self.ranks} (the other path is its own row)"
        if self.defaults:
            return defaults_skip(case, -1, "tf.keras BatchNormalization")
        if case.momentum is None:
            return "tf.keras BatchNormalization has no cumulative-average mode (momentum=None)"
        if self.fused:
            last = case.rank - 1
            if case.feature_axis not in (1, last):
                return "the fused kernel takes the features on axis 1 or the last axis only"
            if case.dtype == "float64":
                return "tf.keras refuses fused=True for float64 (the fused kernel has no float64 CPU kernel)"
        return None

    def _layer(self, case: Case) -> Any:
        c = case.x.shape[case.feature_axis]
        key = (case.x.shape[1:], case.feature_axis, case.dtype, case.affine, case.eps, case.momentum)
        layer = self._layers.get(key)
        if layer is None:
            if self.defaults:
                layer = tf_keras.layers.BatchNormalization(dtype=_policy(case.dtype))
            else:
                layer = tf_keras.layers.BatchNormalization(
                    axis=case.feature_axis, momentum=case.momentum, epsilon=case.eps, center=case.affine,
                    scale=case.affine, fused=self.fused, dtype=_policy(case.dtype))
            layer.build((None,) + tuple(case.x.shape[1:]))
            if self.fused and not layer.fused:
                raise RuntimeError("tf.keras did not take the fused path for this case")
            if layer.moving_mean.shape[0] != c:
                raise RuntimeError(f"layer built with {layer.moving_mean.shape[0]} features, the case has {c}")
            self._layers[key] = layer
        return layer

    def run(self, case: Case) -> dict[str, Any]:
        layer = self._layer(case)
        vdt = layer.moving_mean.dtype
        if case.affine:
            layer.gamma.assign(tf.constant(case.gamma, vdt))
            layer.beta.assign(tf.constant(case.beta, vdt))
        layer.moving_mean.assign(tf.constant(case.running_mean, vdt))
        layer.moving_variance.assign(tf.constant(case.running_var, vdt))
        x = tf.constant(case.x, _TF[case.dtype])
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=case.training)
        out: dict[str, Any] = {"y": as_f64(tf.cast(y, tf.float32 if case.dtype != "float64" else tf.float64)),
                               "running_mean": as_f64(layer.moving_mean.numpy()),
                               "running_var": as_f64(layer.moving_variance.numpy())}
        if case.dy is not None:
            sources = [x] + ([layer.gamma, layer.beta] if case.affine else [])
            grads = tape.gradient(y, sources, output_gradients=tf.constant(case.dy, y.dtype))
            out["dx"] = as_f64(tf.cast(grads[0], tf.float64))
            if case.affine:
                out["dgamma"], out["dbeta"] = as_f64(grads[1].numpy()), as_f64(grads[2].numpy())
        return out


def _assign(var: Any, value: Any) -> None:
    var.assign(tf.reshape(tf.constant(value, var.dtype), var.shape))


def _flat(var: Any) -> Any:
    return as_f64(tf.reshape(var, [-1]).numpy())


class TFKerasVariantAdapter:
    """tf.keras's BN variants (the ``variants`` group, §13-§14), on the non-fused path (``keras`` preset).

    * ``kind="renorm"``: ``BatchNormalization(renorm=True, renorm_clipping={rmax, rmin, dmax},
      renorm_momentum=...)`` -- the ``renorm_track="stddev"`` cases. tf-keras keeps four moving
      averages: ``moving_mean``, ``moving_stddev`` (the inference variance is *derived* from it,
      ``moving_variance = max(0, moving_stddev**2 - eps)`` after every training step), and the
      correction pair ``renorm_mean``/``renorm_stddev``. Before each step the adapter loads the case's
      state: the running pair (``moving_stddev = sqrt(running_var + eps)``, consistent with the
      variance the case holds) and the correction pair.
    * ``kind="virtual"``: ``BatchNormalization(virtual_batch_size=v)`` -- the ``ghost_update="mean"``
      cases. tf-keras reshapes the batch to ``(v, N // v, ...)`` and normalizes over the first axis,
      so its ghost batch ``j`` holds the samples ``j, j + N/v, j + 2N/v, ...`` (strided), not the
      consecutive ones of §14.1; the adapter feeds the rows in the order that puts the case's
      consecutive sub-batch ``j`` into tf-keras's group ``j`` and restores the order of y and dx.
      A ghost size that does not divide N raises (declared with ``variant_raises``).
    * ``kind="frozen"``: ``layer.trainable = False`` -- Keras's frozen BN, ``frozen="all"`` (§15): the
      layer runs in inference mode even when called with ``training=True``, and gamma/beta leave
      ``layer.trainable_weights``, which is what a Keras training loop differentiates (no gradient).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.convention = PRESETS["keras"]
        what = {"renorm": "renorm=True, renorm_clipping, renorm_momentum", "virtual": "virtual_batch_size",
                "frozen": "trainable=False"}[kind]
        self.name = f"tf_keras.layers.BatchNormalization({what}) @keras"
        self.description = f"tf-keras {tf_keras.__version__} on tensorflow {tf.__version__} BatchNormalization({what})"
        self._layers: dict[Any, Any] = {}

    def skip(self, case: Case) -> str | None:
        if case.variant is None:
            return "this row runs the variants group only (the plain rows are tf_keras.layers.BatchNormalization(...))"
        return None

    def variant_skip(self, case: Case) -> str | None:
        v = case.variant
        if self.kind == "frozen":
            return None if v.frozen == "all" else "trainable=False is frozen='all' (no gradient to gamma/beta, §15)"
        if self.kind == "renorm":
            if not v.renorm:
                return "this row is tf-keras's Batch Renormalization (renorm=True)"
            if v.renorm_track != "stddev":
                return "tf-keras's correction pair averages the stddev (renorm_track='stddev', §13.3)"
            return None
        if v.ghost_batch_size is None:
            return "this row is tf-keras's virtual_batch_size"
        if v.ghost_update != "mean":
            return "tf-keras updates once per step from the mean of the sub-batch statistics (ghost_update='mean', §14.3)"
        return None

    def variant_raises(self, case: Case) -> str | None:
        v = case.variant
        if self.kind == "renorm" and case.dtype == "float64":
            return ("tf-keras renorm in float64: tf.maximum(renorm_stddev, tf.sqrt(epsilon)) mixes the float64 "
                    "variable with a float32 constant (InvalidArgumentError)")
        if self.kind == "virtual" and case.x.shape[0] % int(v.ghost_batch_size):
            return (f"virtual_batch_size={v.ghost_batch_size} does not divide the batch of {case.x.shape[0]}: "
                    "tf-keras's reshape to (virtual_batch_size, -1, ...) fails (InvalidArgumentError)")
        return None

    def _layer(self, case: Case) -> Any:
        v = case.variant
        key = (case.x.shape[1:], case.feature_axis, case.dtype, case.affine, case.eps, case.momentum, v)
        layer = self._layers.get(key)
        if layer is None:
            common = dict(axis=case.feature_axis, momentum=case.momentum, epsilon=case.eps, center=case.affine,
                          scale=case.affine, fused=False, dtype=_policy(case.dtype))
            if self.kind == "renorm":
                clip = {k: getattr(v, k) for k in ("rmax", "rmin", "dmax") if getattr(v, k) is not None}
                mom = case.momentum if v.renorm_momentum is None else v.renorm_momentum
                layer = tf_keras.layers.BatchNormalization(renorm=True, renorm_clipping=clip, renorm_momentum=mom,
                                                           **common)
            elif self.kind == "virtual":
                layer = tf_keras.layers.BatchNormalization(virtual_batch_size=int(v.ghost_batch_size), **common)
            else:
                layer = tf_keras.layers.BatchNormalization(**common)
                layer.trainable = False
            layer.build((None,) + tuple(case.x.shape[1:]))
            self._layers[key] = layer
        return layer

    def _order(self, case: Case) -> Any:
        """Row permutation: tf-keras row ``a * J + j`` gets the case's row ``j * v + a`` (J = N / v)."""


        n = case.x.shape[0]
        if self.kind != "virtual":
            return np.arange(n)
        v = int(case.variant.ghost_batch_size)
        groups = n // v if n % v == 0 else 1
        return np.array([j * v + a for a in range(v) for j in range(groups)]) if n % v == 0 else np.arange(n)

    def run(self, case: Case) -> dict[str, Any]:


        layer = self._layer(case)
        if case.affine:
            _assign(layer.gamma, case.gamma)
            _assign(layer.beta, case.beta)
        _assign(layer.moving_mean, case.running_mean)
        _assign(layer.moving_variance, case.running_var)
        if self.kind == "renorm":
            _assign(layer.moving_stddev, np.sqrt(np.asarray(case.running_var) + case.eps))
            _assign(layer.renorm_mean, case.renorm_mean)
            _assign(layer.renorm_stddev, case.renorm_stat)
        order = self._order(case)
        inverse = np.argsort(order)
        x = tf.constant(np.asarray(case.x)[order], _TF[case.dtype])
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=case.training)
        y64 = np.asarray(tf.cast(y, tf.float64).numpy(), dtype=np.float64)
        out: dict[str, Any] = {"y": y64[inverse], "running_mean": _flat(layer.moving_mean),
                               "running_var": _flat(layer.moving_variance)}
        if self.kind == "renorm":
            out["renorm_mean"], out["renorm_stat"] = _flat(layer.renorm_mean), _flat(layer.renorm_stddev)
        if case.dy is not None:
            # What a Keras training loop differentiates: the layer's trainable weights (none once
            # trainable=False; the tape itself would still reach the variables).
            params = [w for w in (layer.gamma, layer.beta) if any(w is t for t in layer.trainable_weights)]
            sources = [x] + (params if case.affine and len(params) == 2 else [])
            dy = tf.constant(np.asarray(case.dy)[order], y.dtype)
            grads = tape.gradient(y, sources, output_gradients=dy)
            out["dx"] = np.asarray(tf.cast(grads[0], tf.float64).numpy(), dtype=np.float64)[inverse]
            if len(sources) == 3:
                out["dgamma"] = as_f64(tf.reshape(grads[1], [-1]).numpy())
                out["dbeta"] = as_f64(tf.reshape(grads[2], [-1]).numpy())
        return out


def factory() -> list[Any]:
    return [
        TFKerasAdapter(fused=False),
        TFKerasAdapter(fused=True, ranks=(4, 5)),
        TFKerasAdapter(fused=None, defaults=True, ranks=(2, 3)),
        TFKerasAdapter(fused=None, defaults=True, ranks=(4, 5)),
        TFKerasVariantAdapter("renorm"),
        TFKerasVariantAdapter("virtual"),
        TFKerasVariantAdapter("frozen"),
    ]
