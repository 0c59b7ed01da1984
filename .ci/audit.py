"""Audit the locked dependencies for known vulnerabilities; exit 1 if any unignored advisory applies.

pip-audit is the first choice. Where its per-release vulnerability queries cannot be answered (this
workplace reaches PyPI's project pages but not its per-release JSON or OSV), a pin that is the
project's newest release is checked against the advisories PyPI lists on the project page, which are
the newest release's. Pins that neither route can audit are listed, never passed over in silence.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

PYPI = "https://pypi.org/pypi/{name}/json"


def canonical(name: str) -> str:
    """PEP 503 name, so a lock's `ruamel.yaml` and pip-audit's `ruamel-yaml` meet."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path) -> dict[str, str]:
    """name -> version of every `name==version` line."""
    pins: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[canonical(name.strip())] = version.strip()
    return pins


def pip_audit(lock: Path) -> tuple[dict[str, list[str]], set[str]]:
    """Advisory ids per package found by pip-audit, and the packages it could not audit."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip_audit",
            "-r",
            str(lock),
            "--no-deps",
            "--disable-pip",
            "-f",
            "json",
            "--progress-spinner",
            "off",
        ],
        capture_output=True,
        text=True,
    )
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError:
        return {}, set(read_lock(lock))
    found: dict[str, list[str]] = {}
    skipped: set[str] = set()
    for dep in report.get("dependencies", []):
        name = canonical(dep["name"])
        if "skip_reason" in dep:
            skipped.add(name)
        elif dep.get("vulns"):
            found[name] = [v["id"] for v in dep["vulns"]]
    return found, skipped


def project_page(name: str) -> tuple[str, list[dict]] | None:
    """The newest release and its advisories, from PyPI's project page; None when unreachable."""
    try:
        with urllib.request.urlopen(PYPI.format(name=name), timeout=30) as resp:
            data = json.load(resp)
    except (urllib.error.URLError, TimeoutError, json.JSONDecodeError):
        return None
    return data["info"]["version"], [v for v in data.get("vulnerabilities") or [] if not v.get("withdrawn")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("lock", type=Path)
    parser.add_argument("--ignore", action="append", default=[], help="advisory id (or alias) accepted with a reason in docs")
    args = parser.parse_args()
    pins = read_lock(args.lock)
    found, skipped = pip_audit(args.lock)
    audited = len(pins) - len(skipped)
    unaudited: list[str] = []
    with ThreadPoolExecutor(8) as pool:
        pages = dict(zip(sorted(skipped), pool.map(project_page, sorted(skipped)), strict=True))
    for name, page in pages.items():
        version = pins.get(name, "?")
        if page is None or page[0] != version.split("+")[0]:
            unaudited.append(f"{name}=={version}")
            continue
        audited += 1
        for vuln in page[1]:
            found.setdefault(name, []).append(vuln["id"])
            found[name].extend(vuln.get("aliases") or [])
    ignored = set(args.ignore)
    failing = {name: ids for name, ids in found.items() if not ignored.intersection(ids)}
    for name, ids in sorted(found.items()):
        state = "FAIL" if name in failing else "ignored"
        print(f"{state}: {name}=={pins.get(name, '?')}: {', '.join(sorted(set(ids)))}")
    print(f"audited {audited}/{len(pins)} locked packages; {len(failing)} with unignored advisories")
    if unaudited:
        print(f"not audited (older than the newest release, no per-release data reachable): {' '.join(sorted(unaudited))}")
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
