"""`lshmoe_plugin.patches` imports from a source checkout that was never installed (``PYTHONPATH=.``)."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Drop whatever import hooks an install added (setuptools' editable finder maps lshmoe_plugin.patches itself), so
# only the checkout on sys.path can provide the packages, as on a machine where the project is not installed.
PROBE = f"""
import sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in (getattr(f, "__module__", "") or "").lower()]
for name in [m for m in sys.modules if m.startswith("lshmoe_plugin")]:
    del sys.modules[name]
sys.path.insert(0, {ROOT!r})
from lshmoe_plugin.patches import lifecycle, deepspeed_moe
import lshmoe_plugin
print(lifecycle.__file__)
print(lshmoe_plugin._patch_module("deepspeed") is deepspeed_moe)
"""


def test_patches_import_from_an_uninstalled_checkout(tmp_path):
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, "DS_ACCELERATOR": "cpu"}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert lines[-2] == os.path.join(ROOT, "patches", "lifecycle.py")
    assert lines[-1] == "True"
