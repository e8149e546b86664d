from setuptools import setup

setup(
    name="lshmoe-plugin",
    version="0.1.0",
    description="LSH-MoE: LSH-compressed expert-parallel all-to-all for DeepSpeed and Megatron-core MoE training",
    python_requires=">=3.10",
    # The framework patches live in the top-level patches/ folder and install as lshmoe_plugin.patches.
    packages=["lshmoe_plugin", "lshmoe_plugin.data", "lshmoe_plugin.kernels", "lshmoe_plugin.models",
              "lshmoe_plugin.patches"],
    package_dir={"lshmoe_plugin.patches": "patches"},
    install_requires=[
        # Install torch first (the README pins the CPU build): a bare requirement could pull a CUDA build.
        "torch>=2.4",
        "deepspeed>=0.19,<0.20",
        "hjson",
        "tokenizers>=0.15",
        "tqdm",
        "numpy",
        "tensorboard",   # DeepSpeed's tensorboard monitor, enabled by the GPU configs
        "matplotlib",    # scripts/plot_runs.py and the benchmark plots
    ],
    extras_require={
        # The Megatron-core and AutoEP tests need these; pip picks megatron-core 0.16.x on Python 3.11 and
        # 0.19.x on 3.12, the two lines the patch is checked against.
        "test": ["pytest>=7", "megatron-core>=0.16,<0.20", "transformers==5.17.0"],
        "megatron": ["megatron-core>=0.16,<0.20"],
    },
)
