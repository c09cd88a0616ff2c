"""The conformance harness: every BN implementation against the oracle (``docs/conformance.md``).

Run ``python -m bn_ref.conformance`` (or ``nox -s conformance``). A third party checks its own
layer by writing an adapter (``docs/adapters.md``) and running
``python -m bn_ref.conformance --adapter package.module:factory``.

Public names: :class:`Case` (what ``run`` receives), :class:`Adapter` (the contract),
:data:`CATALOGUE`, :func:`make_case`, :func:`check_steps` (one case on one adapter),
:func:`main` (the command line).
"""

from __future__ import annotations

from .adapters.base import Adapter
from .cases import CATALOGUE, Case, CaseSpec, instantiate, make_case
from .cli import main
from .engine import CheckResult, check_steps, run_adapter

__all__ = ["Adapter", "Case", "CaseSpec", "CATALOGUE", "CheckResult", "check_steps", "instantiate", "make_case",
           "main", "run_adapter"]
