"""Keras 3 ``keras.layers.BatchNormalization`` on whichever backend this process was started with.

Keras fixes its backend when it is first imported (``KERAS_BACKEND``), so each backend is its own
family and process (:mod:`bn_ref.conformance.families`: ``keras-tensorflow``, ``keras-torch``,
``keras-numpy``, ``keras-jax``). Rows: the layer under the ``keras`` preset with axis, eps and
momentum passed, and a *defaults* row built with ``BatchNormalization()`` and nothing else but the
dtype policy. On the JAX backend only the defaults row is made here (the preset row is
``keras_adapter.py``, in the core family).

The layer is called statefully (the running statistics are assigned before each step and read
after it, as a user's training loop sees them). Gradients of ``sum(y * dy)`` use the backend's own
autodiff: ``tf.GradientTape`` (tensorflow), ``torch.autograd`` (torch), ``jax.vjp`` over
``stateless_call`` (jax); the NumPy backend has no autodiff, so its rows return no gradients
(reported as skipped, never passed).
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np

from ...conventions import PRESETS
from ..cases import Case
from ._defaults import as_f64, defaults_skip

__all__ = ["Keras3Adapter", "factory"]


def _policy(dtype: str) -> str:
    return dtype if dtype in ("float32", "float64") else f"mixed_{dtype}"


class Keras3Adapter:
    def __init__(self, defaults: bool) -> None:
        self.backend = keras.backend.backend()
        self.defaults = defaults
        self.convention = PRESETS["keras"]
        call = "BatchNormalization()" if defaults else "BatchNormalization"
        self.name = f"keras.layers.{call}[{self.backend}] @keras" + (" (defaults)" if defaults else "")
        self.description = f"keras {keras.__version__} BatchNormalization, backend {self.backend}" + (
            ", nothing passed but the dtype policy" if defaults else "")
        self._layers: dict[Any, Any] = {}
        # Keras 3 computes in float32 under a float64 policy on the jax, torch and numpy backends (its
        # TensorFlow backend computes float64 in float64): a declared property, judged at float32.
        self.compute_dtype = None if self.backend == "tensorflow" else "float32"
        if self.backend == "jax":
            from . import _jax_util  # noqa: F401 - float64 (jax_enable_x64) on import

    def skip(self, case: Case) -> str | None:
        if self.defaults:
            return defaults_skip(case, -1, "Keras BatchNormalization")
        if case.momentum is None:
            return "Keras BatchNormalization has no cumulative-average mode (momentum=None)"
        return None

    def _layer(self, case: Case) -> Any:
        key = (case.x.shape[1:], case.feature_axis, case.dtype, case.affine, case.eps, case.momentum)
        layer = self._layers.get(key)
        if layer is None:
            if self.defaults:
                layer = keras.layers.BatchNormalization(dtype=_policy(case.dtype))
            else:
                layer = keras.layers.BatchNormalization(axis=case.feature_axis, momentum=case.momentum,
                                                        epsilon=case.eps, center=case.affine, scale=case.affine,
                                                        dtype=_policy(case.dtype))
            layer.build((None,) + tuple(case.x.shape[1:]))
            self._layers[key] = layer
        return layer

    def run(self, case: Case) -> dict[str, Any]:
        layer = self._layer(case)
        vdt = layer.variable_dtype
        if layer.scale:  # a defaults layer has gamma = 1 and beta = 0 for an affine-off case
            c = case.running_mean.shape[0]
            layer.gamma.assign(np.asarray(case.gamma if case.affine else np.ones(c), vdt))
            layer.beta.assign(np.asarray(case.beta if case.affine else np.zeros(c), vdt))
        layer.moving_mean.assign(np.asarray(case.running_mean, vdt))
        layer.moving_variance.assign(np.asarray(case.running_var, vdt))
        run = {"tensorflow": self._tf, "torch": self._torch, "jax": self._jax}.get(self.backend, self._plain)
        out = run(layer, case)
        if self.backend != "jax":
            out["running_mean"] = as_f64(keras.ops.convert_to_numpy(layer.moving_mean.value))
            out["running_var"] = as_f64(keras.ops.convert_to_numpy(layer.moving_variance.value))
        return out

    # -- per-backend forward and gradients -------------------------------------------------------

    def _plain(self, layer: Any, case: Case) -> dict[str, Any]:
        x = keras.ops.convert_to_tensor(case.x, dtype=case.dtype)
        y = layer(x, training=case.training)
        return {"y": as_f64(keras.ops.convert_to_numpy(y))}

    def _tf(self, layer: Any, case: Case) -> dict[str, Any]:
        import tensorflow as tf

        x = tf.constant(case.x, getattr(tf, case.dtype))
        src = [x] + ([layer.gamma.value, layer.beta.value] if layer.scale else [])
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=case.training)
        out: dict[str, Any] = {"y": as_f64(tf.cast(y, tf.float64).numpy())}
        g = tape.gradient(y, src, output_gradients=tf.constant(case.dy, y.dtype))
        out["dx"] = as_f64(tf.cast(g[0], tf.float64).numpy())
        if case.affine:
            out["dgamma"], out["dbeta"] = as_f64(g[1].numpy()), as_f64(g[2].numpy())
        return out

    def _torch(self, layer: Any, case: Case) -> dict[str, Any]:
        import torch

        dt = getattr(torch, case.dtype)
        x = torch.tensor(case.x, dtype=dt).requires_grad_(True)
        params = [layer.gamma.value, layer.beta.value] if layer.scale else []
        for p in params:
            p.grad = None
        y = layer(x, training=case.training)
        y.backward(torch.tensor(case.dy, dtype=y.dtype))
        out: dict[str, Any] = {"y": as_f64(y.detach().double().numpy()), "dx": as_f64(x.grad.double().numpy())}
        if case.affine:
            out["dgamma"], out["dbeta"] = (as_f64(p.grad.double().numpy()) for p in params)
        return out

    def _jax(self, layer: Any, case: Case) -> dict[str, Any]:
        import jax

        from . import _jax_util as ju

        dev = jax.devices("cpu")[0]
        vdt = ju.DTYPES[layer.variable_dtype]
        x = ju.put(case.x, ju.DTYPES[case.dtype], dev)
        c = case.running_mean.shape[0]
        trainable = ([ju.put(case.gamma if case.affine else np.ones(c), vdt, dev),
                      ju.put(case.beta if case.affine else np.zeros(c), vdt, dev)] if layer.scale else [])
        stats = [ju.put(case.running_mean, vdt, dev), ju.put(case.running_var, vdt, dev)]

        def fwd(x: Any, tv: Any) -> Any:
            return layer.stateless_call(tv, stats, x, training=case.training)

        y, vjp, new = jax.vjp(fwd, x, trainable, has_aux=True)
        dx, dtv = vjp(ju.put(case.dy, y.dtype, dev))
        out = {"y": ju.out(y), "dx": ju.out(dx), "running_mean": ju.out(new[0]), "running_var": ju.out(new[1])}
        if case.affine:
            out["dgamma"], out["dbeta"] = ju.out(dtv[0]), ju.out(dtv[1])
        return out


def factory() -> list[Any]:
    if keras.backend.backend() == "jax":  # the preset row is keras_adapter.py's
        return [Keras3Adapter(defaults=True)]
    return [Keras3Adapter(defaults=False), Keras3Adapter(defaults=True)]
