"""The shared fixtures with the numpy kernels too (the suite's other model tests run the
default, numba): the two families sum in different orders, and each must meet the exact
float32 references on its own. The 1.5B model is left to the numba run (its numpy load and
steps cost ~1 min here)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ringllm.generation import LocalEngine, Request, collect
from ringllm.model import Segment
from ringllm.sampling import SamplingParams
from tests.conftest import DATA, model_path
from tests.test_archs import check_greedy, check_top20

pytestmark = pytest.mark.model

FIXTURES = {
    "smollm2-135m": "smollm2-135m-q4_1.json",
    "qwen2.5-coder-0.5b": "qwen2.5-coder-0.5b-q4_k_m.json",
    "gemma3-270m": "gemma3-270m-q4_k_m.json",
}


@pytest.mark.parametrize("name", list(FIXTURES))
def test_numpy_kernels_meet_the_reference(name):
    from ringllm import runtime

    fx = json.loads((DATA / FIXTURES[name]).read_text())
    kernels = runtime.set_threads(1, "numpy")
    try:
        info, mf = runtime.open_model(str(model_path(name)))
        model = runtime.load_model(mf, runtime.make_plan(info, [1.0]), 0, kernels=kernels)
        mf.close()
        assert model.w.kernels.family == "numpy"
        tol = fx["tolerances"]["logits_abs"]
        case = fx["logits"][0]
        check_top20(model.forward([Segment(model.new_cache(), np.array(case["prompt_ids"]))])[0], case, tol)
        g = fx["greedy"][0]
        req = Request(tuple(g["prompt_ids"]), SamplingParams(temperature=0.0), max_tokens=4, ignore_eos=True)
        check_greedy(list(collect(LocalEngine(model, info.tokenizer).generate(req), req.prompt_ids).ids), g)
    finally:
        runtime.set_threads(1)
