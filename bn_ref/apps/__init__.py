"""Application code built on bn-ref's core: the d2l book's LeNet-BN experiment.

* :mod:`bn_ref.apps.lenet_torch` -- LeNet-BN in PyTorch (:func:`~bn_ref.apps.lenet_torch.lenet`);
* :mod:`bn_ref.apps.lenet_flax` -- LeNet-BN in Flax (:class:`~bn_ref.apps.lenet_flax.LeNet`, a
  jitted optax train step);
* :mod:`bn_ref.apps.data` -- Fashion-MNIST, verified;
* :mod:`bn_ref.apps.training` -- training loops, checkpoints, data-parallel runs (``bn-ref train``);
* :mod:`bn_ref.apps.port` -- LeNet-BN weights between PyTorch and Flax (``bn-ref port``);
* :mod:`bn_ref.apps.cli` -- the ``train``, ``port`` and ``convert-checkpoint`` subcommands.

The core (``bn_ref.conventions``, ``bn_ref.oracle``, ``bn_ref.torch``, ``bn_ref.jax``,
``bn_ref.flax``, ``bn_ref.conformance``) never imports this package; it uses only the core's
public names. Importing it loads no framework: each module imports the one it needs.
"""
