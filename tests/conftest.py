import os
import shutil
import tempfile

import pytest
from distributed import deepspeed_shm_buffers, remove_deepspeed_shm_buffers_since

# DeepSpeed picks its accelerator at import: make every test (and every spawned rank) use the CPU one.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.pop("LSHMOE_ENABLED", None)

# torch's JIT extensions (DeepSpeed's CPU comm op) build into a directory of this session's own, inherited by
# every rank and launcher it starts: a lock file that an earlier, killed run left in ~/.cache/torch_extensions
# would otherwise stall every rank's init_distributed (tests/distributed.py, build_deepspeed_cpu_comm_op).
_SESSION_EXTENSIONS_DIR = tempfile.mkdtemp(prefix="lshmoe-test-torch-extensions-")
os.environ["TORCH_EXTENSIONS_DIR"] = _SESSION_EXTENSIONS_DIR
_SHM_BUFFERS_BEFORE_SESSION = deepspeed_shm_buffers()


def pytest_unconfigure(config):
    shutil.rmtree(_SESSION_EXTENSIONS_DIR, ignore_errors=True)
    # Buffers made in module-scoped fixtures were already there when their tests' snapshots were taken.
    remove_deepspeed_shm_buffers_since(_SHM_BUFFERS_BEFORE_SESSION)


@pytest.fixture(autouse=True)
def remove_leaked_deepspeed_shm_buffers():
    """DeepSpeed never unlinks its CPU all-reduce buffers (tests/distributed.py says why that matters)."""
    before = deepspeed_shm_buffers()
    yield
    remove_deepspeed_shm_buffers_since(before)
