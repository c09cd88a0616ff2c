"""The ``bn-ref`` command (also ``python -m bn_ref``): one subcommand per job.

    bn-ref conformance [ARGS...]   the conformance harness (same as ``python -m bn_ref.conformance``)
    bn-ref train [ARGS...]         LeNet-BN on Fashion-MNIST (``bn_ref.apps.training``)
    bn-ref port [ARGS...]          LeNet-BN weights between PyTorch and Flax (``bn_ref.apps.port``);
                                   any model with ``--template`` (``bn_ref.porting.convert``)
    bn-ref translate --from pytorch --to keras   a BN's settings in another framework's spelling
    bn-ref convert-checkpoint ...  a 0.1 pickle checkpoint to the current format (``--trust-pickle``)

Subcommands are argparse subparsers; later jobs (``train``, ``port``) register here the same way:
each gets a parser whose remaining arguments are forwarded to its own ``main(argv) -> int``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

__all__ = ["main", "SUBCOMMANDS"]


def _conformance(argv: Sequence[str]) -> int:
    from .conformance.cli import main as conformance_main

    return conformance_main(list(argv))


def _train(argv: Sequence[str]) -> int:
    from .apps.cli import train_main

    return train_main(argv)


def _port(argv: Sequence[str]) -> int:
    from .apps.cli import port_main

    return port_main(argv)


def _translate(argv: Sequence[str]) -> int:
    from .porting.translate import main as translate_main

    return translate_main(list(argv))


def _convert(argv: Sequence[str]) -> int:
    from .apps.cli import convert_main

    return convert_main(argv)


SUBCOMMANDS: dict[str, tuple[Callable[[Sequence[str]], int], str]] = {
    "conformance": (_conformance, "check BN implementations against the oracle (see python -m bn_ref.conformance -h)"),
    "train": (_train, "train LeNet-BN on Fashion-MNIST in PyTorch or Flax (see bn-ref train -h)"),
    "port": (_port, "convert a LeNet-BN checkpoint between PyTorch and Flax (see bn-ref port -h)"),
    "translate": (_translate, "print the target framework's BN constructor for a source convention (see -h)"),
    "convert-checkpoint": (_convert, "convert a bn-ref 0.1 pickle checkpoint to the current format (see -h)"),
}
"""name -> (entry point taking the remaining argv, one-line help)."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bn-ref", description="bn-ref: the reference for Batch Normalization.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, helptext) in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=helptext, add_help=False)
        sp.add_argument("args", nargs=argparse.REMAINDER)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch ``argv`` (default ``sys.argv[1:]``) to a subcommand; unknown ones exit 2 with one line."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        _parser().print_help()
        return 0 if argv else 2
    name = argv[0]
    if name not in SUBCOMMANDS:
        print(f"bn-ref: unknown command {name!r}; choose one of: {', '.join(SUBCOMMANDS)}", file=sys.stderr)
        return 2
    return SUBCOMMANDS[name][0](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
