"""bench/gpu.py --dry-run: the GPU acceptance script runs end to end on CPU at toy shapes (every section, one table),
so the day a GPU is lent the script itself is not what fails.

    pytest tests/test_bench_gpu.py -q        (~30 s on 2 shared cores; most of it the GRPO section's subprocess)
"""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_bench_dry_run_prints_every_section():
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--dry-run"], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    table = r.stdout.split("-- bench/gpu.py --dry-run", 1)[1]
    for section in ("device", "kernel", "correctness", "decode", "attention", "sft", "grpo"):
        assert f"\n{section} " in table, section
    assert "ERROR" not in table and "OVER" not in table


def test_gpu_bench_reports_a_failing_section_and_goes_on():
    """One section raising must not end the run: its error is a table row, later sections still run, exit code 1."""
    code = ("import sys; sys.argv = ['gpu.py', '--dry-run', '--only', 'decode', 'sft']; "
            "sys.path.insert(0, %r); import gpu, twice.engine; "
            "twice.engine.Engine.generate = lambda *a, **k: 1 / 0; sys.exit(gpu.main())" % str(ROOT / "bench"))
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    assert "ZeroDivisionError" in r.stdout and "FAILED sections: decode" in r.stdout
    assert "\nsft " in r.stdout.split("FAILED")[0]  # the section after the failing one ran and made its row
