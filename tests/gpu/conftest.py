"""GPU-only tests: collected only where CUDA is available (or under Triton's CPU interpreter, TRITON_INTERPRET=1)."""
import os

import torch

collect_ignore_glob = []
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    collect_ignore_glob = ["test_*.py"]
