"""Weight-only quantization of a trained model for inference.

`quantize(model, "int8" | "int4")` swaps the matmul weights of every block (and the output projection) for
quantized copies in place; norms, the embedding table and the MoE router stay float. Decoding one token reads
every weight once, so it is bound by memory bandwidth: storing weights in 8 or 4 bits makes it faster provided the
matmul reads the narrow weights directly instead of widening them first. PyTorch ships such kernels:

- int8: `aten._weight_int8pack_mm(x [M, K], w int8 [N, K], scales [N])` = x @ (w * scales[:, None]).T, one scale
  per output channel, symmetric. x must be 2-D and contiguous, and scales must have x's dtype.
- int4: tinygemm. Weights are quantized asymmetrically in groups of `group_size` along the input dimension, to
  q in [0, 15] with w = (q - 8) * scale + zero, where `zero` lives in the float domain (not an integer offset).
  `scales_and_zeros` is [K / group_size, N, 2]. On CPU, `_convert_weight_to_int4pack_for_cpu` takes q as int32
  [N, K] and `_weight_int4pack_mm_for_cpu` takes a 2-D contiguous x with scales_and_zeros of x's dtype; N must be
  a multiple of 16 and group_size one of 32, 64, 128, 256. On CUDA, `_convert_weight_to_int4pack` takes two
  values per uint8 byte (even k in the high nibble) and `_weight_int4pack_mm` wants bf16 and N a multiple of 8.

Which dtype each CPU path computes in is chosen per CPU when the layer is built (`cpu_plan`), from one thread's
timings at decode shapes (PyTorch 2.13, d_model 512-768 layers; AVX512 = an AMD EPYC with AVX512-BF16, AVX2 = the
same machine with `ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2`, bench/decode.py):

- The kernels accept fp32, fp16 and bf16 activations but vectorise only bf16, on both AVX512 and AVX2 builds (the
  AVX2 one widens bf16 with integer shifts, so it needs no native bf16): given fp32 they run 10-30x slower than a
  plain fp32 matmul on either. So the kernels always take bf16 on CPU and the result is cast back; the rounding this
  adds is small next to the weight quantization error. At 1 row and bf16 activations, against the fp32 matmul: on
  layers too big for the cache (a 768 -> 6144 one, the 8192-row output projection) int8 is 1.7-2x faster on both,
  int4 2.1x on AVX512 and 1.0-1.4x on AVX2; on cache-sized ones (512 -> 1024) int8 is level on AVX2 and 1.4x on
  AVX512, int4 1.5x on AVX512 but 0.6x on AVX2, whose int4 kernel is compute-bound.
- The int8 kernel is tuned for decode (a few rows); for many rows (prefill) widening the weights for the ordinary
  matmul is faster, in bf16 where the CPU has native bf16 matmuls (2-3x faster than fp32 there) and in fp32 where
  it has not (bf16 matmuls are emulated: 3x slower than fp32).
- torchao's CPU int4/int8 weight-only layouts call these same aten kernels, so it offers no faster path here.

Off CPU, int8 layers widen the weights to the activations' dtype: the pattern gpt-fast relies on and
`torch.compile` fuses (the CUDA build of the int8 op is a naive kernel, slower than cuBLAS).

Packed int4 layouts depend on the device (and on CPU the instruction set), so quantize after moving the model to
the device it will run on, and never save packed weights: quantize at load time. The int4 group size adapts to a
layer's in-features (the asked one, else the next smaller of 128, 64, 32 that divides them); a layer the int4
kernel cannot take at all (in-features not a multiple of 32, out-features off the tile size, a device without the
kernel) is stored as int8 instead. `model.quant_report` names every such layer with the reason, and
`report_lines` words it for the commands' output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fermion.device import resolve_precision
from fermion.model.moe import MoEFeedForward
from fermion.model.transformer import Transformer

MODES = ("none", "int8", "int4")
INT4_GROUP_SIZES = (32, 64, 128, 256)  # the only group sizes the tinygemm kernels are built for
# Rows at which widening int8 weights for the ordinary matmul catches up with the CPU int8 kernel (one thread, a
# 512 -> 2816 layer, kernel vs widened: 1 row 0.04 vs 0.26 ms, 16 rows 0.33 vs 0.34, 512 rows 10.6 vs 3.7).
KERNEL_MAX_ROWS = 16


def cpu_plan() -> dict[str, str]:
    """What this CPU's quantized layers compute in (the module docstring has the measurements behind it)."""
    native_bf16 = resolve_precision("auto", torch.device("cpu")) == "bf16"
    return {"capability": torch.backends.cpu.get_cpu_capability(), "native_bf16": "yes" if native_bf16 else "no",
            "kernel": "bf16", "prefill": "bf16" if native_bf16 else "fp32"}


def quantize(model: Transformer, mode: str, *, group_size: int = 128, say=None) -> Transformer:
    """Convert `model` in place for inference and return it; `model.quant_report` says what became what, and
    `say`, when given, hears it in words (`report_lines`): a command prints it, so no layer is left int8 silently.

    The report is {"mode", "group_size", "cpu": cpu_plan() (on CPU), "layers": {name: "int8" | "int4" | "float"},
    "group_sizes": {int4 name: group size}, "adapted": {name: why its group size is not the asked one},
    "fallbacks": {name: why it is int8 although int4 was asked}}.
    """
    if mode not in MODES:
        raise ValueError(f"unknown quantization mode {mode!r}; valid modes: {', '.join(MODES)}")
    if mode == "none":
        return model
    if hasattr(model, "quant_report"):
        raise ValueError("model is already quantized; quantize a float model")
    if mode == "int4" and group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"int4 group_size must be one of {INT4_GROUP_SIZES} (the kernels' choices), got {group_size}")
    report = {"mode": mode, "group_size": group_size, "layers": {}, "group_sizes": {}, "adapted": {},
              "fallbacks": {}}
    if model.tok_emb.weight.device.type == "cpu":
        report["cpu"] = cpu_plan()

    def convert(weight: torch.Tensor, name: str) -> nn.Module:
        layer, why = _quantized_linear(weight, mode, group_size)
        if isinstance(layer, Int4Linear):
            report["layers"][name], report["group_sizes"][name] = "int4", layer.group_size
            if why:
                report["adapted"][name] = why
        else:
            report["layers"][name] = "int8"
            if why:
                report["fallbacks"][name] = why
        return layer

    with torch.no_grad():
        # Listed first because the walk swaps modules in the tree it walks.
        for name, module in list(model.blocks.named_modules()):
            parent_name, _, child = name.rpartition(".")
            parent, full_name = model.blocks.get_submodule(parent_name), f"blocks.{name}"
            if isinstance(module, MoEFeedForward):
                quantize_experts(module, convert, full_name)
                report["layers"][f"{full_name}.router"] = "float"
            elif isinstance(module, nn.Linear) and child != "router":
                setattr(parent, child, convert(module.weight, full_name))
        # Tied or not, the projection gets its own quantized copy; the embedding lookup keeps the float table.
        model.lm_head = convert(model.output_weight(), "lm_head")
    model.quant_report = report
    for line in report_lines(report) if say else ():
        say(line)
    return model


def report_lines(report: dict) -> list[str]:
    """The report in words for a command's output: what was done, then every layer not quantized as asked, with
    the reason (layers sharing a reason on one line, block indices collapsed: blocks.0-7.ffn.w_down)."""
    kinds = list(report["layers"].values())
    counts = ", ".join(f"{kinds.count(kind)} {kind}" for kind in ("int4", "int8", "float") if kind in kinds)
    asked = f"int4, group size {report['group_size']}" if report["mode"] == "int4" else report["mode"]
    head = f"quantized ({asked}): {counts} layers"
    if "cpu" in report:
        cpu = report["cpu"]
        head += (f" · CPU {cpu['capability']}, native bf16 {cpu['native_bf16']}: kernels take {cpu['kernel']}, "
                 f"prefill matmuls {cpu['prefill']}")
    lines = [head]
    for what, notes in (("int4 with a smaller group size", report["adapted"]),
                        ("int8 instead of int4", report["fallbacks"])):
        by_reason: dict[str, list[str]] = {}
        for name, why in notes.items():
            by_reason.setdefault(why, []).append(name)
        lines += [f"  {what}: {_collapse(names)}: {why}" for why, names in by_reason.items()]
    return lines


def _collapse(names: list[str]) -> str:
    """blocks.0.x, blocks.1.x, blocks.2.x -> blocks.0-2.x (runs of consecutive block indices), other names as
    they are, in the order first seen."""
    indices: dict[str, list[int]] = {}  # a name with its block index left out ("blocks.{}.x") -> the indices
    for name in names:
        head, _, tail = name.partition(".")
        index, _, inner = tail.partition(".")
        block = head == "blocks" and index.isdigit()
        indices.setdefault(f"blocks.{{}}.{inner}" if block else name, []).extend([int(index)] if block else [])
    out = []
    for pattern, found in indices.items():
        if not found:
            out.append(pattern)
            continue
        start = found[0]
        for prev, cur in zip(found, found[1:] + [None], strict=True):
            if cur != prev + 1:
                out.append(pattern.format(start if start == prev else f"{start}-{prev}"))
                start = cur
    return ", ".join(out)


def quantized_bytes(module: nn.Module) -> int:
    """Bytes of the weights as stored: parameters and persistent buffers, shared storage counted once."""
    storages = {}
    for tensor in module.state_dict().values():
        storage = tensor.untyped_storage()
        storages[(tensor.device, storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())


def _quantized_linear(weight: torch.Tensor, mode: str, group_size: int) -> tuple[nn.Module, str | None]:
    """A float [N, K] weight -> (quantized layer, a note): for an int4 layer, why its group size is smaller than
    the asked one; for an int8 layer, why it is not int4 although int4 was asked; else None."""
    if mode != "int4":
        return Int8Linear(weight), None
    group = int4_group_size(weight.shape[1], group_size)
    if group is None:
        smallest = min(INT4_GROUP_SIZES)
        why_not = f"in-features {weight.shape[1]} not a multiple of {smallest}, the smallest int4 group size"
    else:
        why_not = int4_unsupported(weight, group)
    if why_not is None:
        layer = Int4Linear(weight, group)
        why_not = _int4_disagrees(layer, weight)
        if why_not is None:
            adapted = f"group size {group}: in-features {weight.shape[1]} not a multiple of {group_size}"
            return layer, None if group == group_size else adapted
    return Int8Linear(weight), why_not


def int4_group_size(in_features: int, asked: int) -> int | None:
    """The largest int4 group size up to the asked one that divides the in-features (128 -> 64 -> 32), or None."""
    return next((g for g in sorted(INT4_GROUP_SIZES, reverse=True) if g <= asked and in_features % g == 0), None)


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # A cast only when needed: on a tiny model's decode step even a no-op `.to` is a measurable share of the time.
    return t if t.dtype == dtype else t.to(dtype)


_INT8_MM = torch.ops.aten._weight_int8pack_mm.default  # the overload itself: a shorter call than the packet's
_INT4_MM_CPU = torch.ops.aten._weight_int4pack_mm_for_cpu.default


# ------------------------------------------------------------------------------------------------------------ int8


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float [N, K] -> (int8 [N, K], fp32 scales [N]): symmetric, one scale per output channel."""
    w = weight.float().contiguous()  # expert weights arrive as transposed views; the kernel wants rows
    # [-127, 127] so that negating a weight never clips; an all-zero row keeps a usable scale.
    scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127
    return (w / scales[:, None]).round().clamp(-127, 127).to(torch.int8), scales


class Int8Linear(nn.Module):
    """A bias-free Linear whose weight is int8 with one scale per output channel."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        qweight, scales = quantize_int8(weight)
        self.register_buffer("qweight", qweight)
        on_cpu = weight.device.type == "cpu"
        # The scales are kept in the dtype the kernel computes in (bf16 on CPU, see the module docstring); the
        # widened matmul of many rows runs in the CPU's fast float dtype, elsewhere in the model's.
        self.register_buffer("scales", scales.to(torch.bfloat16 if on_cpu else weight.dtype))
        self.widened_dtype = (torch.bfloat16 if cpu_plan()["prefill"] == "bf16" else torch.float32) if on_cpu \
            else weight.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2d = x.reshape(-1, x.shape[-1])
        if x2d.shape[0] < KERNEL_MAX_ROWS and x.device.type == "cpu":
            y = _INT8_MM(_as(x2d, self.scales.dtype).contiguous(), self.qweight, self.scales)
        else:
            y = F.linear(_as(x2d, self.widened_dtype), self.qweight.to(self.widened_dtype)) * self.scales
        return _as(y, x.dtype).view(*x.shape[:-1], -1)


# ------------------------------------------------------------------------------------------------------------ int4


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float [N, K] -> (q int32 [N, K] in [0, 15], scales [N, K/g], zeros [N, K/g]), all in fp32.

    Asymmetric min/max per group, so all 16 levels are used: w ~ q * scale + min = (q - 8) * scale + zero with
    zero = min + 8 * scale, the float-domain zero point the kernels expect.
    """
    n, k = weight.shape
    w = weight.float().contiguous().view(n, k // group_size, group_size)
    low, high = w.amin(dim=-1), w.amax(dim=-1)
    scales = ((high - low) / 15).clamp(min=1e-12)
    q = ((w - low[..., None]) / scales[..., None]).round().clamp(0, 15).to(torch.int32)
    return q.view(n, k), scales, low + 8 * scales


def dequantize_int4(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    expand = lambda t: t.repeat_interleave(group_size, dim=1)
    return (q.float() - 8) * expand(scales) + expand(zeros)


def int4_unsupported(weight: torch.Tensor, group_size: int) -> str | None:
    """Why the int4 kernel of the weight's device cannot take this [N, K] weight, or None when it can."""
    n, k = weight.shape
    n_tile = {"cpu": 16, "cuda": 8}.get(weight.device.type)
    if n_tile is None:
        return f"no int4 kernel on {weight.device.type}"
    if k % group_size:
        return f"in-features {k} not a multiple of group_size {group_size}"
    if n % n_tile:
        return f"out-features {n} not a multiple of {n_tile}"
    return None


class Int4Linear(nn.Module):
    """A bias-free Linear whose weight is packed int4 for the tinygemm kernel of the device it was built on."""

    def __init__(self, weight: torch.Tensor, group_size: int):
        super().__init__()
        self.group_size, self.out_features, self.packed_for = group_size, weight.shape[0], weight.device.type
        q, scales, zeros = quantize_int4(weight, group_size)
        # bf16 on both devices: CUDA's tinygemm takes nothing else, the CPU one vectorises nothing else.
        self.register_buffer("scales_and_zeros", torch.stack([scales.t(), zeros.t()], dim=-1).to(torch.bfloat16))
        self.register_buffer("packed", self._pack(q))

    def _pack(self, q: torch.Tensor) -> torch.Tensor:
        if self.packed_for == "cpu":
            return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)  # the CPU packing ignores inner k-tiles
        # Untested (no GPU here): the byte layout and arguments follow aten's tinygemm source, and `_int4_disagrees`
        # checks the result against the dequantised weights at conversion, falling back to int8 if it differs.
        k = q.shape[1]
        inner_k_tiles = 8 if k % 128 == 0 else 4 if k % 64 == 0 else 2
        pairs = (q[:, 0::2] << 4 | q[:, 1::2]).to(torch.uint8)
        return torch.ops.aten._convert_weight_to_int4pack(pairs.contiguous(), inner_k_tiles)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != self.packed_for:
            raise RuntimeError(f"int4 weights were packed for {self.packed_for}, the input is on {x.device.type}: "
                               "quantize after moving the model")
        x2d = _as(x.reshape(-1, x.shape[-1]), torch.bfloat16).contiguous()
        if self.packed_for == "cpu":
            y = _INT4_MM_CPU(x2d, self.packed, self.group_size, self.scales_and_zeros)
        else:
            y = torch.ops.aten._weight_int4pack_mm(x2d, self.packed, self.group_size, self.scales_and_zeros)
        return _as(y, x.dtype).view(*x.shape[:-1], self.out_features)


def _int4_disagrees(layer: Int4Linear, weight: torch.Tensor) -> str | None:
    """Run the kernel once against the dequantised weights, so a device whose kernel misbehaves gets int8."""
    reference_weight = dequantize_int4(*quantize_int4(weight, layer.group_size), layer.group_size)
    x = torch.randn(2, weight.shape[1], device=weight.device, generator=torch.Generator(weight.device).manual_seed(0))
    try:
        got = layer(x).float()
    except (RuntimeError, NotImplementedError) as err:
        return f"int4 kernel failed: {str(err).splitlines()[0]}"
    expected = x @ reference_weight.t()
    error = ((got - expected).abs().max() / expected.abs().max().clamp(min=1e-12)).item()
    # bf16 activations and tables account for ~1e-2; a wrong layout gives errors of order 1.
    return None if error < 5e-2 else f"int4 kernel disagrees with the dequantised weights (relative error {error:.2g})"


# ------------------------------------------------------------------------------------------------------------- MoE


def quantize_experts(moe: MoEFeedForward, convert, name: str) -> MoEFeedForward:
    """Replace an MoE layer's float expert stacks with one quantized layer per expert matmul, in place; its own
    forward then runs the experts one at a time through those layers. The router stays float.

    The router is d_model x n_experts, a sliver of the weights, and its output is a discrete top-k choice:
    quantization noise near a tie would send a token to another expert, a far larger change than the weight error
    itself (AutoAWQ and vLLM leave MoE gates unquantized for the same reason).
    """
    for stack_name in ("w_gate_up", "w_down"):
        stack = getattr(moe, stack_name)
        delattr(moe, stack_name)  # a parameter's name takes no module until the parameter is gone
        # The float stacks are [expert, in, out]; quantized layers take [out, in] and scale per output channel.
        setattr(moe, stack_name, nn.ModuleList(convert(w.t(), f"{name}.{stack_name}.{e}") for e, w in enumerate(stack)))
    return moe
