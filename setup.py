from setuptools import setup

TRAIN_REQUIRES = [
    "tokenizers>=0.15",
    "tqdm",
    "numpy",
    "tensorboard",   # DeepSpeed's tensorboard monitor, enabled by the GPU configs
    "matplotlib",    # scripts/plot_runs.py, the quality study and the benchmark plots
]

setup(
    name="lshmoe-plugin",
    version="0.1.0",
    description="LSH-MoE: LSH-compressed expert-parallel all-to-all for DeepSpeed and Megatron-core MoE training",
    python_requires=">=3.10",
    # lshmoe_plugin is the plugin; lshmoe_pretrain is the pretraining harness behind scripts/ (data, models, loop,
    # benchmark reporting), whose dependencies come with the "train" extra. The framework patches live in the
    # top-level patches/ folder and install as lshmoe_plugin.patches.
    packages=["lshmoe_plugin", "lshmoe_plugin.kernels", "lshmoe_plugin.patches",
              "lshmoe_pretrain", "lshmoe_pretrain.data", "lshmoe_pretrain.models"],
    package_dir={"lshmoe_plugin.patches": "patches"},
    install_requires=[
        # Install torch first (the README pins the CPU build): a bare requirement could pull a CUDA build.
        "torch>=2.4",
        "deepspeed>=0.19,<0.20",
    ],
    extras_require={
        "train": TRAIN_REQUIRES,
        # The Megatron-core and AutoEP tests need these; pip picks megatron-core 0.16.x on Python 3.11 and
        # 0.19.x on 3.12, the two lines the patch is checked against.
        "test": ["pytest>=7", "megatron-core>=0.16,<0.20", "transformers==5.17.0", "ruff==0.17.6"] + TRAIN_REQUIRES,
        "megatron": ["megatron-core>=0.16,<0.20"],
    },
)
