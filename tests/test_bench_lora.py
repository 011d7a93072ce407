"""scripts/bench_lora.py runs end to end at a tiny size: it builds PEFT adapters, reads them through hf-glue's
adapter path, and reports a time and a memory ratio for every K (a smoke test of the benchmark, not of timings)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import TEST_ENV

REPO = Path(__file__).resolve().parents[1]


def test_bench_lora_tiny_reports_ratios_for_each_k(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_lora.py"), "--tiny", "--experts", "2", "4",
                           "--json", str(out)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **TEST_ENV}, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [r["k"] for r in result["rows"]] == [2, 4]
    assert result["command"].startswith("python ") and "--tiny" in result["command"] and result["seed"] == 0
    assert result["torch"] and result["machine"]
    for row in result["rows"]:
        assert row["step_s"] > 0 and row["base_s"] > 0
        # the search holds the base plus K adapters: more than the base alone, and measured (not zero)
        assert row["base_peak"] > 0 and row["search_peak"] > row["base_peak"] * 0.9, row
        assert row["search_held"] > row["base_held"], row
        assert row["adapter_parameters"] > 0
    # more adapters hold more factors
    assert result["rows"][1]["adapter_parameters"] == 2 * result["rows"][0]["adapter_parameters"]
    table = [line for line in proc.stdout.splitlines() if re.match(r"\| (2|4) \|", line)]
    assert len(table) == 2 and all(len(line.split("|")) == 11 for line in table), proc.stdout
    # the table reports the measured rows: each line's timings and ratios are its JSON row's
    for line, row in zip(table, result["rows"]):
        cells = [c.strip() for c in line.split("|")[1:-1]]
        assert cells[2] == f"{row['step_s']:.3f}" and cells[3] == f"{row['base_s']:.3f}"
        assert cells[4] == f"{row['step_s'] / row['base_s']:.2f}" and cells[7] == f"{row['search_peak'] / row['base_peak']:.2f}"
