import os

# DeepSpeed picks its accelerator at import: make every test (and every spawned rank) use the CPU one.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.pop("LSHMOE_ENABLED", None)
