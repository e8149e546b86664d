"""What the variable-size wire tests (AutoEP, Megatron-core) share: the FP8 cases, the byte sizes of a row, and a
recorder of the row buffers handed to the real all-to-all."""

BLOCK = 8
# lsh_moe keys, and which of the four crossings (dispatch, combine, combine's grad, dispatch's grad) are FP8
CASES = {"fp8_dispatch": ({"dispatch_dtype": "fp8_e4m3"}, (True, False, False, True)),
         "fp8_both": ({"dispatch_dtype": "fp8_e4m3", "combine_dtype": "fp8_e4m3"}, (True, True, True, True)),
         "fp8_to_experts": ({"dispatch_dtype": "fp8_e4m3", "dispatch_grad_dtype": "model",
                             "combine_grad_dtype": "fp8_e4m3"}, (True, False, True, False))}


def row_bytes(hidden: int):
    """(FP8 row: values + one float32 scale per block, float32 row) in bytes."""
    return hidden + 4 * (hidden // BLOCK), hidden * 4


class TokenCrossings:
    """(dtype, rows, bytes) of the row buffers handed to `module.all_to_all_single` (1-D exchanges, the counts or
    the probabilities, skipped). `module`: deepspeed.comm for AutoEP, torch.distributed for Megatron-core."""

    def __init__(self, module):
        self.module = module

    def __enter__(self):
        self.original, self.calls = self.module.all_to_all_single, []

        def counting(output, tensor, *args, **kwargs):
            if tensor.dim() == 2:
                self.calls.append((str(tensor.dtype), tensor.shape[0], tensor.numel() * tensor.element_size()))
            return self.original(output, tensor, *args, **kwargs)
        self.module.all_to_all_single = counting
        return self

    def __exit__(self, *exc):
        self.module.all_to_all_single = self.original
