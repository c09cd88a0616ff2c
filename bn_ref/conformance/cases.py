"""The case catalogue of the conformance harness: what every adapter is run on.

A :class:`CaseSpec` describes a case independently of any convention (shape in the logical
(N, C, *spatial) order, data family, dtype, the modes of its steps). :func:`instantiate` turns it
into concrete :class:`Case` objects for one adapter's convention: the effective eps, momentum
and feature axis come from that convention (with the case's own overrides, e.g.
``momentum=None``), and the data are laid out along the effective feature axis. The data are a
pure function of the case id, so every adapter (and every run) sees the same numbers.

Every array handed to an adapter is float64 holding values exactly representable in the case
dtype (the inputs are *rounded to the dtype* first), so the reference is the oracle evaluated on
exactly those arrays (``docs/spec.md`` §8.4).
"""

from __future__ import annotations

import dataclasses
import re
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from ..conventions import DEFAULT, Convention, resolve
from ..variants import Variant

__all__ = [
    "Case",
    "CaseSpec",
    "CATALOGUE",
    "DISTRIBUTED",
    "VARIANTS",
    "ALL_SPECS",
    "RANDOM_SPECS",
    "round_to_dtype",
    "instantiate",
    "make_case",
    "select",
    "compile_k",
    "DTYPES",
]

DTYPES = ("float64", "float32", "float16", "bfloat16")
"""The dtypes a case may ask an implementation to compute in."""


def _np_dtype(dtype: str) -> Any:
    if dtype == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(dtype)


def round_to_dtype(a: np.ndarray | None, dtype: str) -> np.ndarray | None:
    """``a`` rounded to ``dtype`` (round to nearest even) and returned as float64 (§8.4)."""
    if a is None:
        return None
    with np.errstate(over="ignore", invalid="ignore"):
        return np.asarray(a, dtype=np.float64).astype(_np_dtype(dtype)).astype(np.float64)


@dataclass(frozen=True)
class Case:
    """One call of an adapter's ``run`` (the public adapter contract, see ``docs/adapters.md``).

    Attributes:
        x: float64 array, (N, C, ...) or (N, ..., C) -- channels on ``feature_axis``.
        gamma, beta: (C,) float64, or None when the layer has no scale / shift ("affine off").
        running_mean, running_var: (C,) float64, the running statistics before this call.
        dy: float64 array shaped like ``x`` (the upstream gradient of ``sum(y * dy)``), or None.
        training: True: batch statistics and a running update; False: eval with the running ones.
        feature_axis: the channel axis of ``x`` (non-negative index).
        count: training steps already taken (PyTorch's ``num_batches_tracked``; §3.3).
        dtype: the dtype to compute in: "float64", "float32", "float16" or "bfloat16". Every
            array above already holds values representable in it.
        eps, momentum: the effective values (momentum None = cumulative average, §3.3).
        id: stable case id (``<spec id>`` or ``<spec id>/step<k>`` in sequences).
        convention: the effective :class:`~bn_ref.Convention` (eps, momentum, feature axis
            applied); ``convention.feature_axis`` may be negative, ``feature_axis`` is not.
        layout: a memory-layout hint for frameworks that have layouts ("contiguous",
            "channels_last", "non_contiguous"); the values are the same whatever it says.
        expect_error: True when a conforming implementation must raise (n = 1 in training under
            ``single_value="error"``, §7.1).
        step: index of this call in its sequence; spec_id: the catalogue id.
        variant: None for plain BN; for a case of the ``variants`` group a
            :class:`bn_ref.variants.Variant` (§13-§16), its ``renorm_momentum`` already in the
            convention's spelling (§3.5). Only adapters that declare ``variant_skip`` receive such
            cases (see ``docs/adapters.md``). Under ``track_running_stats=False`` the running
            statistics are None.
        renorm_mean, renorm_stat: the renorm correction pair before this call (§13.3; ``renorm_stat``
            a variance or a stddev per ``variant.renorm_track``), None unless ``variant.renorm``.
        replicas: None for an ordinary case; for a cross-replica case (§11) the per-replica
            batch sizes along axis 0, a tuple summing to ``x.shape[0]`` (a 0 is a replica with no
            samples). ``x`` and ``dy`` are always the *concatenated global batch*, and the
            reference is the oracle on it: replica ``p`` holds rows
            ``sum(replicas[:p]) : sum(replicas[:p + 1])``. Single-process adapters may ignore it
            (they then compute on the global batch, which must give the same result); the
            distributed adapters split the batch this way (see ``docs/adapters.md``).
    """

    x: np.ndarray
    gamma: np.ndarray | None
    beta: np.ndarray | None
    running_mean: np.ndarray
    running_var: np.ndarray
    dy: np.ndarray | None
    training: bool
    feature_axis: int
    count: int
    dtype: str
    eps: float
    momentum: float | None
    id: str
    convention: Convention
    layout: str = "contiguous"
    expect_error: bool = False
    step: int = 0
    spec_id: str = ""
    replicas: tuple[int, ...] | None = None
    variant: Any = None
    renorm_mean: np.ndarray | None = None
    renorm_stat: np.ndarray | None = None

    @property
    def affine(self) -> bool:
        return self.gamma is not None

    @property
    def rank(self) -> int:
        return self.x.ndim

    @property
    def n(self) -> int:
        """Values reduced per channel."""
        return int(self.x.size // self.x.shape[self.feature_axis]) if self.x.size else 0

    def with_state(self, running_mean: np.ndarray, running_var: np.ndarray, count: int) -> Case:
        return dataclasses.replace(self, running_mean=running_mean, running_var=running_var, count=count)


@dataclass(frozen=True)
class CaseSpec:
    """A convention-independent case description.

    ``shape`` is logical: (N, C, *spatial). ``feature_axis``: None keeps the convention's axis,
    1 or -1 force one. ``data``: the value family (see :func:`_data`). ``modes``: the steps, e.g.
    ``("train", "eval")`` or six trainings then an eval. ``replicas``: per-replica batch sizes
    along axis 0 for a cross-replica case (§11; sums to ``shape[0]``), None for an ordinary case.
    ``variant``: a :class:`bn_ref.variants.Variant` for a case of the ``variants`` group (§13-§16),
    None for plain BN; its ``renorm_momentum`` is the weight of the *batch* term (PyTorch's
    spelling) and is re-spelled for each convention by :func:`instantiate`.
    """

    id: str
    shape: tuple[int, ...]
    dtype: str = "float64"
    feature_axis: int | None = None
    data: str = "normal"
    loc: float = 0.5
    scale: float = 2.0
    affine: bool = True
    momentum: Any = DEFAULT
    modes: tuple[str, ...] = ("train", "eval")
    layout: str = "contiguous"
    seed: int | None = None
    tags: tuple[str, ...] = field(default=())
    description: str = ""
    replicas: tuple[int, ...] | None = None
    variant: Any = None

    def __post_init__(self) -> None:
        if self.replicas is not None:
            r = tuple(int(v) for v in self.replicas)
            if len(r) < 1 or min(r) < 0 or sum(r) != self.shape[0]:
                raise ValueError(f"CaseSpec {self.id!r}: replicas {self.replicas} must be >= 0 and sum to the "
                                 f"batch size shape[0] = {self.shape[0]}")
            object.__setattr__(self, "replicas", r)

    @property
    def words(self) -> set[str]:
        """Words ``-k`` matches besides substrings of the id."""
        return {self.id, self.dtype, self.data, self.layout, f"r{len(self.shape)}", *self.tags}


def _seed(spec: CaseSpec) -> int:
    return spec.seed if spec.seed is not None else zlib.crc32(spec.id.encode())


def _data(spec: CaseSpec, n_steps: int) -> dict[str, Any]:
    """Logical-layout data of a spec: per-step x and dy, gamma, beta, initial running stats."""
    rng = np.random.default_rng(_seed(spec))
    shape = spec.shape
    c = shape[1]
    xs, dys = [], []
    for step in range(n_steps):
        chan_loc = spec.loc + 0.5 * spec.scale * rng.standard_normal(c)
        bshape = (1, c) + (1,) * (len(shape) - 2)
        x = chan_loc.reshape(bshape) + spec.scale * rng.standard_normal(shape)
        if spec.data == "large_mean":
            # mean ~ loc (1e3), std ~ scale (1e-2): E[x^2] - E[x]^2 cancels catastrophically (§8.2).
            x = spec.loc + spec.scale * rng.standard_normal(shape)
        elif spec.data == "zero_var":
            x[:, 1] = 0.75  # one channel constant: var = 0 (§7.2)
        elif spec.data == "nan":
            x.reshape(shape[0], c, -1)[0, 0, 0] = np.nan  # one NaN in channel 0 (§7.4)
        elif spec.data == "inf":
            x.reshape(shape[0], c, -1)[0, 0, 0] = np.inf  # one +Inf in channel 0 (§7.4)
        xs.append(x)
        dys.append(rng.standard_normal(shape))
        del step
    gamma = 1.0 + 0.5 * rng.standard_normal(c)
    beta = 0.25 * rng.standard_normal(c)
    rm = 0.1 * rng.standard_normal(c)
    rv = 0.5 + rng.random(c)
    if spec.data in ("large_mean",):
        rm = rm + spec.loc
        rv = rv * spec.scale**2
    return {"x": xs, "dy": dys, "gamma": gamma, "beta": beta, "running_mean": rm, "running_var": rv}


def effective_convention(spec: CaseSpec, convention: Convention) -> Convention:
    """The adapter's convention with the spec's overrides (momentum, feature axis) applied."""
    conv = resolve(convention, momentum=spec.momentum, feature_axis=spec.feature_axis)
    if conv is not convention or spec.momentum is not DEFAULT:
        suffix = []
        if spec.momentum is not DEFAULT:
            suffix.append(f"momentum={spec.momentum}")
        if spec.feature_axis is not None:
            suffix.append(f"axis={spec.feature_axis}")
        conv = dataclasses.replace(conv, name=f"{convention.name}[{','.join(suffix)}]" if suffix else conv.name)
    return conv


def instantiate(spec: CaseSpec, convention: Convention) -> list[Case]:
    """The steps of ``spec`` for an adapter claiming ``convention``.

    Running statistics and ``count`` of step k > 0 are placeholders: the engine feeds each
    adapter's own returned statistics back (``Case.with_state``).
    """
    conv = effective_convention(spec, convention)
    d = _data(spec, len(spec.modes))
    ndim = len(spec.shape)
    ax = conv.feature_axis % ndim
    dt = spec.dtype

    def lay(a: np.ndarray) -> np.ndarray:
        return round_to_dtype(np.ascontiguousarray(np.moveaxis(a, 1, ax)), dt)

    gamma = round_to_dtype(d["gamma"], dt) if spec.affine else None
    beta = round_to_dtype(d["beta"], dt) if spec.affine else None
    rm, rv = round_to_dtype(d["running_mean"], dt), round_to_dtype(d["running_var"], dt)
    variant, renorm_mean, renorm_stat = spec.variant, None, None
    if variant is not None:
        variant, renorm_mean, renorm_stat = _variant_state(spec, conv, rm, rv)
        if not variant.track_running_stats:
            rm = rv = None
    cases = []
    n = int(np.prod(spec.shape)) // spec.shape[1]
    for k, mode in enumerate(spec.modes):
        training = mode == "train"
        cid = spec.id if len(spec.modes) == 1 else f"{spec.id}/step{k}-{mode}"
        cases.append(
            Case(
                x=lay(d["x"][k]),
                gamma=gamma,
                beta=beta,
                running_mean=rm,
                running_var=rv,
                dy=lay(d["dy"][k]),
                training=training,
                feature_axis=ax,
                count=0,
                dtype=dt,
                eps=conv.eps,
                momentum=conv.momentum,
                id=cid,
                convention=conv,
                layout=spec.layout,
                expect_error=conv.rejects_batch(n, training=training),
                step=k,
                spec_id=spec.id,
                replicas=spec.replicas,
                variant=variant,
                renorm_mean=renorm_mean,
                renorm_stat=renorm_stat,
            )
        )
    return cases


def _variant_state(spec: CaseSpec, conv: Convention, rm: Any, rv: Any) -> tuple[Any, Any, Any]:
    """The spec's Variant re-spelled for ``conv`` (§3.5), and the initial renorm correction pair:
    near the running pair but not equal to it, so ``r`` and ``d`` are not 1 and 0 (§13.1)."""
    v = spec.variant
    if v.renorm_momentum is not None and conv.momentum_on == "running":
        v = dataclasses.replace(v, renorm_momentum=1.0 - float(v.renorm_momentum))
    if not v.renorm:
        return v, None, None
    rng = np.random.default_rng(_seed(spec) + 1)
    c = rm.shape[0]
    rmu = round_to_dtype(rm + 0.5 * rng.standard_normal(c), spec.dtype)
    rvar = rv * (0.8 + 0.4 * rng.random(c))
    stat = rvar if v.renorm_track == "variance" else np.sqrt(rvar + conv.eps)
    return v, rmu, round_to_dtype(stat, spec.dtype)


def make_case(
    *,
    shape: Sequence[int],
    convention: Convention,
    dtype: str = "float64",
    feature_axis: int | None = None,
    seed: int = 0,
    loc: float = 0.5,
    scale: float = 2.0,
    training: bool = True,
    affine: bool = True,
    momentum: Any = DEFAULT,
    count: int = 0,
) -> Case:
    """One reproducible random case (what the hypothesis search draws; used in repro snippets)."""
    spec = CaseSpec(
        id=f"random-{seed}",
        shape=tuple(int(s) for s in shape),
        dtype=dtype,
        feature_axis=feature_axis,
        loc=loc,
        scale=scale,
        affine=affine,
        momentum=momentum,
        modes=("train",) if training else ("eval",),
        seed=seed,
    )
    case = instantiate(spec, convention)[0]
    return dataclasses.replace(case, count=count)


# -- the catalogue ----------------------------------------------------------------------------

_SHAPES = {2: (8, 3), 3: (4, 3, 5), 4: (2, 3, 4, 3), 5: (2, 2, 3, 2, 3)}
_SEQ = ("train",) * 6 + ("eval",)


def _catalogue() -> list[CaseSpec]:
    specs: list[CaseSpec] = []
    add = specs.append
    # Ranks 2-5 under the convention's own feature axis, then forced to axis 1 and to the last axis (§6).
    for r, shp in _SHAPES.items():
        add(CaseSpec(f"rank{r}-float64", shp, tags=("rank",), description=f"rank {r}, the convention's feature axis"))
    for r in (3, 4, 5):
        add(CaseSpec(f"rank{r}-axis1-float64", _SHAPES[r], feature_axis=1, tags=("axis",),
                     description=f"rank {r}, channels on axis 1 (N, C, ...)"))
        add(CaseSpec(f"rank{r}-axislast-float64", _SHAPES[r], feature_axis=-1, tags=("axis",),
                     description=f"rank {r}, channels on the last axis (N, ..., C)"))
    # §7.1: N = 1 with spatial extent is fine; n = 1 must follow single_value.
    add(CaseSpec("batch1-spatial-float64", (1, 3, 3, 3), tags=("edge",), description="N = 1, 3x3 spatial: n = 9"))
    add(CaseSpec("single-value-rank2-float64", (1, 3), modes=("train",), tags=("edge", "n1"),
                 description="n = 1 in training (N = 1, no spatial): error or var = 0 by single_value (§7.1)"))
    add(CaseSpec("single-value-rank4-float64", (1, 3, 1, 1), modes=("train",), tags=("edge", "n1"),
                 description="n = 1 in training, (1, C, 1, 1) (§7.1)"))
    add(CaseSpec("zero-variance-float64", (4, 3, 2, 2), data="zero_var", tags=("edge",),
                 description="one constant channel: var = 0, x_hat = 0 (§7.2)"))
    add(CaseSpec("zero-variance-float32", (4, 3, 2, 2), dtype="float32", data="zero_var", tags=("edge",),
                 description="one constant channel in float32 (§7.2)"))
    # §8.2: cancellation. mean 1e3, std 1e-2.
    for dt in ("float64", "float32"):
        add(CaseSpec(f"large-mean-{dt}", (16, 3, 2, 2), dtype=dt, data="large_mean", loc=1e3, scale=1e-2,
                     tags=("numerics",), description="mean 1e3, std 1e-2: E[x^2]-E[x]^2 cancels (§8.2)"))
    for dt in ("float64", "float32"):
        add(CaseSpec(f"tiny-scale-{dt}", (4, 3, 5), dtype=dt, loc=0.0, scale=1e-4, tags=("numerics",),
                     description="std 1e-4: eps dominates var (§2.2)"))
        add(CaseSpec(f"huge-scale-{dt}", (4, 3, 5), dtype=dt, loc=1e12, scale=1e15, tags=("numerics",),
                     description="std 1e15: var 1e30 near the float32 range (§8)"))
    # §7.4: NaN/Inf stay in their channel.
    add(CaseSpec("nan-channel-float64", (4, 3, 2, 2), data="nan", tags=("edge", "nonfinite"),
                 description="one NaN in channel 0: channel 0 all NaN, others exact (§7.4)"))
    add(CaseSpec("nan-channel-float32", (4, 3, 5), dtype="float32", data="nan", tags=("edge", "nonfinite"),
                 description="one NaN in channel 0, float32 (§7.4)"))
    add(CaseSpec("inf-channel-float64", (4, 3, 2, 2), data="inf", tags=("edge", "nonfinite"),
                 description="one +Inf in channel 0: must not reach other channels (§7.4)"))
    add(CaseSpec("affine-off-float64", (4, 3, 2, 2), affine=False, tags=("affine",),
                 description="no scale, no shift (gamma = beta = None)"))
    # §3: sequences of training steps, then eval.
    for dt in ("float64", "float32"):
        add(CaseSpec(f"sequence-{dt}", (4, 3, 2, 2), dtype=dt, modes=_SEQ, tags=("sequence",),
                     description="6 training steps then eval: running statistics recursion (§3)"))
    add(CaseSpec("sequence-rank2-float64", (6, 3), modes=_SEQ, tags=("sequence",),
                 description="6 training steps then eval, rank 2"))
    add(CaseSpec("momentum-none-sequence-float64", (4, 3, 2, 2), momentum=None, modes=_SEQ,
                 tags=("sequence", "cma"), description="momentum=None: cumulative average over 6 steps (§3.3)"))
    # §8.3-§8.4: working precisions.
    for dt in ("float32", "float16", "bfloat16"):
        add(CaseSpec(f"dtype-{dt}", (4, 3, 3, 3), dtype=dt, modes=("train", "train", "eval"), tags=("dtype",),
                     description=f"computing in {dt}: tolerance of §8.4 on the dtype-rounded inputs"))
    add(CaseSpec("dtype-float16-rank2", (16, 4), dtype="float16", tags=("dtype",),
                 description="float16, rank 2"))
    # §6 layouts (a hint for frameworks with memory formats; the values are the same).
    add(CaseSpec("layout-channels-last-float32", (2, 3, 4, 3), dtype="float32", feature_axis=1,
                 layout="channels_last", tags=("layout",), description="channels_last memory format (torch)"))
    add(CaseSpec("layout-channels-last-rank5-float32", (2, 3, 2, 3, 2), dtype="float32", feature_axis=1,
                 layout="channels_last", tags=("layout",), description="channels_last_3d memory format (torch)"))
    add(CaseSpec("layout-non-contiguous-float32", (2, 3, 4, 3), dtype="float32", feature_axis=1,
                 layout="non_contiguous", tags=("layout",), description="a strided (non-contiguous) view (torch)"))
    return specs


CATALOGUE: tuple[CaseSpec, ...] = tuple(_catalogue())
"""Every single-process catalogue case, in a stable order."""

_DIST_SEQ = ("train", "train", "train", "eval")


def _distributed() -> list[CaseSpec]:
    """Cross-replica cases (§11): the global batch split along axis 0 into per-replica batches.

    Each runs three training steps then eval, so y, the gradients and the running statistics
    (whose unbiased correction must use the *global* n, §3.4, §11) are all checked. The data are
    those of an ordinary case of the same shape and id, so single-process adapters run them on
    the global batch unchanged. Ids start with ``replicas<P>-`` (P = number of replicas).
    """
    specs: list[CaseSpec] = []
    add = specs.append
    shp = (8, 3, 2, 2)
    for p, equal, unequal in ((2, (4, 4), (7, 1)), (4, (2, 2, 2, 2), (3, 1, 2, 2))):
        add(CaseSpec(f"replicas{p}-equal-float64", shp, modes=_DIST_SEQ, replicas=equal, tags=("replicas", "equal"),
                     description=f"{p} replicas of equal size {equal}: 3 training steps then eval (§11)"))
        add(CaseSpec(f"replicas{p}-unequal-float64", shp, modes=_DIST_SEQ, replicas=unequal,
                     tags=("replicas", "unequal"),
                     description=f"{p} replicas of unequal sizes {unequal}: count-weighted merge (§11.1)"))
    add(CaseSpec("replicas2-empty-2d-float64", (6, 3), modes=_DIST_SEQ, replicas=(6, 0), tags=("replicas", "empty"),
                 description="2 replicas, one with no samples (6, 0), (N, C) input (§11, §7.3)"))
    add(CaseSpec("replicas4-unequal-2d-float64", (8, 3), modes=_DIST_SEQ, replicas=(4, 0, 1, 3),
                 tags=("replicas", "unequal", "empty"),
                 description="4 replicas (4, 0, 1, 3): an empty one and one with n = 1 locally; global n = 8 (§11)"))
    add(CaseSpec("replicas4-equal-float32", (8, 3, 3), dtype="float32", modes=_DIST_SEQ, replicas=(2, 2, 2, 2),
                 tags=("replicas", "equal"), description="4 equal replicas in float32 (§8.4, §11)"))
    add(CaseSpec("replicas4-unequal-float32", (8, 3, 3), dtype="float32", modes=_DIST_SEQ, replicas=(3, 1, 0, 4),
                 tags=("replicas", "unequal", "empty"), description="4 unequal replicas (3, 1, 0, 4) in float32"))
    add(CaseSpec("replicas4-cma-float64", (8, 3, 2, 2), momentum=None, modes=_DIST_SEQ, replicas=(1, 3, 0, 4),
                 tags=("replicas", "unequal", "empty", "cma"),
                 description="momentum=None (cumulative average, §3.3) on 4 unequal replicas (1, 3, 0, 4)"))
    return specs


DISTRIBUTED: tuple[CaseSpec, ...] = tuple(_distributed())
"""The cross-replica cases (each with ``replicas``), in a stable order; part of every default run."""

_VSEQ = ("train",) * 4 + ("eval",)


def _variants() -> list[CaseSpec]:
    """The ``variants`` group (§13-§17): each case names its :class:`~bn_ref.variants.Variant`.

    Ids start with ``variant-``; ``-k variant`` selects them all, ``-k renorm`` (ghost, frozen,
    untracked, precise) one family. Renorm cases start from a correction pair that differs from
    the running pair (:func:`_variant_state`), with clipping bounds that the data reach (``clip-active``)
    or do not (``clip-inactive``); ``renorm_momentum`` is the batch weight 0.3 (re-spelled per convention).
    """
    specs: list[CaseSpec] = []
    add = specs.append
    shp = (8, 3, 2)
    active = {"rmax": 1.5, "rmin": 0.7, "dmax": 0.5}
    inactive = {"rmax": 8.0, "dmax": 8.0}
    for track, dt in (("variance", "float64"), ("stddev", "float32")):
        pre = "variant-renorm" if track == "variance" else "variant-renorm-stddev"
        for label, clip, mom in (("clip-active", active, None), ("clip-inactive", inactive, None),
                                 ("momentum", {"rmax": 3.0, "dmax": 2.0}, 0.3)):
            v = Variant(renorm=True, renorm_track=track, renorm_momentum=mom, **clip)
            add(CaseSpec(f"{pre}-{label}-{dt}", shp, dtype=dt, modes=_VSEQ, variant=v,
                         tags=("variant", "renorm", track),
                         description=f"Batch Renormalization (§13), correction pair tracks the {track}, "
                                     f"{label.replace('-', ' ')}: {clip}"
                                     + (f", renorm_momentum {mom} (batch weight) != momentum" if mom else "")))
    add(CaseSpec("variant-renorm-stddev-float64", shp, modes=_VSEQ, tags=("variant", "renorm", "stddev"),
                 variant=Variant(renorm=True, renorm_track="stddev", **active),
                 description="Batch Renormalization tracking the stddev (§13.3), clipping active, float64"))
    for v_size, how in ((4, "divides"), (3, "nondividing")):
        for upd in ("sequential", "mean"):
            mid = "" if upd == "sequential" else "mean-"
            add(CaseSpec(f"variant-ghost-{mid}{how}-float64", shp, modes=("train",) * 3 + ("eval",),
                         variant=Variant(ghost_batch_size=v_size, ghost_update=upd),
                         tags=("variant", "ghost", upd),
                         description=f"ghost batches of {v_size} in N = 8 ({how.replace('nond', 'does not d')}), "
                                     f"{upd} running update (§14)"))
    for frozen in ("statistics", "all"):
        short = "stats" if frozen == "statistics" else "all"
        add(CaseSpec(f"variant-frozen-{short}-float64", (4, 3, 2, 2), modes=("train", "train", "eval"),
                     variant=Variant(frozen=frozen), tags=("variant", "frozen"),
                     description=f"frozen={frozen!r} under gradient: running statistics in training, no update"
                                 + (", no gradient to gamma/beta" if frozen == "all" else ", gamma/beta learn")
                                 + " (§15)"))
    add(CaseSpec("variant-frozen-all-float32", (4, 3, 2, 2), dtype="float32", modes=("train", "train", "eval"),
                 variant=Variant(frozen="all"), tags=("variant", "frozen"),
                 description="frozen='all' in float32 (torchvision's FrozenBatchNorm2d buffers are float32 by default)"))
    add(CaseSpec("variant-untracked-float64", (4, 3, 2, 2), modes=("train", "train", "eval"),
                 variant=Variant(track_running_stats=False), tags=("variant", "untracked"),
                 description="track_running_stats=False: batch statistics in training and eval, no state (§16.1)"))
    add(CaseSpec("variant-untracked-2d-float64", (8, 3), modes=("train", "eval"),
                 variant=Variant(track_running_stats=False), tags=("variant", "untracked"),
                 description="track_running_stats=False, (N, C) input, train then eval (§16.1)"))
    add(CaseSpec("variant-precise-float64", (4, 3, 2, 2), momentum=None, modes=("train",) * 5, variant=Variant(),
                 tags=("variant", "precise"),
                 description="precise BN (§16.2): 5 batches under momentum=None; the final statistics are "
                             "also checked against precise_statistics of the 5 batches"))
    return specs


VARIANTS: tuple[CaseSpec, ...] = tuple(_variants())
"""The ``variants`` group: cases that name a :class:`~bn_ref.variants.Variant` (§13-§17)."""

ALL_SPECS: tuple[CaseSpec, ...] = CATALOGUE + DISTRIBUTED + VARIANTS
"""The single-process catalogue, the cross-replica cases, then the variant cases."""

RANDOM_SPECS: tuple[str, ...] = ("random-float64", "random-float32")
"""Pseudo-case ids of the hypothesis searches (one per dtype), selectable with ``-k`` like cases."""

assert len({s.id for s in ALL_SPECS}) == len(ALL_SPECS), "case ids must be unique"


# -- -k selection -----------------------------------------------------------------------------

_TOKEN = re.compile(r"\s*(\(|\)|[^\s()]+)")


def compile_k(expr: str | None) -> Callable[[str, set[str]], bool]:
    """A predicate for a pytest-like ``-k`` expression.

    Terms are matched as case-insensitive substrings of the case id (or equal to one of its
    words: dtype, tags); ``and``, ``or``, ``not`` and parentheses combine them. An empty
    expression selects everything.
    """
    if not expr or not expr.strip():
        return lambda cid, words: True
    tokens = [t for t in _TOKEN.findall(expr) if t]
    pos = 0

    def peek() -> str | None:
        return tokens[pos] if pos < len(tokens) else None

    def take() -> str:
        nonlocal pos
        if pos >= len(tokens):
            raise ValueError(f"-k {expr!r}: unexpected end of expression")
        pos += 1
        return tokens[pos - 1]

    def parse_or():
        left = parse_and()
        while peek() == "or":
            take()
            right = parse_and()
            left = (lambda a, b: lambda c, w: a(c, w) or b(c, w))(left, right)
        return left

    def parse_and():
        left = parse_not()
        while peek() == "and":
            take()
            right = parse_not()
            left = (lambda a, b: lambda c, w: a(c, w) and b(c, w))(left, right)
        return left

    def parse_not():
        if peek() == "not":
            take()
            inner = parse_not()
            return lambda c, w: not inner(c, w)
        return parse_atom()

    def parse_atom():
        tok = take()
        if tok == "(":
            inner = parse_or()
            if take() != ")":
                raise ValueError(f"-k {expr!r}: expected ')'")
            return inner
        if tok in ("and", "or", ")"):
            raise ValueError(f"-k {expr!r}: unexpected {tok!r}")
        term = tok.lower()
        return lambda c, w: term in c.lower() or term in {x.lower() for x in w}

    pred = parse_or()
    if pos != len(tokens):
        raise ValueError(f"-k {expr!r}: unexpected {tokens[pos]!r}")
    return pred


def select(expr: str | None) -> tuple[list[CaseSpec], list[str]]:
    """Catalogue specs (single-process, then cross-replica) and random pseudo-case ids matching ``-k expr``."""
    pred = compile_k(expr)
    specs = [s for s in ALL_SPECS if pred(s.id, s.words)]
    randoms = [r for r in RANDOM_SPECS if pred(r, {"random", r.split("-")[1]})]
    return specs, randoms
