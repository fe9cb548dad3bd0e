import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("PYTHONWARNINGS", "ignore")

import torch  # noqa: E402

torch.set_num_threads(1)


def pytest_xdist_auto_num_workers(config):
    """``-n auto`` (pyproject's addopts): one worker per core, at most 4.

    Each test starts 2-4 processes of its own, so more workers than cores only makes every deadline tighter,
    and a big machine gains little past 4 (memory: each worker's runs hold several torch processes).
    ``PYTEST_XDIST_AUTO_NUM_WORKERS=N`` overrides it, as in xdist's own hook.
    """
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS", "").isdigit():
        return int(os.environ["PYTEST_XDIST_AUTO_NUM_WORKERS"])
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(4, cores))
