from setuptools import setup

setup(
    name="lshmoe-plugin",
    version="0.1.0",
    description="LSH-MoE: LSH-compressed expert-parallel all-to-all for DeepSpeed and Megatron-core MoE training",
    python_requires=">=3.10",
    # The framework patches live in the top-level patches/ folder and install as lshmoe_plugin.patches.
    packages=["lshmoe_plugin", "lshmoe_plugin.kernels", "lshmoe_plugin.patches"],
    package_dir={"lshmoe_plugin.patches": "patches"},
    install_requires=[
        # Pinned so pip takes the CPU build where one is on disk instead of a multi-GB CUDA build;
        # GPU users install their own torch 2.x first (any 2.x satisfies the floor below via --no-deps).
        "torch>=2.4",
        "deepspeed>=0.19,<0.20",
        "hjson",
        "tokenizers>=0.15",
        "tqdm",
        "numpy",
    ],
    extras_require={
        "test": ["pytest>=7", "tensorboard", "matplotlib"],
        "megatron": ["megatron-core>=0.16"],
    },
)
