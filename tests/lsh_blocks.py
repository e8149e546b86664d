"""`paper_block`: an lsh_moe block (or LSHMoEConfig keyword set) that means the paper's LSH-MoE layer whatever the
plugin's default method is. A block that names a method or a forward stage key already says what it means (a
forward stage key composes on the paper's base, lshmoe_plugin.methods.COMPOSITION_BASE) and is returned as it is; a
block with only backward stage keys would compose on the default method, so it gets the paper's clustering."""
from lshmoe_plugin.methods import FORWARD_STAGE_KEYS, STAGE_KEYS


def paper_block(block):
    block = dict(block)
    if "method" in block or any(key in block for key in FORWARD_STAGE_KEYS):
        return block
    if any(key in block for key in STAGE_KEYS):
        return {**block, "clustering": "lsh"}
    return {**block, "method": "paper"}
