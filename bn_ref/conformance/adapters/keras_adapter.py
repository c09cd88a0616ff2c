"""Keras 3 ``keras.layers.BatchNormalization`` on the JAX backend, under the ``keras`` preset.

The backend is chosen when Keras is first imported: this module sets ``KERAS_BACKEND=jax``
before importing it. If Keras was already imported in this process with another backend, the
row is skipped with that reason (Keras cannot switch backends in a running process).
"""

from __future__ import annotations

import os
import sys
from typing import Any

import jax

from ...conventions import PRESETS
from ..cases import Case
from . import _jax_util as ju

__all__ = ["KerasAdapter", "factory"]

if "keras" not in sys.modules:
    os.environ["KERAS_BACKEND"] = "jax"
import keras  # noqa: E402


class KerasAdapter:
    """Layers are built once per configuration and called with ``stateless_call`` under ``jax.vjp``.

    ``compute_dtype = "float32"``: Keras 3 BatchNormalization computes in float32 under a float64
    dtype policy (``call`` casts to ``result_type(x.dtype, "float32")``, which Keras resolves to
    float32), so float64 cases are judged at float32 tolerance and the report records it as a
    finding of the row (§8.4). Half-precision cases use the ``mixed_*`` policies (float32 variables).
    """

    compute_dtype = "float32"

    def __init__(self, defaults: bool = False) -> None:
        self.convention = PRESETS["keras"]
        self.backend = keras.backend.backend()
        self.name = "keras.layers.BatchNormalization[jax] @keras"
        self.description = f"keras {keras.__version__} BatchNormalization, backend {self.backend}"
        self._layers: dict[Any, Any] = {}
        self._defaults = defaults

    def defaults(self) -> "KerasAdapter":
        """``BatchNormalization()`` with Keras's own axis, momentum and epsilon (only the dtype policy passed)."""
        return KerasAdapter(defaults=True)

    def skip(self, case: Case) -> str | None:
        if self.backend != "jax":
            return f"keras was imported with backend {self.backend!r} before this adapter; it needs KERAS_BACKEND=jax"
        if case.momentum is None:
            return "Keras BatchNormalization has no cumulative-average mode (momentum=None)"
        return None

    def _layer(self, case: Case) -> Any:
        c = case.x.shape[case.feature_axis]
        key = (case.rank, case.feature_axis, c, case.dtype, case.affine, case.eps, case.momentum)
        layer = self._layers.get(key)
        if layer is None:
            policy = case.dtype if case.dtype in ("float32", "float64") else f"mixed_{case.dtype}"
            if self._defaults:
                layer = keras.layers.BatchNormalization(dtype=policy)
            else:
                layer = keras.layers.BatchNormalization(axis=case.feature_axis, momentum=case.momentum,
                                                        epsilon=case.eps, center=case.affine, scale=case.affine,
                                                        dtype=policy)
            layer.build((None,) + tuple(case.x.shape[1:]))
            self._layers[key] = layer
        return layer

    @ju.with_x64
    def run(self, case: Case) -> dict[str, Any]:
        layer = self._layer(case)
        vdt = ju.DTYPES[layer.variable_dtype]
        dev = jax.devices("cpu")[0]
        x = ju.put(case.x, ju.DTYPES[case.dtype], dev)
        dy = ju.put(case.dy, ju.DTYPES[case.dtype], dev)
        trainable = [ju.put(case.gamma, vdt, dev), ju.put(case.beta, vdt, dev)] if case.affine else []
        stats = [ju.put(case.running_mean, vdt, dev), ju.put(case.running_var, vdt, dev)]
        names = [v.name for v in layer.trainable_variables]
        if case.affine and names != ["gamma", "beta"]:
            raise RuntimeError(f"unexpected Keras variable order {names}")

        def fwd(x, tv):
            y, new = layer.stateless_call(tv, stats, x, training=case.training)
            return y, new

        y, vjp, new = jax.vjp(fwd, x, trainable, has_aux=True)
        dx, dtv = vjp(dy.astype(y.dtype))
        out = {"y": ju.out(y), "running_mean": ju.out(new[0]), "running_var": ju.out(new[1]), "dx": ju.out(dx)}
        if case.affine:
            out["dgamma"], out["dbeta"] = ju.out(dtv[0]), ju.out(dtv[1])
        return out


def factory() -> list[Any]:
    return [KerasAdapter()]
