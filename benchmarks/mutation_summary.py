"""Kill rate per module from mutmut's results (`make mutation` runs it after `mutmut run`).

Reads `mutmut results --all true` ("    services.x.mod.xǁClassǁmethod__mutmut_3: killed" per mutant)
and prints one row per module: mutants, killed, timeout, survived, other (suspicious, no tests,
not checked). A timeout (the mutant made its tests loop) counts as detected in the kill rate.
"""
from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter, defaultdict

LINE = re.compile(r"^\s*(?P<name>\S+)__mutmut_\d+: (?P<status>.+)$")


def module_of(name: str) -> str:
    """``services.scheduler.block_pool.xǁBlockPoolǁcache`` or ``…block_pool.x_cdiv`` -> the module."""
    return re.split(r"\.x[ǁ_]", name, maxsplit=1)[0]


def summarise(text: str) -> dict[str, Counter]:
    rows: dict[str, Counter] = defaultdict(Counter)
    for line in text.splitlines():
        m = LINE.match(line)
        if m:
            status = m["status"].strip()
            rows[module_of(m["name"])][status if status in ("killed", "timeout", "survived") else "other"] += 1
    return rows


def main() -> int:
    mutmut = sys.argv[1] if len(sys.argv) > 1 else "mutmut"
    text = subprocess.run([mutmut, "results", "--all", "true"], capture_output=True, text=True, check=True).stdout
    rows = summarise(text)
    print(f"| module | mutants | killed | timeout | survived | other | kill rate |\n|---|---|---|---|---|---|---|")
    for module, c in sorted(rows.items()):
        total = sum(c.values())
        print(f"| {module} | {total} | {c['killed']} | {c['timeout']} | {c['survived']} | {c['other']} | "
              f"{(c['killed'] + c['timeout']) / total:.1%} |")
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
