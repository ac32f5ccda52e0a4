"""pytest's settings for the suite and its shared fixtures; the helpers are in helpers.py."""

import os
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import settings

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

# CI runs each property test on the same examples, so that a red run can be rerun and a
# green one means the same thing twice; elsewhere they explore new examples each time.
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

# Tiny models gain nothing from threads, and CI has 2 cores shared by test processes.
torch.set_num_threads(1)


@pytest.fixture(params=[False, True], ids=["mistral", "mixtral"])
def moe(request: pytest.FixtureRequest) -> bool:
    return request.param
