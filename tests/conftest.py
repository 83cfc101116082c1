"""Session-wide test settings.

One intra-op thread per process: the test models are tiny (hidden 64), so a second OpenMP
thread finds no work to share and only spins, which on CI's two cores doubles the CPU time of
the single-process tests and starves the rank processes of the multi-rank ones. The variable is
set before torch is imported here, so subprocesses (servers, ranks, the Triton interpreter
runs) inherit it; a value the caller set is kept.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
# no test reaches the Hugging Face Hub: a repo id is read from a test's own cache folder
# (tests/test_hub.py); set before huggingface_hub is imported (it reads this once)
os.environ["HF_HUB_OFFLINE"] = "1"

import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
