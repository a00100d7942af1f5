import os

import pytest
import torch

# The CI machine has 2 cores: pin torch so tests never oversubscribe them.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
