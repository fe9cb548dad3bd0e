import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("PYTHONWARNINGS", "ignore")

import torch  # noqa: E402

torch.set_num_threads(1)
