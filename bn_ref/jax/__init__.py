"""bn-ref's JAX backend: Batch Normalization as pure functions (``docs/spec.md`` §2-§8, §11).

:func:`batch_norm` is the whole layer as one pure function, usable under ``jax.jit``,
``jax.vmap``, ``jax.grad`` and inside ``jax.shard_map``/``jax.pmap`` (with ``axis_name``).
The building blocks are public too, in the style of Flax's normalization helpers, with every
numerical policy a named argument:

* :func:`batch_stats` -- two-pass batch mean and biased variance, optionally over devices (§2.1, §11);
* :func:`normalize` -- the normalization and affine transform (§2.2, §2.3, §4);
* :func:`update_running` -- one step of the running statistics under a convention (§3);
* :class:`BNState` and :func:`init` -- the running state (mean, var, count) as one record.

Example::

    >>> import jax.numpy as jnp
    >>> from bn_ref.jax import batch_norm
    >>> x = jnp.arange(12.0).reshape(4, 3)
    >>> y, rm, rv, count = batch_norm(x, None, None, jnp.zeros(3), jnp.ones(3),
    ...                               training=True, convention="pytorch")
    >>> int(count), y.shape
    (1, (4, 3))
"""

from __future__ import annotations

from ._core import BNState, batch_norm, batch_stats, init, normalize, stats_dtype, update_running

__all__ = ["batch_norm", "BNState", "init", "batch_stats", "normalize", "update_running", "stats_dtype"]
