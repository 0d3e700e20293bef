import collections
import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# Property-based tests are derandomized by default so that CI runs the same cases every
# time and any failure reproduces; `--hypothesis-profile=random` explores new ones.
settings.register_profile("ci", derandomize=True, deadline=None, database=None,
                          print_blob=True, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("random", settings.get_profile("ci"), derandomize=False)
settings.load_profile(os.environ.get("QAMW_HYPOTHESIS_PROFILE", "ci"))

FUZZ_COUNTS = collections.Counter()


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for the module: on a shared 2-core machine, OpenMP threads spin
    against other jobs and small ops get ~20x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def fuzz_counts():
    """Counts of property-based cases run ({op: n}) and invalid inputs tried
    ({"invalid family: kind": n}), printed at the end of the run."""
    return FUZZ_COUNTS


def pytest_terminal_summary(terminalreporter):
    if not FUZZ_COUNTS:
        return
    valid = {k: v for k, v in FUZZ_COUNTS.items() if not k.startswith("invalid")}
    invalid = {k: v for k, v in FUZZ_COUNTS.items() if k.startswith("invalid")}
    terminalreporter.write_sep("-", "fuzz summary")
    terminalreporter.write_line(
        f"{sum(valid.values())} valid cases checked against the reference: " +
        ", ".join(f"{k} {v}" for k, v in sorted(valid.items())))
    terminalreporter.write_line(
        f"{sum(invalid.values())} invalid inputs tried ({len(invalid)} kinds), each raised a "
        "clear error")
