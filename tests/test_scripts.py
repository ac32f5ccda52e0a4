"""The measuring scripts (scripts/) run whole on tiny shapes on the CPU, every section.

They measure on a GPU, where a run costs device time: a script that broke since its last
GPU run (a renamed argument, a moved key) would waste that time or, worse, report a
section's error as a missing row. So each runs here on its --tiny shapes, and what it
writes is read back: every section present and free of errors, the counts consistent.
Nothing here is timed (speed is the scripts' business, on a GPU).
"""

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def run_script(name: str, *args: str) -> None:
    child = subprocess.run([sys.executable, str(SCRIPTS / name), *args], capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, f"{name} exited {child.returncode}: {child.stderr[-3000:]}"


def test_bench_runs_every_section_of_every_weight_format(tmp_path: Path) -> None:
    run_script("bench.py", "--tiny", "--device", "cpu", "--skip-hf", "--quant", "none,int8,int4-32", "--out", str(tmp_path))
    results: dict[str, Any] = json.loads((tmp_path / "bench.json").read_text())
    errors = {name: entry["error"] for name, entry in results.items() if isinstance(entry, dict) and "error" in entry}
    assert not errors
    for model in ("mistral", "mixtral"):
        for suffix in ("", "-int8", "-int4-32"):
            for section in ("prefill", "ttft", "decode_b1", "decode_b4"):
                assert f"{model}{suffix}/ours/{section}" in results, (model, suffix, section)
            assert results[f"{model}{suffix}/ours/decode_b4"]["graph_decode_tok_s"] > 0
    rows = {row[0]: row for row in results["table"]}
    assert "mixtral-int4-32 decode b4 tok/s (generate)" in rows


def test_serve_bench_answers_every_request_at_every_rate(tmp_path: Path) -> None:
    # Sampled: the engine's rows of different seeds sampled together, and generate()'s batches.
    run_script("serve_bench.py", "--tiny", "--device", "cpu", "--rates", "16,inf", "--temperature", "0.8", "--out", str(tmp_path))
    results = json.loads((tmp_path / "serve_bench.json").read_text())
    assert [run["rate_per_s"] for run in results["runs"]] == [16.0, float("inf")]
    spread = results["steady_decode_at_spread_contexts"]
    assert len(set(spread["contexts"])) > 1 and spread["tokens_per_s"] > 0
    for run in results["runs"]:
        # The same requests as the static batches, so the same number of tokens, every one answered.
        assert run["generated_tokens"] == results["static"]["generated_tokens"] > 0
        assert run["requests"] == 24
        assert run["chunk_calls"] + run["decode_steps"] == run["steps"]
        assert 0 < run["ttft_s"]["p50"] <= run["ttft_s"]["p99"]


@pytest.mark.parametrize("kind", ["host", "trace"])
def test_serve_bench_profiles_the_saturated_run(tmp_path: Path, kind: str) -> None:
    run_script("serve_bench.py", "--tiny", "--device", "cpu", "--profile", kind, "--out", str(tmp_path))
    text = (tmp_path / "profile.txt").read_text()
    assert f"profiled ({kind}): " in text and " chunk calls launched in " in text
    assert ("Ordered by: internal time" if kind == "host" else "Self CPU time total") in text


def test_cold_start_books_every_phase_of_each_fresh_process(tmp_path: Path) -> None:
    run_script("cold_start.py", "--tiny", "--device", "cpu", "--no-steady", "--out", str(tmp_path))
    results = json.loads((tmp_path / "cold_start.json").read_text())
    runs = {run["run"]: run for run in results["runs"]}
    assert list(runs) == [
        "tiny, caches cold", "tiny, caches warm", "tiny, caches warm, 4096-token prompt", "tiny, caches warm, 8 prompts",
        "default model, caches cold", "default model, caches warm",
    ]  # fmt: skip
    for name, run in runs.items():
        phases = run["load_s"] + run["warm_up_s"] + run["prefill_s"] + run["decode_s"]
        assert 0 < phases < run["wall_s"] and run["other_s"] > 0, name
        assert run["generated_tokens"] == 64 * (8 if name.endswith("8 prompts") else 1), name
        assert run["line"].startswith(f"prompt tokens: {run['prompt_tokens']}, generated tokens: {run['generated_tokens']}, load: ")
