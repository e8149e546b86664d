"""The pretraining harness behind ``scripts/``: corpora and indexed data, GPT-MoE/T5-MoE models, the training
loop and the benchmark reporting helpers.

Not part of the plugin: ``lshmoe_plugin`` never imports it. Its dependencies come with the ``train`` extra
(``pip install -e ".[train]"``).
"""
