"""Model-agnostic weight porting between PyTorch modules and Flax (linen variables, NNX modules).

Per-layer converters (``docs/spec.md`` §10):

* conv N-d kernels: PyTorch ``(O, I/groups, *k)`` <-> Flax ``(*k, I/groups, O)``
  (:func:`conv_kernel_to_flax`, :func:`conv_kernel_to_torch`);
* dense kernels: PyTorch ``(out, in)`` <-> Flax ``(in, out)``; the first dense layer after a
  flatten also has its input rows permuted between the NCHW and NHWC flatten orders
  (:func:`flatten_permutation`, :func:`dense_kernel_to_flax`, :func:`dense_kernel_to_torch`);
* BN: ``weight``/``bias`` <-> ``scale``/``bias``; ``running_mean``/``running_var`` <->
  ``mean``/``var``; ``num_batches_tracked`` <-> ``count`` (bn-ref's Flax layers; Flax's own
  BatchNorm has no counter). The running variance is converted between the unbiased and biased
  estimators when the two sides' conventions differ (:func:`convert_running_var`, §3.5).

Model porting (:func:`torch_to_flax`, :func:`flax_to_torch`) lists the layers of both sides
(conv, dense, BN; in module registration order for PyTorch, in creation order for linen
variables, in attribute order for NNX modules), pairs them (:func:`pair_layers`) by an explicit
name map or by order with shape checks, refuses a pairing it cannot justify, and converts each
pair. Every choice that is not exact is recorded as a note in a :class:`PortReport`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from ..conventions import Convention, ConventionLike, get_convention

__all__ = [
    "Layer",
    "Pair",
    "PortReport",
    "conv_kernel_to_flax",
    "conv_kernel_to_torch",
    "flatten_permutation",
    "dense_kernel_to_flax",
    "dense_kernel_to_torch",
    "convert_running_var",
    "torch_layers",
    "flax_layers",
    "pair_layers",
    "torch_to_flax",
    "flax_to_torch",
    "flatten_variables",
    "to_numpy",
]

# -- per-layer converters ---------------------------------------------------------------------


def to_numpy(value: Any) -> np.ndarray:
    """A NumPy copy of a torch tensor, JAX array or array-like (bfloat16 kept via ml_dtypes); never a
    view, so a buffer updated in place later does not change it."""
    if hasattr(value, "detach"):
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            import ml_dtypes

            return value.float().numpy().astype(ml_dtypes.bfloat16)
        return value.numpy().copy()
    return np.array(value, copy=True)


def conv_kernel_to_flax(w: Any) -> np.ndarray:
    """PyTorch conv weight ``(O, I/groups, *k)`` (rank 3-5) as a Flax kernel ``(*k, I/groups, O)``."""
    w = to_numpy(w)
    if w.ndim < 3:
        raise ValueError(f"conv weight must have rank >= 3 (O, I, *kernel); got shape {w.shape}")
    return np.ascontiguousarray(np.transpose(w, tuple(range(2, w.ndim)) + (1, 0)))


def conv_kernel_to_torch(k: Any) -> np.ndarray:
    """Flax conv kernel ``(*k, I/groups, O)`` as a PyTorch weight ``(O, I/groups, *k)``."""
    k = to_numpy(k)
    if k.ndim < 3:
        raise ValueError(f"conv kernel must have rank >= 3 (*kernel, I, O); got shape {k.shape}")
    nd = k.ndim - 2
    return np.ascontiguousarray(np.transpose(k, (nd + 1, nd) + tuple(range(nd))))


def flatten_permutation(shape: Sequence[int]) -> np.ndarray:
    """The permutation between the NCHW and NHWC flatten orders of one feature map.

    ``shape`` is the map's ``(C, *spatial)`` (channels first, batch excluded). Returns ``perm``
    (int64, length ``C * prod(spatial)``) with::

        x_nhwc.reshape(N, -1) == x_nchw.reshape(N, -1)[:, perm]

    where ``x_nhwc = moveaxis(x_nchw, 1, -1)``. Only ``C`` and the product of the spatial sizes
    matter (the spatial axes keep their relative order in both layouts).
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) < 1 or any(s < 1 for s in shape):
        raise ValueError(f"shape must be (C, *spatial) with positive sizes; got {shape}")
    idx = np.arange(math.prod(shape), dtype=np.int64).reshape(shape)
    return np.moveaxis(idx, 0, -1).reshape(-1)


def dense_kernel_to_flax(w: Any, flatten_from: Sequence[int] | None = None) -> np.ndarray:
    """PyTorch ``Linear.weight`` ``(out, in)`` as a Flax ``Dense`` kernel ``(in, out)``.

    ``flatten_from``: the ``(C, *spatial)`` shape of the NCHW map flattened into this layer's
    input (PyTorch side), when the Flax model flattens the NHWC map instead; the kernel's input
    rows are then permuted by :func:`flatten_permutation`.
    """
    w = to_numpy(w)
    if w.ndim != 2:
        raise ValueError(f"dense weight must be (out, in); got shape {w.shape}")
    if flatten_from is None:
        return np.ascontiguousarray(w.T)
    perm = flatten_permutation(flatten_from)
    if perm.size != w.shape[1]:
        raise ValueError(f"flatten_from {tuple(flatten_from)} has {perm.size} features but the weight "
                         f"{w.shape} takes {w.shape[1]} inputs")
    return np.ascontiguousarray(w[:, perm].T)


def dense_kernel_to_torch(k: Any, flatten_from: Sequence[int] | None = None) -> np.ndarray:
    """Flax ``Dense`` kernel ``(in, out)`` as a PyTorch ``Linear.weight`` ``(out, in)``.

    ``flatten_from``: as in :func:`dense_kernel_to_flax` (the PyTorch side's ``(C, *spatial)``).
    """
    k = to_numpy(k)
    if k.ndim != 2:
        raise ValueError(f"dense kernel must be (in, out); got shape {k.shape}")
    if flatten_from is None:
        return np.ascontiguousarray(k.T)
    perm = flatten_permutation(flatten_from)
    if perm.size != k.shape[0]:
        raise ValueError(f"flatten_from {tuple(flatten_from)} has {perm.size} features but the kernel "
                         f"{k.shape} takes {k.shape[0]} inputs")
    w = np.empty((k.shape[1], k.shape[0]), dtype=k.dtype)
    w[:, perm] = k.T
    return w


def convert_running_var(
    var: Any,
    source: ConventionLike,
    target: ConventionLike,
    *,
    n: int | None = None,
    notes: list[str] | None = None,
    where: str = "running_var",
) -> np.ndarray:
    """A running variance accumulated under ``source``'s estimator, as ``target`` would hold it.

    Same estimator: returned unchanged (exact). Unbiased -> biased multiplies by ``(n-1)/n``,
    biased -> unbiased by ``n/(n-1)``, where ``n`` is the number of values per channel in every
    training batch (``docs/spec.md`` §3.5). This is exact per step, but the stored value also
    holds the initial variance: the result differs from what ``target`` would have accumulated
    by ``w_r**k * var_0 / n`` (fading with the steps ``k``), and no single factor is exact when
    batches had different ``n``. A note saying so is appended to ``notes``.

    Raises:
        ValueError: the estimators differ and ``n`` is not given (or is < 2).
    """
    s, t = get_convention(source), get_convention(target)
    v = to_numpy(var)
    if s.running_var == t.running_var:
        return v
    if n is None or not isinstance(n, (int, np.integer)) or n < 2:
        raise ValueError(
            f"{where}: the source convention {s.name!r} stores the {s.running_var} running variance and the "
            f"target {t.name!r} the {t.running_var} one; converting needs n (values per channel per training "
            f"batch, an int >= 2, spec §3.5); got n={n!r}. Pass n=..., or port to a layer with the source's "
            f"convention (e.g. bn_ref.flax.BatchNorm(convention={s.name!r})) to copy the statistics exactly"
        )
    factor = (n - 1) / n if s.running_var == "unbiased" else n / (n - 1)
    if notes is not None:
        notes.append(
            f"{where}: {s.running_var} -> {t.running_var} running variance multiplied by {factor:.6g} (n={n}); "
            f"approximate: exact only if every batch had n={n}, and off by w_r^k*var_0/n from the initial "
            f"value (spec §3.5)"
        )
    return (v.astype(np.float64) * factor).astype(v.dtype)


# -- layer lists -------------------------------------------------------------------------------


@dataclass
class Layer:
    """One parameterised layer of a model.

    ``name``: PyTorch module prefix (``"features.0"``) or Flax path joined by ``/``
    (``"block/Conv_0"``). ``kind``: ``"conv"``, ``"dense"`` or ``"bn"``. ``arrays``: the leaves by
    framework name (PyTorch: weight, bias, running_mean, running_var, num_batches_tracked; Flax:
    kernel, bias, scale, mean, var, count) as NumPy arrays. ``shape_key``: the framework-neutral
    shape used for pairing (conv: (O, I, *k); dense: (out, in); bn: (C,)).
    """

    name: str
    kind: str
    arrays: dict[str, np.ndarray]
    shape_key: tuple[int, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)


def _torch_kind(prefix: str, leaves: Mapping[str, np.ndarray], module: Any = None) -> str:
    if module is not None:
        import torch

        if isinstance(module, torch.nn.modules.conv._ConvTransposeNd):
            raise ValueError(f"{prefix}: transposed convolutions ({type(module).__name__}) are not supported "
                             "(their weight is (I, O/groups, *k)); port them with a name map and your own converter")
    if "running_mean" in leaves and "running_var" in leaves:
        return "bn"
    w = leaves.get("weight")
    if w is not None and w.ndim >= 3:
        return "conv"
    if w is not None and w.ndim == 2:
        return "dense"
    what = type(module).__name__ if module is not None else "layer"
    raise ValueError(f"{prefix or '<root>'}: {what} with leaves {sorted(leaves)} is neither a conv, a dense nor a "
                     "BN layer with running statistics; exclude it or port it with your own converter")


def _torch_shape_key(kind: str, a: Mapping[str, np.ndarray]) -> tuple[int, ...]:
    if kind == "bn":
        return (int(a["running_mean"].shape[0]),)
    return tuple(int(s) for s in a["weight"].shape)


def torch_layers(source: Any) -> list[Layer]:
    """The conv, dense and BN layers of a ``torch.nn.Module`` or a ``state_dict``, in order.

    A module lists its submodules that own parameters or buffers, in registration order; a
    state_dict groups keys by their prefix in key order. Anything else that holds parameters
    (e.g. LayerNorm, embeddings) raises ``ValueError`` naming it.
    """
    out: list[Layer] = []
    if hasattr(source, "named_modules") and hasattr(source, "state_dict"):
        for name, mod in source.named_modules():
            leaves = {k: to_numpy(v) for k, v in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False))
                      if v is not None}
            if not leaves:
                continue
            kind = _torch_kind(name, leaves, mod)
            out.append(Layer(name, kind, leaves, _torch_shape_key(kind, leaves), {"module": type(mod).__name__}))
        return out
    if not isinstance(source, Mapping):
        raise TypeError(f"source must be a torch.nn.Module or a state_dict mapping; got {type(source).__name__}")
    groups: dict[str, dict[str, np.ndarray]] = {}
    for key, value in source.items():
        prefix, _, leaf = key.rpartition(".")
        groups.setdefault(prefix, {})[leaf] = to_numpy(value)
    for prefix, leaves in groups.items():
        kind = _torch_kind(prefix, leaves)
        out.append(Layer(prefix, kind, leaves, _torch_shape_key(kind, leaves)))
    return out


def _is_nnx(obj: Any) -> bool:
    try:
        from flax import nnx
    except ImportError:  # pragma: no cover - flax is optional
        return False
    return isinstance(obj, nnx.Module)


def _nnx_walk(node: Any, path: tuple[str, ...], seen: set[int], out: list[tuple[tuple[str, ...], dict[str, Any]]]) -> None:
    """Depth-first over an NNX module in attribute (assignment) order; collects Variable leaves."""
    from flax import nnx

    if id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, nnx.Module):
        leaves: dict[str, Any] = {}
        children: list[tuple[str, Any]] = []
        for k, v in vars(node).items():
            if isinstance(v, nnx.Variable):
                leaves[k] = v
            elif isinstance(v, (nnx.Module, list, tuple, dict)) or type(v).__name__ in ("List", "Dict", "Sequential"):
                children.append((k, v))
        if leaves:
            out.append((path, leaves))
        for k, v in children:
            _nnx_walk(v, path + (k,), seen, out)
    elif isinstance(node, Mapping):
        for k, v in node.items():
            _nnx_walk(v, path + (str(k),), seen, out)
    elif isinstance(node, (list, tuple)) or hasattr(node, "__iter__"):
        try:
            items = list(node)
        except TypeError:
            return
        for i, v in enumerate(items):
            _nnx_walk(v, path + (str(i),), seen, out)


def _flax_kind(name: str, leaves: Mapping[str, Any]) -> str:
    if "mean" in leaves and "var" in leaves:
        return "bn"
    k = leaves.get("kernel")
    if k is not None and np.ndim(k) >= 3:
        return "conv"
    if k is not None and np.ndim(k) == 2:
        return "dense"
    raise ValueError(f"{name or '<root>'}: Flax layer with leaves {sorted(leaves)} is neither a conv, a dense nor a "
                     "BN layer with batch statistics; exclude it or port it with your own converter")


def _flax_shape_key(kind: str, a: Mapping[str, Any]) -> tuple[int, ...]:
    if kind == "bn":
        return (int(np.shape(a["mean"])[0]),)
    k = np.shape(a["kernel"])
    if kind == "conv":
        nd = len(k) - 2
        return (k[nd + 1], k[nd]) + tuple(k[:nd])
    return (k[1], k[0])


def _linen_nodes(tree: Mapping[str, Any], path: tuple[str, ...], out: dict[tuple[str, ...], dict[str, Any]]) -> None:
    leaves = {k: v for k, v in tree.items() if not isinstance(v, Mapping)}
    if leaves:
        out.setdefault(path, {}).update(leaves)
    for k, v in tree.items():
        if isinstance(v, Mapping):
            _linen_nodes(v, path + (k,), out)


def flax_layers(source: Any) -> list[Layer]:
    """The conv, dense and BN layers of Flax linen variables or an NNX module, in order.

    Linen: ``{"params": ..., "batch_stats": ...}`` (or a bare params tree), in the order the
    params tree lists them (creation order); a BN without scale and bias is placed by its
    ``batch_stats`` entry. NNX: attributes in assignment order, recursively.
    """
    out: list[Layer] = []
    if _is_nnx(source):
        found: list[tuple[tuple[str, ...], dict[str, Any]]] = []
        _nnx_walk(source, (), set(), found)
        for path, leaves in found:
            arrays = {k: to_numpy(v[...]) for k, v in leaves.items()}
            name = "/".join(path)
            kind = _flax_kind(name, arrays)
            out.append(Layer(name, kind, arrays, _flax_shape_key(kind, arrays), {"variables": leaves}))
        return out
    if not isinstance(source, Mapping):
        raise TypeError(f"source must be Flax linen variables (a mapping) or an nnx.Module; got {type(source).__name__}")
    params = source["params"] if "params" in source else source
    stats = source.get("batch_stats", {}) if "params" in source else {}
    nodes: dict[tuple[str, ...], dict[str, Any]] = {}
    _linen_nodes(params, (), nodes)
    stat_nodes: dict[tuple[str, ...], dict[str, Any]] = {}
    _linen_nodes(stats or {}, (), stat_nodes)
    for path, leaves in stat_nodes.items():
        nodes.setdefault(path, {}).update(leaves)
    for path, leaves in nodes.items():
        arrays = {k: to_numpy(v) for k, v in leaves.items()}
        name = "/".join(path)
        kind = _flax_kind(name, arrays)
        out.append(Layer(name, kind, arrays, _flax_shape_key(kind, arrays), {"path": path}))
    return out


# -- pairing -----------------------------------------------------------------------------------


@dataclass
class Pair:
    """A source layer and the target layer it is ported to; ``flatten_from`` is the PyTorch-side
    ``(C, S)`` of a flattened map feeding a dense layer (None: no permutation)."""

    torch: Layer
    flax: Layer
    flatten_from: tuple[int, ...] | None = None


@dataclass
class PortReport:
    """What a port did: the pairs (PyTorch name -> Flax path), and notes on everything not exact."""

    pairs: list[tuple[str, str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"{t:<28} -> {f:<28} {k}" for t, f, k in self.pairs]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _describe(layers: Sequence[Layer]) -> str:
    return ", ".join(f"{ly.name or '<root>'}:{ly.kind}{ly.shape_key}" for ly in layers)


def _norm_name(name: str) -> str:
    return name.replace(".", "/")


def pair_layers(
    torch_side: Sequence[Layer],
    flax_side: Sequence[Layer],
    mapping: Mapping[str, str] | None = None,
    *,
    match_names: bool = True,
) -> list[tuple[Layer, Layer]]:
    """Pair PyTorch layers with Flax layers.

    ``mapping``: ``{torch name: flax path}`` (path parts joined by ``/`` or ``.``) for some or all
    layers. Then, with ``match_names``, layers whose names agree once ``.``, ``/`` and ``_`` are
    dropped and case is ignored (``layer1.0.conv1`` ~ ``layer1/0/conv1``), uniquely on each side
    and with equal kind and shape, are paired by name. The remaining layers are paired by order. Order pairing first tries the whole
    sequence (kinds and shapes must agree position by position); if the kinds interleave
    differently (NNX attribute order, a shortcut registered after the main path), it pairs within
    each kind only when every shape in that kind is unique, so that the shapes, not the order,
    decide. Anything else is refused.

    Raises:
        ValueError: a name in ``mapping`` does not exist, a mapped pair has different kinds or
            shapes, the counts differ, or the order pairing is ambiguous (the message lists both
            sides and asks for a name map).
    """
    mapping = dict(mapping or {})
    by_t = {ly.name: ly for ly in torch_side}
    by_f = {_norm_name(ly.name): ly for ly in flax_side}
    pairs: list[tuple[Layer, Layer]] = []
    used_t: set[str] = set()
    used_f: set[str] = set()
    for tn, fn in mapping.items():
        if tn not in by_t:
            raise ValueError(f"mapping names PyTorch layer {tn!r}, which does not exist; layers: {list(by_t)}")
        key = _norm_name(fn)
        if key not in by_f:
            raise ValueError(f"mapping names Flax layer {fn!r}, which does not exist; layers: {list(by_f)}")
        t, f = by_t[tn], by_f[key]
        if t.kind != f.kind or t.shape_key != f.shape_key:
            raise ValueError(f"mapping pairs {tn!r} ({t.kind}{t.shape_key}) with {fn!r} ({f.kind}{f.shape_key}): "
                             "kinds or shapes differ")
        pairs.append((t, f))
        used_t.add(tn)
        used_f.add(key)
    if match_names:
        # layers with the same name on both sides (``layer1.0.conv1`` ~ ``layer1/0/conv1`` ~ ``layer1_0/conv1``)
        def name_key(name: str) -> str:
            return name.lower().replace(".", "").replace("/", "").replace("_", "")

        kt: dict[str, list[Layer]] = {}
        kf: dict[str, list[Layer]] = {}
        for ly in torch_side:
            if ly.name not in used_t:
                kt.setdefault(name_key(ly.name), []).append(ly)
        for ly in flax_side:
            if _norm_name(ly.name) not in used_f:
                kf.setdefault(name_key(ly.name), []).append(ly)
        for k, ts in kt.items():
            fs = kf.get(k, [])
            if len(ts) == 1 and len(fs) == 1 and ts[0].kind == fs[0].kind and ts[0].shape_key == fs[0].shape_key:
                pairs.append((ts[0], fs[0]))
                used_t.add(ts[0].name)
                used_f.add(_norm_name(fs[0].name))
    rest_t = [ly for ly in torch_side if ly.name not in used_t]
    rest_f = [ly for ly in flax_side if _norm_name(ly.name) not in used_f]
    if len(rest_t) != len(rest_f):
        raise ValueError(f"cannot pair by order: {len(rest_t)} unmapped PyTorch layers [{_describe(rest_t)}] but "
                         f"{len(rest_f)} unmapped Flax layers [{_describe(rest_f)}]; pass mapping={{torch_name: flax_path}}")
    if all(t.kind == f.kind and t.shape_key == f.shape_key for t, f in zip(rest_t, rest_f)):
        pairs += list(zip(rest_t, rest_f))
    else:
        for kind in ("conv", "dense", "bn"):
            lt = [ly for ly in rest_t if ly.kind == kind]
            lf = [ly for ly in rest_f if ly.kind == kind]
            if len(lt) != len(lf):
                raise ValueError(f"cannot pair by order: {len(lt)} PyTorch {kind} layers but {len(lf)} Flax ones\n"
                                 f"  PyTorch: {_describe(rest_t)}\n  Flax:    {_describe(rest_f)}")
            shapes_t = [ly.shape_key for ly in lt]
            if sorted(shapes_t) != sorted(ly.shape_key for ly in lf):
                raise ValueError(f"cannot pair the {kind} layers: the shapes differ\n"
                                 f"  PyTorch: {_describe(lt)}\n  Flax:    {_describe(lf)}")
            if [ly.shape_key for ly in lf] == shapes_t and len(set(shapes_t)) == len(shapes_t):
                pairs += list(zip(lt, lf))
                continue
            if len(set(shapes_t)) != len(shapes_t):
                raise ValueError(
                    f"ambiguous pairing: the two models list their layers in different orders and several {kind} "
                    f"layers share a shape, so neither order nor shape decides which goes where\n"
                    f"  PyTorch: {_describe(rest_t)}\n  Flax:    {_describe(rest_f)}\n"
                    "pass mapping={torch_name: flax_path} for these layers")
            by_shape = {ly.shape_key: ly for ly in lf}
            pairs += [(t, by_shape[t.shape_key]) for t in lt]
    order = {ly.name: i for i, ly in enumerate(torch_side)}
    pairs.sort(key=lambda p: order[p[0].name])
    return pairs


def _flatten_sources(torch_side: Sequence[Layer], pairs: Sequence[tuple[Layer, Layer]],
                     flatten: Mapping[str, Any] | None) -> dict[str, tuple[int, ...] | None]:
    """For each dense layer, the (C, S) of the flattened NCHW map feeding it (or None).

    Inferred from the PyTorch layer order: a dense layer reached from a conv/BN stack (no dense
    layer since the last conv) whose ``in_features`` is ``C * S`` with ``S > 1`` for the last
    conv's ``C`` reads a flattened map; ``in_features == C`` (global pooling) needs no
    permutation. ``flatten={name: (C, *spatial) or None}`` overrides the inference.
    """
    flatten = dict(flatten or {})
    out: dict[str, tuple[int, ...] | None] = {}
    channels: int | None = None
    for ly in torch_side:
        if ly.kind == "conv":
            channels = ly.shape_key[0]
        elif ly.kind == "dense":
            fin = ly.shape_key[1]
            if ly.name in flatten:
                v = flatten[ly.name]
                out[ly.name] = None if v is None else tuple(int(s) for s in v)
            elif channels is not None and fin % channels == 0 and fin > channels:
                out[ly.name] = (channels, fin // channels)
            else:
                out[ly.name] = None
            channels = None
    unknown = set(flatten) - {ly.name for ly in torch_side if ly.kind == "dense"}
    if unknown:
        raise ValueError(f"flatten names {sorted(unknown)}, which are not PyTorch dense layers")
    del pairs
    return out


# -- model porting -----------------------------------------------------------------------------


def _bn_stats_conventions(source: ConventionLike | None, target: ConventionLike | None) -> tuple[Convention, Convention] | None:
    if source is None and target is None:
        return None
    if source is None or target is None:
        raise ValueError("give both source_convention and target_convention (the conventions the BN statistics were "
                         "accumulated under on each side), or neither to copy the statistics unchanged")
    return get_convention(source), get_convention(target)


def torch_to_flax(
    source: Any,
    target: Any,
    mapping: Mapping[str, str] | None = None,
    *,
    flatten: Mapping[str, Any] | None = None,
    source_convention: ConventionLike | None = None,
    target_convention: ConventionLike | None = None,
    n: int | None = None,
    report: PortReport | None = None,
) -> Any:
    """Port a PyTorch model's weights into a Flax model.

    Args:
        source: a ``torch.nn.Module`` or its ``state_dict``.
        target: Flax linen variables ``{"params": ..., "batch_stats": ...}`` of the target model
            (e.g. from ``model.init``; used for structure, names and shapes), or an NNX module
            (updated in place).
        mapping: ``{torch name: flax path}`` for layers that order cannot pair (:func:`pair_layers`).
        flatten: ``{torch dense name: (C, *spatial) or None}`` overriding the inferred flatten
            permutation (:func:`_flatten_sources`).
        source_convention, target_convention: the conventions the BN statistics live under on each
            side (both or neither). Neither: the statistics are copied unchanged -- exact when both
            sides use the same convention, e.g. ``bn_ref.flax.BatchNorm(convention="pytorch")``.
            Different running-variance estimators need ``n`` (:func:`convert_running_var`).
        report: a :class:`PortReport` to fill with the pairs and the notes.

    Returns:
        New linen variables (NumPy arrays, the target's dtypes), or the NNX module itself.
    """
    report = report if report is not None else PortReport()
    t_layers, f_layers = torch_layers(source), flax_layers(target)
    pairs = pair_layers(t_layers, f_layers, mapping)
    flat = _flatten_sources(t_layers, pairs, flatten)
    convs = _bn_stats_conventions(source_convention, target_convention)
    new: dict[str, dict[str, np.ndarray]] = {}
    for t, f in pairs:
        a = t.arrays
        if t.kind == "conv":
            vals = {"kernel": conv_kernel_to_flax(a["weight"])}
            if "bias" in a:
                vals["bias"] = a["bias"]
        elif t.kind == "dense":
            vals = {"kernel": dense_kernel_to_flax(a["weight"], flat.get(t.name))}
            if "bias" in a:
                vals["bias"] = a["bias"]
            if flat.get(t.name) is not None:
                report.notes.append(f"{t.name}: input rows permuted from the NCHW to the NHWC flatten order of a "
                                    f"(C, S) = {flat[t.name]} map")
        else:
            vals = {"mean": a["running_mean"], "var": a["running_var"]}
            if convs is not None:
                vals["var"] = convert_running_var(a["running_var"], convs[0], convs[1], n=n, notes=report.notes,
                                                  where=f"{t.name}.running_var")
            if "weight" in a:
                vals["scale"] = a["weight"]
            if "bias" in a:
                vals["bias"] = a["bias"]
            if "count" in f.arrays:
                vals["count"] = np.asarray(int(a["num_batches_tracked"]) if "num_batches_tracked" in a else 0, np.int32)
                if "num_batches_tracked" not in a:
                    report.notes.append(f"{t.name}: no num_batches_tracked; count set to 0")
            elif "num_batches_tracked" in a and int(a["num_batches_tracked"]) != 0:
                report.notes.append(f"{t.name}: num_batches_tracked={int(a['num_batches_tracked'])} dropped (the "
                                    "target BN has no counter; it matters only for momentum=None, spec §3.3)")
        _check_leaves(t, f, vals)
        new[f.name] = {k: v.astype(f.arrays[k].dtype) if np.issubdtype(f.arrays[k].dtype, np.floating) else v
                       for k, v in vals.items()}
        report.pairs.append((t.name, f.name, t.kind))
    if _is_nnx(target):
        for f in f_layers:
            if f.name in new:
                for k, v in new[f.name].items():
                    var = f.extra["variables"][k]
                    if hasattr(var, "set_value"):
                        var.set_value(_jnp(v))
                    else:  # pragma: no cover - older Flax
                        var.value = _jnp(v)
        return target
    return _linen_rebuild(target, f_layers, new)


def _jnp(v: np.ndarray) -> Any:
    import jax.numpy as jnp

    return jnp.asarray(v)


def _check_leaves(t: Layer, f: Layer, vals: Mapping[str, np.ndarray]) -> None:
    missing = set(f.arrays) - set(vals)
    extra = set(vals) - set(f.arrays)
    if missing or extra:
        raise ValueError(f"{t.name} -> {f.name}: the target layer has leaves {sorted(f.arrays)} but the source gives "
                         f"{sorted(vals)} (a bias or affine setting differs between the models)")
    for k, v in vals.items():
        if np.shape(v) != np.shape(f.arrays[k]):
            raise ValueError(f"{t.name} -> {f.name}/{k}: shape {np.shape(v)} does not match the target's "
                             f"{np.shape(f.arrays[k])}")


def _linen_rebuild(target: Mapping[str, Any], f_layers: Sequence[Layer], new: Mapping[str, Mapping[str, np.ndarray]]) -> dict:
    """A copy of the linen variables tree with the converted leaves in place (NumPy arrays)."""

    def copy(tree: Any) -> Any:
        if isinstance(tree, Mapping):
            return {k: copy(v) for k, v in tree.items()}
        return np.array(tree, copy=True)

    out = copy(target)
    has_cols = "params" in target
    for f in f_layers:
        vals = new.get(f.name)
        if vals is None:
            continue
        path = f.extra["path"]
        for leaf, v in vals.items():
            if has_cols:
                col = "batch_stats" if leaf in ("mean", "var", "count") else "params"
                node = out[col]
            else:
                node = out
            for p in path:
                node = node[p]
            node[leaf] = v
    return out


def flax_to_torch(
    source: Any,
    target: Any,
    mapping: Mapping[str, str] | None = None,
    *,
    flatten: Mapping[str, Any] | None = None,
    source_convention: ConventionLike | None = None,
    target_convention: ConventionLike | None = None,
    n: int | None = None,
    report: PortReport | None = None,
) -> dict[str, Any]:
    """Port a Flax model's weights into a PyTorch model; returns a ``state_dict``.

    Args:
        source: Flax linen variables or an NNX module.
        target: the PyTorch ``torch.nn.Module`` (or a ``state_dict`` of the right shapes); it gives
            the names, shapes and dtypes. The result loads with ``target.load_state_dict(sd)``
            (``strict=True``); the module itself is not modified.
        mapping: ``{torch name: flax path}``, as in :func:`torch_to_flax`.
        flatten: ``{torch dense name: (C, *spatial) or None}``, as in :func:`torch_to_flax`.
        source_convention, target_convention: the BN statistics' conventions on the Flax and the
            PyTorch side (both or neither; see :func:`convert_running_var`).
        report: a :class:`PortReport` to fill.
    """
    import torch

    report = report if report is not None else PortReport()
    t_layers, f_layers = torch_layers(target), flax_layers(source)
    pairs = pair_layers(t_layers, f_layers, mapping)
    flat = _flatten_sources(t_layers, pairs, flatten)
    convs = _bn_stats_conventions(source_convention, target_convention)
    template = target.state_dict() if hasattr(target, "state_dict") else dict(target)
    out: dict[str, Any] = {}
    for t, f in pairs:
        a = f.arrays
        if t.kind == "conv":
            vals = {"weight": conv_kernel_to_torch(a["kernel"])}
            if "bias" in a:
                vals["bias"] = a["bias"]
        elif t.kind == "dense":
            vals = {"weight": dense_kernel_to_torch(a["kernel"], flat.get(t.name))}
            if "bias" in a:
                vals["bias"] = a["bias"]
        else:
            vals = {"running_mean": a["mean"], "running_var": a["var"]}
            if convs is not None:
                vals["running_var"] = convert_running_var(a["var"], convs[0], convs[1], n=n, notes=report.notes,
                                                          where=f"{f.name}/var")
            if "scale" in a:
                vals["weight"] = a["scale"]
            if "bias" in a:
                vals["bias"] = a["bias"]
            if "num_batches_tracked" in t.arrays:
                if "count" in a:
                    vals["num_batches_tracked"] = np.asarray(int(a["count"]), np.int64)
                else:
                    vals["num_batches_tracked"] = np.asarray(0, np.int64)
                    report.notes.append(f"{f.name}: no count (Flax's own BatchNorm); num_batches_tracked set to 0, "
                                        "which matters only for momentum=None (spec §3.3)")
        missing = set(t.arrays) - set(vals)
        extra = set(vals) - set(t.arrays)
        if missing or extra:
            raise ValueError(f"{f.name} -> {t.name}: the PyTorch layer has {sorted(t.arrays)} but the Flax layer "
                             f"gives {sorted(vals)} (a bias or affine setting differs between the models)")
        for leaf, v in vals.items():
            key = f"{t.name}.{leaf}" if t.name else leaf
            ref = template[key]
            arr = np.asarray(v)
            if tuple(arr.shape) != tuple(ref.shape):
                raise ValueError(f"{f.name} -> {key}: shape {arr.shape} does not match the PyTorch {tuple(ref.shape)}")
            if arr.dtype.name == "bfloat16":
                arr = arr.astype(np.float32)
            out[key] = torch.from_numpy(np.array(arr)).to(ref.dtype)
        report.pairs.append((t.name, f.name, t.kind))
    missing_keys = [k for k in template if k not in out]
    if missing_keys:
        raise ValueError(f"PyTorch keys left without a source: {missing_keys}")
    return {k: out[k] for k in template}


# -- command line ------------------------------------------------------------------------------


def _load(path: str, kind: str) -> Any:
    """Read weights without running code: a ``torch.save``'d state_dict (kind "torch", read with
    ``weights_only=True``), or Flax variables (kind "flax") as ``.msgpack``
    (``flax.serialization.msgpack_serialize``) or ``.npz`` of ``params/...``, ``batch_stats/...``
    arrays (what ``bn-ref port`` and ``bn-ref train`` write). Pickles are refused: unpickling runs
    whatever code the file holds."""
    import io
    import os

    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file")
    with open(path, "rb") as fh:
        raw = fh.read()
    if kind == "torch":
        import torch

        try:
            obj = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - torch's unpickler names what it refused
            raise ValueError(f"{path}: not a weights-only torch.save file ({type(exc).__name__})") from None
        if not isinstance(obj, Mapping):
            raise ValueError(f"{path}: not a state_dict (got {type(obj).__name__})")
        return obj
    if path.endswith(".msgpack"):
        from flax import serialization

        return serialization.msgpack_restore(raw)
    if raw[:2] != b"PK":
        raise ValueError(f"{path}: not a .npz or .msgpack file (pickles are refused: they can run code)")
    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as z:
            flat = {k: np.asarray(z[k]) for k in z.files}
    except (ValueError, OSError) as exc:
        raise ValueError(f"{path}: unreadable .npz ({exc})") from None
    return _unflatten(flat, path)


def _unflatten(flat: Mapping[str, np.ndarray], path: str) -> dict[str, Any]:
    """``{"params/conv/kernel": a, ...}`` -> nested Flax variables (a ``bn-ref train`` checkpoint's
    ``opt/...`` and ``header.json`` members are ignored)."""
    out: dict[str, Any] = {}
    for key, arr in flat.items():
        parts = key.split("/")
        if parts[0] not in ("params", "batch_stats"):
            continue
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = arr
    if "params" not in out:
        raise ValueError(f"{path}: no params/... arrays (not Flax variables)")
    return out


def flatten_variables(variables: Mapping[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
    """Nested Flax variables as ``{"params/conv1/kernel": array, ...}``: the ``.npz`` layout of
    ported Flax weights (``bn-ref port`` writes and reads it)."""
    flat: dict[str, np.ndarray] = {}
    for key, value in variables.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_variables(value, name + "/"))
        else:
            flat[name] = np.asarray(value)
    return flat


def _parse_flatten(items: Sequence[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or ():
        name, sep, shape = item.partition("=")
        if not sep:
            raise ValueError(f"--flatten {item!r}: expected NAME=C,H,W or NAME=none")
        out[name] = None if shape.strip().lower() == "none" else tuple(int(s) for s in shape.split(","))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bn_ref.porting.convert --from torch SRC --to flax OUT --template T [--mapping M.json]``.

    Ports any model's weights: SRC is a ``torch.save``'d state_dict (``--from torch``) or Flax
    variables (``--from flax``); TEMPLATE gives the target's structure
    (``--to flax``: the target model's variables from ``model.init``;
    ``--to torch``: the target model's ``state_dict``). Flax files are ``.npz`` (``params/...``,
    ``batch_stats/...`` arrays) or ``.msgpack``; no file is ever unpickled. OUT is written in the
    target's format (``.npz`` or ``.msgpack``; a ``torch.save``'d state_dict). Prints the pairs
    and the notes. Exit status 0, or 2 with one line on any error.
    """
    import argparse
    import io
    import json
    import sys

    p = argparse.ArgumentParser(prog="bn-ref port", description="Port any model's weights between PyTorch and Flax "
                                "(layers paired by order with shape checks, or by --mapping).")
    p.add_argument("--from", dest="src_kind", required=True, choices=("torch", "flax"))
    p.add_argument("src", help="source weights")
    p.add_argument("--to", dest="dst_kind", required=True, choices=("torch", "flax"))
    p.add_argument("out", help="output file")
    p.add_argument("--template", required=True, help="the target model's own weights file (structure, names, shapes)")
    p.add_argument("--mapping", help="JSON file {torch name: flax path} for layers order cannot pair")
    p.add_argument("--flatten", action="append", metavar="NAME=C,H,W",
                   help="PyTorch dense layer fed by a flattened (C, H, W) map, or NAME=none (repeatable)")
    p.add_argument("--source-convention", help="convention of the source's BN statistics (with --target-convention)")
    p.add_argument("--target-convention", help="convention the target's BN statistics live under")
    p.add_argument("--n", type=int, help="values per channel per training batch, to convert the running variance (§3.5)")
    args = p.parse_args(argv)
    if {args.src_kind, args.dst_kind} != {"torch", "flax"}:
        p.error("--from/--to must be torch -> flax or flax -> torch")
    try:
        mapping = json.load(open(args.mapping)) if args.mapping else None
        kw = dict(mapping=mapping, flatten=_parse_flatten(args.flatten), source_convention=args.source_convention,
                  target_convention=args.target_convention, n=args.n)
        report = PortReport()
        src = _load(args.src, args.src_kind)
        template = _load(args.template, args.dst_kind)
        if args.dst_kind == "flax":
            out = torch_to_flax(src, template, report=report, **kw)
            if args.out.endswith(".msgpack"):
                from flax import serialization

                payload = serialization.msgpack_serialize(out)
            else:
                buf = io.BytesIO()
                np.savez(buf, **flatten_variables(out))  # type: ignore[arg-type]
                payload = buf.getvalue()
        else:
            import torch

            sd = flax_to_torch(src, template, report=report, **kw)
            buf = io.BytesIO()
            torch.save(sd, buf)
            payload = buf.getvalue()
        with open(args.out, "wb") as fh:
            fh.write(payload)
    except (ValueError, TypeError, KeyError, OSError) as exc:
        print(f"bn-ref port: {exc}", file=sys.stderr)
        return 2
    print(report)
    print(f"wrote {args.out} ({args.dst_kind})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
