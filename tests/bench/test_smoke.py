"""The benchmark suite runs (tiny sizes) so it cannot rot; timings are not asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_benchmark_smoke_run(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--smoke", "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Squire benchmark" in proc.stdout
    report = json.loads(out.read_text())
    names = sorted(r["name"] for r in report["results"])
    assert names == ["W1", "W2", "W3", "W4", "W5", "W6"]
    assert all(r["median"] > 0 for r in report["results"])
    w5 = next(r for r in report["results"] if r["name"] == "W5")
    assert w5["extra"]["peak_rss_mb"] > 0


def test_tenants_benchmark_smoke_run(tmp_path: Path) -> None:
    out = tmp_path / "tenants.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "tenants.py"), "--smoke", "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["T1"]["w1_tenants"] > 0 and report["T1"]["w6_plain"] > 0
    assert set(report["T2"]["shares"]) == {"t1", "t2", "t3", "t4"}
