"""Shared fixtures: the vLLM test vectors in the repository (``testdata/vllm``)."""

import importlib
import json
import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[3]
VECTORS = ROOT / "testdata" / "vllm"


def load(name):
    """One vector file, parsed."""
    with open(VECTORS / name) as f:
        return json.load(f)


@pytest.fixture(scope="session")
def block_vectors():
    """block_hashes.json (vLLM 0.33)."""
    return load("block_hashes.json")


@pytest.fixture(scope="session")
def kv_events():
    """kv_events.json (vLLM 0.33)."""
    return load("kv_events.json")


def recorded_batches(doc):
    """The engine-recorded steps (not the hand-built ones) as (step, payload bytes, decoded)."""
    out = []
    for s in doc["steps"]:
        b = s["batch"]
        if b is None or s["step"].startswith("handcrafted"):
            continue
        out.append((s["step"], bytes.fromhex(b["payload_hex"]), b["decoded"]))
    return out


def all_batches(doc):
    """Every step with a batch, hand-built ones included."""
    return [
        (s["step"], bytes.fromhex(s["batch"]["payload_hex"]), s["batch"]["decoded"])
        for s in doc["steps"]
        if s["batch"] is not None
    ]


def in_ci():
    """Whether this is a CI run (``CI`` set to anything but empty, ``0`` or ``false``)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require(module):
    """Imports an optional test dependency. Outside CI a missing one skips the test module;
    under ``CI=true`` it fails, so a CI run cannot pass by skipping tests silently."""
    if not in_ci():
        return pytest.importorskip(module)
    try:
        return importlib.import_module(module)
    except ImportError as e:
        pytest.fail(
            f"{module} is required under CI=true (it is missing: {e}); "
            f"crates/py/run_py_tests.sh installs it",
            pytrace=False,
        )
