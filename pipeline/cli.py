"""The `pathpatch` command line: one subcommand per verb, each a thin call into a module."""

from __future__ import annotations

import argparse
import sys

from pathpatch.errors import PathPatchError


def _cmd_evidence(args: argparse.Namespace) -> int:
    from pathpatch.evidence import main as evidence_main

    return evidence_main(args.model)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pathpatch", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("evidence", help="show that a bundled model really does induction")
    p.add_argument("model", nargs="?", default="attn-only-2l")
    p.set_defaults(func=_cmd_evidence)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except PathPatchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
