"""Reversible monkey-patches of each framework's MoE dispatcher (installed as ``lshmoe_plugin.patches``).

Each module exposes ``apply(config, model=None)``, ``revert()`` and ``is_applied()``; apply and revert are
idempotent, check the framework version first, and never edit the installed framework's files.
"""
