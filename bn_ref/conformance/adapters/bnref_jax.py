"""bn-ref's own JAX backends: ``bn_ref.jax.batch_norm`` (pure function), ``bn_ref.flax.BatchNorm``
(linen) and ``bn_ref.flax.nnx.BatchNorm`` (NNX); CPU, and GPU when JAX has one."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ... import flax as bf
from ... import jax as bj
from ...conventions import PRESETS, Convention
from ...jax import variants as bjv
from ..cases import Case
from . import _jax_util as ju

__all__ = ["JaxFunctionAdapter", "LinenAdapter", "NNXAdapter", "factory"]


class _Base:
    kind = ""

    def __init__(self, convention: Convention, device_name: str, device: Any) -> None:
        self.convention = convention
        self.device = device
        self.name = f"{self.kind}[{device_name}] @{convention.name}"
        self._cache = ju.JitCache()

    def _inputs(self, case: Case) -> dict[str, Any]:
        dt, pdt = ju.DTYPES[case.dtype], ju.param_dtype(case)
        return {
            "x": ju.put(case.x, dt, self.device),
            "dy": ju.put(case.dy, dt, self.device),
            "gamma": ju.put(case.gamma, pdt, self.device),
            "beta": ju.put(case.beta, pdt, self.device),
            "rm": ju.put(case.running_mean, pdt, self.device),
            "rv": ju.put(case.running_var, pdt, self.device),
            "count": jax.device_put(jnp.asarray(case.count, jnp.int32), self.device),
        }


class JaxFunctionAdapter(_Base):
    """``bn_ref.jax.batch_norm`` with ``jax.vjp`` for the gradients."""

    kind = "bn_ref.jax.batch_norm"
    description = "bn-ref pure JAX function (variants: bn_ref.jax.variants.batch_norm_variant)"

    def variant_skip(self, case: Case) -> str | None:
        """Every variant runs, through ``bn_ref.jax.variants.batch_norm_variant`` (jitted per variant)."""
        return None

    @ju.with_x64
    def _run_variant(self, case: Case) -> dict[str, Any]:
        conv, training, v = case.convention, case.training, case.variant

        def build():
            def f(x, g, b, rm, rv, rmu, rstat, count, dy):
                state = None if rmu is None else bjv.RenormState(rmu, rstat)

                def fwd(x, g, b):
                    o = bjv.batch_norm_variant(x, g, b, rm, rv, training=training, variant=v, convention=conv,
                                               count=count, renorm=state)
                    pair = (None, None) if o.renorm is None else (o.renorm.mean, o.renorm.stat)
                    return o.y, (o.running_mean, o.running_var) + pair

                y, vjp, aux = jax.vjp(fwd, x, g, b, has_aux=True)
                return (y,) + aux + tuple(vjp(dy))

            return f

        fn = self._cache.get(("variant", conv, training, v), build)
        i = self._inputs(case)
        pdt = ju.param_dtype(case)
        rmu, rstat = ju.put(case.renorm_mean, pdt, self.device), ju.put(case.renorm_stat, pdt, self.device)
        y, nrm, nrv, nmu, nst, dx, dg, db = fn(i["x"], i["gamma"], i["beta"], i["rm"], i["rv"], rmu, rstat,
                                               case.count, i["dy"])
        dg, db = ju.out(dg), ju.out(db)
        if v.frozen == "all" and not (dg is not None and dg.any()) and not (db is not None and db.any()):
            dg = db = None  # JAX has no "no gradient": stop_gradient yields zeros, reported as none
        return {"y": ju.out(y), "running_mean": ju.out(nrm), "running_var": ju.out(nrv),
                "renorm_mean": ju.out(nmu), "renorm_stat": ju.out(nst), "dx": ju.out(dx), "dgamma": dg, "dbeta": db}

    @ju.with_x64
    def run(self, case: Case) -> dict[str, Any]:
        if case.variant is not None:
            return self._run_variant(case)
        conv, ax, training = case.convention, case.feature_axis, case.training

        def build():
            def f(x, g, b, rm, rv, count, dy):
                def fwd(x, g, b):
                    y, nrm, nrv, _ = bj.batch_norm(x, g, b, rm, rv, training=training, convention=conv, axis=ax,
                                                   count=count)
                    return y, (nrm, nrv)

                y, vjp, (nrm, nrv) = jax.vjp(fwd, x, g, b, has_aux=True)
                return (y, nrm, nrv) + tuple(vjp(dy))

            return f

        fn = self._cache.get((conv, ax, training), build)
        i = self._inputs(case)
        y, nrm, nrv, dx, dg, db = fn(i["x"], i["gamma"], i["beta"], i["rm"], i["rv"], i["count"], i["dy"])
        return {"y": ju.out(y), "running_mean": ju.out(nrm), "running_var": ju.out(nrv), "dx": ju.out(dx),
                "dgamma": ju.out(dg), "dbeta": ju.out(db)}


class LinenAdapter(_Base):
    """``bn_ref.flax.BatchNorm`` (linen): variables params/{scale,bias}, batch_stats/{mean,var}
    (and ``count`` under ``momentum=None``)."""

    kind = "bn_ref.flax.BatchNorm"
    description = "bn-ref Flax linen layer"

    @ju.with_x64
    def run(self, case: Case) -> dict[str, Any]:
        conv, training, affine = case.convention, case.training, case.affine
        key = (conv, training, affine, case.dtype)

        def build():
            mod = bf.BatchNorm(use_running_average=not training, convention=conv, use_scale=affine,
                               use_bias=affine, dtype=ju.DTYPES[case.dtype], param_dtype=ju.param_dtype(case))

            return ju.linen_train_vjp(mod)

        fn = self._cache.get(key, build)
        i = self._inputs(case)
        params = {"scale": i["gamma"], "bias": i["beta"]} if affine else {}
        stats = {"mean": i["rm"], "var": i["rv"]}
        if conv.momentum is None:
            stats["count"] = i["count"]
        y, new, dx, dp = fn(i["x"], params, stats, i["dy"])
        return {"y": ju.out(y), "running_mean": ju.out(new["mean"]), "running_var": ju.out(new["var"]),
                "dx": ju.out(dx), "dgamma": ju.out(dp.get("scale")), "dbeta": ju.out(dp.get("bias"))}


def nnx_runner(cache: ju.JitCache, key: Any, make_module, set_values, call, case: Case, dy: Any, x: Any):
    """Run an NNX module functionally: split into (graphdef, params, rest), jit merge-call-split."""
    module = make_module()
    set_values(module)
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)

    def build():
        def f(x, params, rest, dy):
            def fwd(x, params):
                # Fresh Variable objects at this trace level: NNX refuses to mutate a Variable
                # created under another trace (the jit/vjp boundary).
                m = nnx.merge(graphdef, params, jax.tree.map(lambda a: a, rest))
                y = call(m, x)
                _, _, new_rest = nnx.split(m, nnx.Param, ...)
                return y, new_rest

            y, vjp, new_rest = jax.vjp(fwd, x, params, has_aux=True)
            dx, dp = vjp(dy)
            return y, new_rest, dx, dp

        return f

    fn = cache.get(key, build)
    y, new_rest, dx, dp = fn(x, params, rest, dy)
    return y, new_rest.to_pure_dict(), dx, dp.to_pure_dict()


class NNXAdapter(_Base):
    """``bn_ref.flax.nnx.BatchNorm`` (NNX), train/eval by the call's ``use_running_average``."""

    kind = "bn_ref.flax.nnx.BatchNorm"
    description = "bn-ref Flax NNX layer"

    @ju.with_x64
    def run(self, case: Case) -> dict[str, Any]:
        conv, training, affine = case.convention, case.training, case.affine
        c = case.x.shape[case.feature_axis]
        i = self._inputs(case)

        def make():
            return bf.nnx.BatchNorm(c, convention=conv, use_scale=affine, use_bias=affine,
                                    dtype=ju.DTYPES[case.dtype], param_dtype=ju.param_dtype(case))

        def set_values(m):
            if affine:
                m.scale.value = i["gamma"]
                m.bias.value = i["beta"]
            m.mean.value, m.var.value = i["rm"], i["rv"]
            if conv.momentum is None:
                m.count.value = i["count"].astype(m.count.value.dtype)

        y, rest, dx, dp = nnx_runner(self._cache, (conv, training, affine, case.dtype, c), make, set_values,
                                     lambda m, x: m(x, use_running_average=not training), case, i["dy"], i["x"])
        return {"y": ju.out(y), "running_mean": ju.out(rest["mean"]), "running_var": ju.out(rest["var"]),
                "dx": ju.out(dx), "dgamma": ju.out(dp.get("scale")), "dbeta": ju.out(dp.get("bias"))}


def factory() -> list[Any]:
    """``bn_ref.jax`` under flax and pytorch (channel-last and channel-first), linen and NNX under
    flax; CPU, and GPU when present. (``bn_ref.torch.batch_norm`` covers every preset.)"""
    out: list[Any] = []
    for dname, dev in ju.devices():
        for name in ("flax", "pytorch"):
            out.append(JaxFunctionAdapter(PRESETS[name], dname, dev))
        out.append(LinenAdapter(PRESETS["flax"], dname, dev))
        out.append(NNXAdapter(PRESETS["flax"], dname, dev))
    return out
