"""Turn a pytest-benchmark JSON file into Markdown tables: items/s per implementation and the ratio
against a baseline implementation measured in the same run.

python benchmarks/report.py results.json --unit images --baseline torch_fast_chain
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("json_file")
    parser.add_argument("--unit", default="items", help="extra_info key holding items per call")
    parser.add_argument("--baseline", required=True, help="extra_info['impl'] of the baseline")
    args = parser.parse_args()
    with open(args.json_file) as f:
        data = json.load(f)
    groups: dict[str, dict[str, float]] = defaultdict(dict)
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        groups[bench["group"]][info["impl"]] = info[args.unit] / bench["stats"]["median"]
    print(f"| group | implementation | {args.unit}/s | vs {args.baseline} |")
    print("|---|---|---:|---:|")
    for group, rates in groups.items():
        base = rates.get(args.baseline)
        for impl, rate in sorted(rates.items(), key=lambda kv: -kv[1]):
            ratio = f"{rate / base:.2f}x" if base else "n/a"
            shown = f"{rate:,.0f}" if rate >= 100 else f"{rate:.3g}"
            print(f"| {group} | {impl} | {shown} | {ratio} |")


if __name__ == "__main__":
    main()
