"""Under CI=true a missing optional test dependency fails the run instead of skipping."""

import os
import pathlib
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent

# A test module that needs a package that cannot be imported (blocked in sys.modules).
PROBE = """
import sys
sys.modules["numpy"] = None  # as if numpy were not installed
from conftest import require
np = require("numpy")

def test_uses_numpy():
    assert np is not None
"""


def run_probe(tmp_path, ci):
    probe = tmp_path / "test_probe.py"
    probe.write_text(PROBE)
    (tmp_path / "conftest.py").write_text((HERE / "conftest.py").read_text())
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(probe)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )


def test_missing_dependency_fails_under_ci(tmp_path):
    r = run_probe(tmp_path, "true")
    assert r.returncode != 0, r.stdout + r.stderr
    assert "numpy is required under CI=true" in r.stdout + r.stderr
    assert "skipped" not in r.stdout.splitlines()[-1]


def test_missing_dependency_skips_outside_ci(tmp_path):
    for ci in (None, "false", ""):
        r = run_probe(tmp_path, ci)
        # 5: pytest collected no test (the module skipped itself), not a failure.
        assert r.returncode in (0, 5), r.stdout + r.stderr
        assert "1 skipped" in r.stdout, r.stdout
