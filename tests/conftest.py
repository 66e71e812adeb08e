"""Shared fixtures: a fresh random generator per test (seed printed so a failure can be replayed)."""
import os

import numpy as np
import pytest


@pytest.fixture
def rng(request):
    seed = int(os.environ.get("DEEPSPOT_TEST_SEED", np.random.SeedSequence().entropy % (2**32)))
    print(f"{request.node.name}: DEEPSPOT_TEST_SEED={seed}")
    return np.random.default_rng(seed)
