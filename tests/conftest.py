import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for the module: on a shared 2-core machine, OpenMP threads spin
    against other jobs and small ops get ~20x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
