import os

import pytest
import torch

# The CI machine has 2 cores: pin torch so tests never oversubscribe them.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory):
    """The default model (hybrid attention) trained briefly on digits with 2 threads: the CI-sized run."""
    from difftx_edge.tasks import TaskConfig
    from difftx_edge.train import TrainConfig, train

    out = tmp_path_factory.mktemp("digits_run")
    test = train(TrainConfig(out=str(out), epochs=40, threads=2), TaskConfig("digits"), {}, progress=False)
    return out, test
