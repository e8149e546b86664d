"""`paper_block`: an lsh_moe block (or LSHMoEConfig keyword set) that means the paper's LSH-MoE layer whatever the
plugin's default method is. A block that names a method or a stage key already says what it means (a stage key
alone composes on the paper's base, lshmoe_plugin.methods.COMPOSITION_BASE) and is returned as it is."""
from lshmoe_plugin.methods import STAGE_KEYS


def paper_block(block):
    block = dict(block)
    if "method" in block or any(key in block for key in STAGE_KEYS):
        return block
    return {**block, "method": "paper"}
