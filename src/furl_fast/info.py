"""`python -m furl_fast.info`: print what furl_fast was built with and what it can use here.

--selftest also runs the self-check of every CUDA kernel now (each op's kernel against the reference
on a small fixed input) and prints a table: op, verified / fell back / error / skipped, and why.
"""

from __future__ import annotations

import argparse


def format_selftest(rows: list[dict]) -> str:
    """The self-check table as aligned text (op, state, device, error)."""
    header = {"op": "op", "state": "kernel", "device": "device", "error": "error"}
    table = [header] + [{k: "" if r[k] is None else str(r[k]) for k in header} for r in rows]
    widths = {k: max(len(r[k]) for r in table) for k in ("op", "state", "device")}
    return "\n".join(
        f"{r['op']:<{widths['op']}}  {r['state']:<{widths['state']}}  "
        f"{r['device']:<{widths['device']}}  {r['error']}".rstrip()
        for r in table
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m furl_fast.info", description=__doc__)
    parser.add_argument("--selftest", action="store_true",
                        help="run the self-check of every CUDA kernel and print the table")
    args = parser.parse_args(argv)
    from furl_fast import build_info

    info = build_info()
    width = max(len(k) for k in info)
    for key, value in info.items():
        print(f"{key:<{width}}  {value}")
    if not args.selftest:
        return 0
    from furl_fast import ops

    rows = ops.selftest()
    print()
    print(format_selftest(rows))
    # Exit 1 when a kernel was checked and failed; skipped (no usable GPU) is not a failure.
    return 1 if any(r["state"] in ("fell back", "error") for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
