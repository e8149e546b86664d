"""The one typed config of lshmoe-plugin, read from the ``"lsh_moe"`` block of a DeepSpeed JSON config.

Defaults, validation and the documentation of every key live here; everything else takes an `LSHMoEConfig`.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Tuple, Union

from .hash_families import HASH_FAMILIES, HashFamily
from .methods import CUSTOM, DEFAULT_METHOD, METHODS, STAGE_KEYS, MethodError, resolve
from .residual_map import RESIDUAL_GRADS, RESIDUAL_MAPS
from .wire import FORMAT_KEYS, ROUNDINGS, SCALES, WIRE_DTYPES

CONFIG_BLOCK = "lsh_moe"
ENABLED_ENV_VAR = "LSHMOE_ENABLED"
HASH_TYPES = tuple(HASH_FAMILIES)
KERNELS = ("auto", "torch", "triton")
CLUSTERINGS = ("lsh", "none", "bounded")
# Keys of LSH clustering (or of measurements only the clustered layer makes), which `clustering: "none"` turns off:
# refused there unless left at their defaults, so that no setting is silently ignored.
CLUSTERING_KEYS = ("compression_rate", "num_hashes", "hash_type", "hash_dim", "error_compensation", "residual_map",
                   "residual_grad", "refine_iterations", "redraw_interval", "exact_token_stride",
                   "output_error_interval")
# Keys of LSH clustering that error-bounded merging (`clustering: "bounded"`) has no use for, with the value that
# turns each off: refused there unless off, by name.
UNBOUNDED_KEYS = (("refine_iterations", 0), ("residual_map", "identity"), ("exact_token_stride", 0),
                  ("decide_by_cost", False))

# Said where a block that names no method meets a rule of the default's: what it asked for is not the paper's.
DEFAULT_NOTE = " (the default when the block names no method and no stage key)"
_TRUE_WORDS = ("1", "true", "yes", "on")
_FALSE_WORDS = ("0", "false", "no", "off")
# Every hash contributes the bits of its digit (log2(2 * hash_dim) for both families) to a bucket key that also
# carries the expert id; 52 bits of code keep the key inside int64 for up to 2**11 - 1 experts (`max_experts`,
# checked per layer when it compresses).
_MAX_CODE_BITS = 52


class LSHMoEConfigError(ValueError):
    """A bad ``lsh_moe`` block: the message names the key and what is allowed."""


@dataclass(frozen=True)
class LSHMoEConfig:
    """Settings of LSH compression around the expert-parallel all-to-all.

    enabled: turn compression on; the environment variable ``LSHMOE_ENABLED`` (1/0, true/false) overrides it.
    method: a named configuration (lshmoe_plugin.methods.METHODS): it sets the stage keys ``clustering``,
        ``dispatch_dtype``, ``combine_dtype``, ``dispatch_grad_dtype``, ``combine_grad_dtype`` and
        ``grad_rounding``; a stage key set to anything else beside it is refused, naming the method to set instead
        where one has those stages (a backward format set to its forward's is what "as the forward" means, and no
        contradiction). A stage key given as null counts as left out. Left out with no stage key given:
        DEFAULT_METHOD (``fp6_fwd_fp4sr_grad``: every token in FP6 forward both ways, its gradients back in FP4
        rounded stochastically, the single-pass testbed's choice; lshmoe_plugin.methods says why). Left out with a
        forward stage key given: the stage keys left out take the paper's values (COMPOSITION_BASE: gradients as
        their forwards, rounded to nearest); with only backward stage keys given, the default method's (so
        ``"grad_rounding": "nearest"`` alone is the default's crossings rounded to nearest, ``custom``). Either
        way the config reports the method its stages match, or ``custom``. The other keys keep their defaults
        under every method; under the methods without clustering the keys of LSH clustering must stay at theirs
        (write ``"method": "paper"`` for the paper's LSH-MoE).
    compression_rate: centroids sent per token routed, in (0, 1]. A fixed-capacity dispatcher (DeepSpeed's
        GShard layer) sends ``ceil(rate * capacity)`` centroid slots per expert; a variable-size one (Megatron-core,
        AutoEP) sends at most ``ceil(rate * tokens)`` non-empty clusters per expert. Under clustering ``bounded``
        it is the floor of the fixed layout's slots per expert, and the variable layout does not use it.
    num_hashes: LSH functions combined into one bucket (more hashes, finer buckets).
    hash_type: ``cross_polytope`` (random rotation, nearest signed basis vector) or ``spherical`` (nearest of
        2*hash_dim random points on the sphere).
    hash_dim: dimensions each hash function projects onto; each hash has 2*hash_dim codes.
    error_compensation: add each token's residual (token - centroid) to its centroid's expert output.
    residual_map: how error compensation carries a token's residual (token - centroid) into its output:
        ``identity`` (the paper: E(c) + x - c), or ``diagonal`` / ``linear``: E(c) + M(x - c) with M fitted per
        expert and step to the (centroid, expert output) pairs the sender holds (lshmoe_plugin.residual_map).
        Needs error_compensation; DeepSpeed's fixed-capacity layer only (refused by name elsewhere).
    residual_grad: whether the residual that error compensation adds carries a gradient: ``pass`` (the paper: a
        token's gradient is its own output gradient minus its cluster's mean, plus its share through the
        centroid's expert output) or ``stop``: the residual enters the output as a constant, so the forward is the
        compensated one, bit for bit, and a token learns only through its centroid's expert output, as without
        compensation. Separates what compensation does to the forward from what its backward path does (issue
        24). ``through_map`` (with residual_map ``diagonal`` or ``linear``): the residual's gradient passes and the
        fitted map is differentiated too, into the centroids and their expert outputs, instead of being a
        constant of the step. Needs error_compensation; every framework (the fitted maps: where residual_map
        runs).
    seed: seeds the random projections; each MoE layer derives its own from (seed, layer index).
    layers: ``"all"`` or a list of MoE layer indices (0-based, in model order) to compress.
    compress_in_eval: also compress in ``eval()`` mode (default: exact dispatch in eval).
    telemetry_interval: compute the residual-norm statistic every N steps (0: never); the cheap counters are
        kept every step.
    kernel: ``auto`` (Triton on CUDA when importable, else torch), ``torch`` (reference) or ``triton``.
    decide_by_cost: on each layer's first training step, time its stock exchange (all-to-all, experts, all-to-all;
        forward and input backward) against the compressed one and keep compression only where it is faster;
        the expert-parallel ranks agree on one decision per layer. For fast links (NVLink), where compression
        cannot always pay. DeepSpeed and AutoEP; refused with a named error for Megatron.
    refine_iterations: k-means (Lloyd) iterations that refine the LSH clusters of each expert before their
        centroids are sent: every token moves to the nearest centroid of its expert, then the centroids are
        recomputed. Same centroid budget, smaller residuals; 0 sends the LSH clusters as they are (the paper).
        DeepSpeed's fixed-capacity layer only (refused by name elsewhere).
    redraw_interval: draw new hash projections every N training steps (0: one fixed draw per layer for the whole
        run, as in the paper), so that the same tokens do not merge in every step. Steps are optimizer steps
        (`training_step`, kept by the DeepSpeed engine hooks or set with ``lshmoe_plugin.set_training_step``).
    exact_from_step: from this optimizer step on, the compressed layers run the stock exchange (None: never).
        Compression early, exact dispatch for the last part of the schedule.
    exact_token_stride: every N-th capacity slot of each expert also crosses the network uncompressed and takes
        its exact expert output (0: none); the slots rotate with the optimizer step and the micro-batch within it
        (`schedule.rotation`), so over N steps every slot's token is sent exactly once, and a recomputation under
        activation checkpointing or an evaluation sends the slots of the training forward it belongs to. The
        experts then learn from real tokens too, not only from centroids, for 1/N more bytes. DeepSpeed's
        fixed-capacity layer only (refused by name elsewhere).
    output_error_interval: every N training forwards of a layer, run the stock exchange on a sample of 1/16 of
        each expert's capacity slots as well and record the relative error of the layer's expert outputs against
        it, with and without error compensation (0: never). Costs one extra all-to-all of 1/16 of stock's bytes,
        counted in the telemetry's bytes_sent, and the experts' forward on those rows. DeepSpeed's fixed-capacity
        layer only (refused by name elsewhere).
    cuda_graphs: replay the compressor's stages (compress, expand, both backwards) as CUDA graphs captured once
        per layer and shape, instead of launching ~20 kernels per layer from Python. ``auto``: wherever that is
        possible, i.e. the fused kernels on CUDA with DeepSpeed's fixed-capacity layer, and up to 240 MiB of a
        layer's token rows, above which eager was measured faster (compressor.AUTO_MAX_TOKEN_BYTES);
        ``true``: wherever possible at any size, and an error where it is not; ``false``: eager. The variable
        layout (Megatron-core, AutoEP) syncs with the host once per layer and always runs eagerly.
    clustering: ``lsh`` (the paper: only centroids cross), ``none``: every token crosses as itself, and only the
        wire dtypes below change the all-to-all (FP8 with no clustering), or ``bounded``: error-bounded merging
        (lshmoe_plugin.bounded): a token shares a centroid only while its relative residual ||x - c|| / ||x|| stays
        within ``merge_tolerance``; every other token crosses as itself, so the rate is the data's. The hashing keys
        (num_hashes, hash_type, hash_dim, seed, redraw_interval) pick the candidate merges as for ``lsh``, and
        error_compensation applies to the merged tokens. DeepSpeed's fixed layout sends S slots per expert, S set
        between optimizer steps from the previous step's need (lshmoe_plugin.slot_budget: the first step sends every
        token, S = capacity); there ``compression_rate`` is the floor of S, ``ceil(rate * capacity)``. Megatron-core
        and AutoEP send each expert exactly the clusters its tokens need, and ``compression_rate`` plays no part.
        With ``bounded``, refine_iterations, residual_map, exact_token_stride and decide_by_cost (which times the
        first step, where every token crosses) must stay off; the merging runs eagerly (cuda_graphs ``auto``
        captures nothing, true is refused). With ``none`` the keys that configure clustering (CLUSTERING_KEYS)
        must keep their defaults.
    merge_tolerance: the bound on a merged token's relative residual ||x - c|| / ||x|| under clustering
        ``bounded``, in (0, 1) (default 0.1); refused with any other clustering unless left at its default. The
        bound holds for the clusters the merging forms; recomputing a centroid over its members can push a member
        slightly past it, and outliers that find no slot in a full budget are merged with the rest: the telemetry
        counts both (``merged_over_tolerance``, ``over_budget_tokens``).
    dispatch_dtype, combine_dtype: the wire format of the all-to-all to the experts and back (lshmoe_plugin.wire):
        ``model`` (the model's dtype, as the framework sends it), ``fp8_e4m3`` (float8 values with a scale per block),
        ``fp4_e2m1`` (OCP FP4 values, two per byte, with a scale per block) or ``fp6_e2m3`` (OCP FP6 values, four in
        three bytes, with a scale per block); values and scales in one uint8
        all-to-all. They apply to whatever crosses: centroids, or every token with clustering ``none``. DeepSpeed,
        Megatron-core and AutoEP.
    dispatch_grad_dtype, combine_grad_dtype: the format of the gradient that crosses back through the dispatch
        (resp. combine) all-to-all in the backward; None follows the forward's. Stage keys: every method sets them
        None but ``fp8_fwd_fp4_grad``, ``fp8_fwd_fp4sr_grad`` and ``fp6_fwd_fp4sr_grad`` (``fp4_e2m1``), and one
        given as its forward's format is stored as None.
    grad_rounding: how those gradients round to ``fp8_e4m3``, ``fp4_e2m1`` or ``fp6_e2m3``: ``nearest`` (the bits
        before the key existed) or ``stochastic``: up or down to a neighbour on the grid with the probabilities that
        make the rounding unbiased, E[Q(g)] = g, so that FP4's rounding bias does not accumulate over a long run
        (lshmoe_plugin.rounding; the uniforms hash each element's index with a per-format draw counter, never
        torch's generator, so the model's other random draws stay those of a stock run). The forward crossings
        always round to nearest. A stage key: the methods ``fp4_sr``, ``fp8_fwd_fp4sr_grad`` and
        ``fp6_fwd_fp4sr_grad`` (the default) round stochastically, every other method to nearest. A composition
        with a forward stage key left without it rounds to nearest; backward stage keys alone keep the default's
        stochastic rounding, unless no gradient is left in a scaled format (then nearest: nothing rounds). Given
        alone, it adjusts the default: ``"grad_rounding": "nearest"`` is the default's crossings rounded to nearest
        (``custom``). Stochastic is refused where no gradient crosses in a scaled format. On CUDA
        ``fp4_e2m1``'s fused encode rounds stochastically with the reference's bits; a
        stochastic ``fp8_e4m3`` or ``fp6_e2m3`` encode runs PyTorch's reference (their kernels round to nearest);
        decoding stays fused.
    fp8_block_size: elements per scale of ``fp8_e4m3`` (default 128, DeepSeek-V3's tile), or ``"row"``: one
        scale per row. A row's last block may be shorter.
    fp8_scale: how ``fp8_e4m3`` codes a scale: ``float32`` (amax / 448, 4 bytes) or ``e8m0`` (a power of two, one
        byte, as OCP MX formats; up to one binade of e4m3's range unused per block).
    fp4_block_size, fp4_scale: the same for ``fp4_e2m1``, defaults 32 and ``e8m0`` (OCP MXFP4). Each format has keys
        of its own because their defaults differ; a block or scale key is refused unless a crossing uses its format.
    fp6_block_size, fp6_scale: the same for ``fp6_e2m3`` (OCP FP6 E2M3, four values in three bytes), defaults 32 and
        ``e8m0`` (OCP MXFP6). Fused on CUDA as the others (kernels/wire_fp6_triton.py).
    """

    enabled: bool = False
    method: Optional[str] = None
    compression_rate: float = 0.2
    num_hashes: int = 6
    hash_type: str = "cross_polytope"
    hash_dim: int = 8
    error_compensation: bool = True
    seed: int = 1234
    layers: Union[str, Tuple[int, ...]] = "all"
    compress_in_eval: bool = False
    telemetry_interval: int = 10
    kernel: str = "auto"
    decide_by_cost: bool = False
    cuda_graphs: Union[str, bool] = "auto"
    residual_map: str = "identity"
    residual_grad: str = "pass"
    refine_iterations: int = 0
    redraw_interval: int = 0
    exact_from_step: Optional[int] = None
    exact_token_stride: int = 0
    output_error_interval: int = 0
    # the stage keys (lshmoe_plugin.methods.STAGE_KEYS): None until resolved from `method`, except the backward
    # formats, whose None after resolution means "as the forward"
    clustering: Optional[str] = None
    merge_tolerance: float = 0.1
    dispatch_dtype: Optional[str] = None
    combine_dtype: Optional[str] = None
    dispatch_grad_dtype: Optional[str] = None
    combine_grad_dtype: Optional[str] = None
    grad_rounding: Optional[str] = None
    fp8_block_size: Union[str, int] = 128
    fp8_scale: str = "float32"
    fp4_block_size: Union[str, int] = 32
    fp4_scale: str = "e8m0"
    fp6_block_size: Union[str, int] = 32
    fp6_scale: str = "e8m0"

    def __post_init__(self) -> None:
        _check_type("enabled", self.enabled, bool)
        self._resolve_method()
        _check_type("error_compensation", self.error_compensation, bool)
        _check_type("compress_in_eval", self.compress_in_eval, bool)
        _check_type("decide_by_cost", self.decide_by_cost, bool)
        rate = self.compression_rate
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not (0.0 < rate <= 1.0):
            raise LSHMoEConfigError(f"lsh_moe.compression_rate must be a number in (0, 1], got {rate!r}")
        object.__setattr__(self, "compression_rate", float(rate))
        for key, low in (("num_hashes", 1), ("hash_dim", 1), ("telemetry_interval", 0), ("refine_iterations", 0),
                         ("redraw_interval", 0), ("output_error_interval", 0), ("exact_token_stride", 0)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise LSHMoEConfigError(f"lsh_moe.{key} must be an integer >= {low}, got {value!r}")
        _check_type("seed", self.seed, int)
        step = self.exact_from_step
        if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 0):
            raise LSHMoEConfigError(f"lsh_moe.exact_from_step must be null or an integer >= 0, got {step!r}")
        if self.hash_type not in HASH_TYPES:
            raise LSHMoEConfigError(f"lsh_moe.hash_type must be one of {list(HASH_TYPES)}, got {self.hash_type!r}")
        if self.residual_map not in RESIDUAL_MAPS:
            raise LSHMoEConfigError(f"lsh_moe.residual_map must be one of {list(RESIDUAL_MAPS)}, got "
                                    f"{self.residual_map!r}")
        if self.residual_map != "identity" and not self.error_compensation:
            raise LSHMoEConfigError(f"lsh_moe.residual_map={self.residual_map!r} maps the residual that error "
                                    f"compensation adds; with error_compensation false allowed: 'identity'")
        if self.residual_grad not in RESIDUAL_GRADS:
            raise LSHMoEConfigError(f"lsh_moe.residual_grad must be one of {list(RESIDUAL_GRADS)}, got "
                                    f"{self.residual_grad!r}")
        if self.residual_grad == "through_map" and self.residual_map == "identity":
            raise LSHMoEConfigError("lsh_moe.residual_grad='through_map' differentiates the fitted residual map, "
                                    "and residual_map 'identity' fits none; allowed with it: residual_map "
                                    "'diagonal' or 'linear'")
        if self.residual_grad != "pass" and not self.error_compensation:
            raise LSHMoEConfigError(f"lsh_moe.residual_grad={self.residual_grad!r} stops the gradient of the "
                                    f"residual that error compensation adds; with error_compensation false "
                                    f"allowed: 'pass'")
        if self.kernel not in KERNELS:
            raise LSHMoEConfigError(f"lsh_moe.kernel must be one of {list(KERNELS)}, got {self.kernel!r}")
        if not (isinstance(self.cuda_graphs, bool) or self.cuda_graphs == "auto"):
            raise LSHMoEConfigError(f"lsh_moe.cuda_graphs must be one of ['auto', true, false], got "
                                    f"{self.cuda_graphs!r}")
        if self.cuda_graphs is True and self.kernel == "torch":
            raise LSHMoEConfigError("lsh_moe.cuda_graphs=true replays the fused kernels and needs kernel 'auto' or "
                                    "'triton', got kernel 'torch'; allowed with kernel 'torch': cuda_graphs 'auto' "
                                    "or false")
        self._check_wire()
        bits = self.num_hashes * self.code_bits_per_hash
        if bits > _MAX_CODE_BITS:
            raise LSHMoEConfigError(
                f"lsh_moe.num_hashes={self.num_hashes} with hash_dim={self.hash_dim} needs {bits} bits of bucket key; "
                f"allowed: num_hashes * ceil(log2(2 * hash_dim)) <= {_MAX_CODE_BITS}")
        object.__setattr__(self, "layers", _parse_layers(self.layers))

    def _resolve_method(self) -> None:
        # Whether the default method filled the stages in: a disabled block that names no method may still carry
        # the LSH knobs of a block written for the paper's layer (the default until 2026-12-05); off, it trains
        # nothing, so those are not refused until it is turned on (from_dict, load_config or a replace).
        by_default = self.method in (None, CUSTOM) and all(getattr(self, key) is None for key in STAGE_KEYS)
        object.__setattr__(self, "_stages_by_default", by_default)
        try:
            name, stages = resolve(self.method, {key: getattr(self, key) for key in STAGE_KEYS})
        except MethodError as error:
            raise LSHMoEConfigError(str(error)) from None
        object.__setattr__(self, "method", name)
        for key, value in stages.items():
            object.__setattr__(self, key, value)

    def _check_wire(self) -> None:
        if self.clustering not in CLUSTERINGS:
            raise LSHMoEConfigError(f"lsh_moe.clustering must be one of {list(CLUSTERINGS)}, got {self.clustering!r}")
        for key in ("dispatch_dtype", "combine_dtype"):
            if getattr(self, key) not in WIRE_DTYPES:
                raise LSHMoEConfigError(f"lsh_moe.{key} must be one of {list(WIRE_DTYPES)}, got "
                                        f"{getattr(self, key)!r}")
        for key in ("dispatch_grad_dtype", "combine_grad_dtype"):
            if getattr(self, key) is not None and getattr(self, key) not in WIRE_DTYPES:
                raise LSHMoEConfigError(f"lsh_moe.{key} must be null (as the forward) or one of {list(WIRE_DTYPES)}, "
                                        f"got {getattr(self, key)!r}")
        self._check_grad_rounding()
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        self._check_format_keys(defaults)
        self._check_bounded(defaults)
        if self.clustering == "none" and (self.enabled or not self._stages_by_default):
            for key in CLUSTERING_KEYS:
                if getattr(self, key) != defaults[key]:
                    raise LSHMoEConfigError(f"lsh_moe.{key}={getattr(self, key)!r} belongs to LSH clustering, which "
                                            f"clustering 'none' turns off; allowed with clustering 'none': {key} "
                                            f"{defaults[key]!r} (or leave it out). Method {self.method!r} sends "
                                            f"every token{DEFAULT_NOTE if self.method == DEFAULT_METHOD else ''}; "
                                            f"for the paper's LSH clustering set method 'paper'")

    def _check_grad_rounding(self) -> None:
        if self.grad_rounding not in ROUNDINGS:
            raise LSHMoEConfigError(f"lsh_moe.grad_rounding must be one of {list(ROUNDINGS)}, got "
                                    f"{self.grad_rounding!r}")
        gradients = (self.wire_dtypes[1], self.wire_dtypes[3])
        if self.grad_rounding == "stochastic" and all(dtype not in FORMAT_KEYS for dtype in gradients):
            rounding = [m.name for m in METHODS.values() if m.stages["grad_rounding"] == "stochastic"]
            raise LSHMoEConfigError(
                f"lsh_moe.grad_rounding='stochastic' rounds gradients that cross in {list(FORMAT_KEYS)}, and no "
                f"backward crossing uses one: nothing would change (dispatch_grad_dtype and combine_grad_dtype, "
                f"as their forwards' dispatch_dtype and combine_dtype when null: {list(gradients)}); set one of "
                f"them to a scaled format, set a method whose gradients round so ({', '.join(map(repr, rounding))}) "
                f"instead, or leave grad_rounding out (with no method named, a forward stage key given makes the stage "
                f"keys left out the paper's)")

    def _check_format_keys(self, defaults: Mapping[str, Any]) -> None:
        """Each scaled format's block and scale keys: valid values, and left at their defaults unless a crossing
        uses the format."""
        for fmt, (block_key, scale_key) in FORMAT_KEYS.items():
            block = getattr(self, block_key)
            if block != "row" and (isinstance(block, bool) or not isinstance(block, int) or block < 1):
                raise LSHMoEConfigError(f'lsh_moe.{block_key} must be "row" or an integer >= 1, got {block!r}')
            if getattr(self, scale_key) not in SCALES:
                raise LSHMoEConfigError(f"lsh_moe.{scale_key} must be one of {list(SCALES)}, got "
                                        f"{getattr(self, scale_key)!r}")
            for key in (block_key, scale_key):
                if getattr(self, key) != defaults[key] and fmt not in self.wire_dtypes:
                    raise LSHMoEConfigError(
                        f"lsh_moe.{key}={getattr(self, key)!r} sets the scales of {fmt}, which no crossing uses "
                        f"(dispatch/combine dtypes and their grad dtypes: {list(self.wire_dtypes)}); set one of them "
                        f"to {fmt!r}, or leave {key} out")

    def _check_bounded(self, defaults: dict) -> None:
        tolerance = self.merge_tolerance
        if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not (0.0 < tolerance < 1.0):
            raise LSHMoEConfigError(f"lsh_moe.merge_tolerance must be a number in (0, 1), got {tolerance!r}")
        object.__setattr__(self, "merge_tolerance", float(tolerance))
        if self.clustering != "bounded":
            if self.merge_tolerance != defaults["merge_tolerance"]:
                raise LSHMoEConfigError(f"lsh_moe.merge_tolerance={self.merge_tolerance!r} belongs to clustering "
                                        f"'bounded', got clustering {self.clustering!r}; set clustering 'bounded', "
                                        f"or leave merge_tolerance out")
            return
        for key, off in UNBOUNDED_KEYS:
            if getattr(self, key) != off:
                raise LSHMoEConfigError(f"lsh_moe.{key}={getattr(self, key)!r} is not supported with clustering "
                                        f"'bounded'; allowed there: {key} {off!r} (or leave it out)")
        if self.cuda_graphs is True:
            raise LSHMoEConfigError("lsh_moe.cuda_graphs=true is not supported with clustering 'bounded' (its "
                                    "merging runs eagerly); allowed there: cuda_graphs 'auto' or false")

    @property
    def wire_dtypes(self) -> Tuple[str, ...]:
        """The formats of the four crossings: dispatch, its gradient, combine, its gradient."""
        return (self.dispatch_dtype, self.dispatch_grad_dtype or self.dispatch_dtype, self.combine_dtype,
                self.combine_grad_dtype or self.combine_dtype)

    @property
    def family(self) -> HashFamily:
        return HASH_FAMILIES[self.hash_type]

    @property
    def code_bits_per_hash(self) -> int:
        return self.family.code_bits(self.hash_dim)

    @property
    def max_experts(self) -> int:
        """Most experts one layer may have: the bucket key ``expert << code bits | code`` and the sentinel one past
        the last expert must fit a signed int64."""
        return (2**63 - 1) >> (self.num_hashes * self.code_bits_per_hash)

    def applies_to_layer(self, layer_index: int) -> bool:
        return self.layers == "all" or layer_index in self.layers

    @classmethod
    def from_dict(cls, block: Optional[Mapping[str, Any]], *,
                  env: Optional[Mapping[str, str]] = None) -> "LSHMoEConfig":
        """Build from the ``lsh_moe`` block itself; ``None`` means no block (disabled unless the env var says so)."""
        block = dict(block or {})
        allowed = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(block) - set(allowed))
        if unknown:
            raise LSHMoEConfigError(f"unknown lsh_moe key(s) {unknown}; allowed keys: {allowed}")
        override = _enabled_from_env(os.environ if env is None else env)
        if override is not None:
            block["enabled"] = override
        _refuse_unnamed_lsh(block)
        return cls(**block)

    @classmethod
    def from_deepspeed_config(cls, config: Union[str, os.PathLike, Mapping[str, Any], None], *,
                              env: Optional[Mapping[str, str]] = None) -> "LSHMoEConfig":
        """Read the ``lsh_moe`` block from a DeepSpeed JSON config given as a path or an already-loaded dict."""
        if config is None:
            return cls.from_dict(None, env=env)
        if isinstance(config, (str, os.PathLike)):
            with open(config) as f:
                config = json.load(f)
        if not isinstance(config, Mapping):
            raise LSHMoEConfigError(f"expected a DeepSpeed config path or dict, got {type(config).__name__}")
        block = config.get(CONFIG_BLOCK)
        if block is not None and not isinstance(block, Mapping):
            raise LSHMoEConfigError(f"'{CONFIG_BLOCK}' must be a JSON object, got {type(block).__name__}")
        return cls.from_dict(block, env=env)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["layers"] = self.layers if self.layers == "all" else list(self.layers)
        return out


def _refuse_unnamed_lsh(block: Mapping[str, Any]) -> None:
    """A user's block that turns compression on, names neither a method nor a stage key, and lists keys of LSH
    clustering was written for the paper's layer (the default until 2026-12-05): refused by name, rather than
    trained as the default method with those keys ignored. Only the block as read: a resolved config written back
    (run.json, a checkpoint's settings, `to_dict`) always names its method."""
    if block.get("enabled") is not True or block.get("method") is not None:
        return
    if any(block.get(key) is not None for key in STAGE_KEYS):
        return
    listed = [key for key in CLUSTERING_KEYS if key in block]
    if listed:
        raise LSHMoEConfigError(
            f"lsh_moe.{listed[0]} configures LSH clustering, but the block names no method, and without one it "
            f"trains the default method {DEFAULT_METHOD!r}{DEFAULT_NOTE}, which sends every token and clusters "
            f"nothing; allowed: add \"method\": \"paper\" for the paper's LSH-MoE (the default until 2026-12-05), "
            f"or leave out {', '.join(listed)}")


def _check_type(key: str, value: Any, kind: type) -> None:
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        raise LSHMoEConfigError(f"lsh_moe.{key} must be a {kind.__name__}, got {value!r}")


def _parse_layers(layers: Any) -> Union[str, Tuple[int, ...]]:
    if layers == "all":
        return "all"
    if isinstance(layers, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                                 for i in layers):
        return tuple(sorted(set(layers)))
    raise LSHMoEConfigError(f'lsh_moe.layers must be "all" or a list of MoE layer indices >= 0, got {layers!r}')


def _enabled_from_env(env: Mapping[str, str]) -> Optional[bool]:
    raw = env.get(ENABLED_ENV_VAR)
    if raw is None or raw == "":
        return None
    word = raw.strip().lower()
    if word in _TRUE_WORDS:
        return True
    if word in _FALSE_WORDS:
        return False
    raise LSHMoEConfigError(f"{ENABLED_ENV_VAR}={raw!r}: allowed values are {list(_TRUE_WORDS + _FALSE_WORDS)}")
