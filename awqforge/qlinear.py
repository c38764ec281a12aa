"""QuantLinear: a linear layer holding packed integer weights, run by our kernels.

Buffers (what state_dict holds):
- 4-bit with out_features % 8 == 0: the AWQ "gemm" tensors, exactly as an AutoAWQ/vLLM checkpoint
  names and lays them out: qweight int32 [in, out/8], qzeros int32 [in/g, out/8], scales [in/g, out]
  (in the layer's dtype; fp16 in AWQ checkpoints) (+ bias).
- any other case ("dense"): qweight int32 [out, ceil(in*bits/32)] (compressed-tensors' bit order,
  unsigned codes), qzeros uint8 [out, in/g], scales [out, in/g] (+ bias).

One copy of the weights: a 4-bit layer on the CPU holds them only in the C++ kernel's layout
(`packing.pack_cpu_w4`: non-persistent buffers `qdata`, `params`; the buffers above are None), packed
when the weights arrive (load_quantized, load_state_dict, .to("cpu")), never at the first forward.
Its state_dict still holds the checkpoint tensors above, rebuilt from that layout on demand, and
moving it to another device turns it back into them first.

forward(x) dispatches on x's device:
- CPU, 4-bit: the C++ kernel (awqforge.kernels.cpu) on that layout; fp32/bf16/fp16 x, computed in
  fp32.
- CUDA, 4-bit AWQ layout, fp16/bf16 x, group size divisible by 16: the Triton W4A16 kernel.
- everything else (2/3/8 bits, fp32 on CUDA, a CPU kernel that failed to build, AWQFORGE_KERNELS=0):
  `reference_forward`, a pure-torch dequantize + matmul. A 4-bit CPU forward without the kernel warns
  once and records why (`cpu_reference_reason()`: the job's report and model card say so). QuantLinear
  never compiles: the CLI and a worker build the kernel at start-up (kernels.cpu.ensure_built).
"""

from __future__ import annotations

import math
import os
import warnings

import torch
import torch.nn as nn

from awqforge import packing
from awqforge.quant import QuantizedTensor, effective_group_size, quantize_tensor

_warned: set[str] = set()
_cpu_reference: list[str] = []  # why a 4-bit CPU forward of this process ran the reference (first reason)


def cpu_reference_reason() -> str | None:
    """Why 4-bit layers of this process ran on the CPU through the pure-torch reference, None if none did
    (the job's report and model card say so)."""
    return _cpu_reference[0] if _cpu_reference else None


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def kernels_enabled() -> bool:
    return os.environ.get("AWQFORGE_KERNELS", "1") != "0"


class QuantLinear(nn.Module):
    """y = x . W^T + b with W stored as group-quantized integer codes (see module docstring)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int = 4,
        group_size: int = 128,
        bias: bool = False,
        dtype: torch.dtype = torch.float16,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if not 2 <= bits <= 8:
            raise ValueError(f"bits must be in [2, 8], got {bits}")
        g = effective_group_size(in_features, group_size)
        if in_features % g:
            raise ValueError(f"group size {g} does not divide in_features {in_features}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.dtype = bits, group_size, dtype
        self.use_kernel = True  # False: always reference_forward
        n_groups = in_features // g
        self.layout = "awq_gemm" if bits == 4 and out_features % 8 == 0 else "dense"
        if self.layout == "awq_gemm":
            shapes = {"qweight": (in_features, out_features // 8), "qzeros": (n_groups, out_features // 8)}
            zdtype, sshape = torch.int32, (n_groups, out_features)
        else:
            shapes = {
                "qweight": (out_features, math.ceil(in_features * bits / 32)),
                "qzeros": (out_features, n_groups),
            }
            zdtype, sshape = torch.uint8, (out_features, n_groups)
        self.register_buffer("qweight", torch.zeros(shapes["qweight"], dtype=torch.int32, device=device))
        self.register_buffer("qzeros", torch.zeros(shapes["qzeros"], dtype=zdtype, device=device))
        self.register_buffer("scales", torch.zeros(sshape, dtype=dtype, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.bias = None
        self.register_buffer("qdata", None, persistent=False)  # the CPU layout (see module docstring)
        self.register_buffer("params", None, persistent=False)
        if self._cpu_resident():
            self._store(self.quantized_tensor())

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_quantized(
        cls, qt: QuantizedTensor, bias: torch.Tensor | None = None, dtype: torch.dtype = torch.float16
    ) -> QuantLinear:
        """Wrap a QuantizedTensor (on its device); scales and bias are stored in `dtype`."""
        out_f, in_f = qt.shape
        layer = cls(in_f, out_f, qt.bits, qt.group_size, bias is not None, dtype, qt.qweight.device)
        layer.load_quantized(qt)
        if bias is not None:
            layer.bias.copy_(bias.detach().to(dtype))
        return layer

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, bits: int = 4, group_size: int = 128, zero_point: bool = True
    ) -> QuantLinear:
        """Round-to-nearest quantization of an nn.Linear (tests, benchmarks); keeps its dtype/device."""
        w = linear.weight.detach()
        qt = quantize_tensor(w.float(), bits, group_size, zero_point)
        return cls.from_quantized(qt, linear.bias, dtype=w.dtype)

    @torch.no_grad()
    def load_quantized(self, qt: QuantizedTensor) -> None:
        """Pack `qt` into this layer's buffers."""
        if qt.shape != (self.out_features, self.in_features) or (qt.bits, qt.group_size) != (
            self.bits,
            self.group_size,
        ):
            raise ValueError(
                f"QuantizedTensor {qt.shape} bits={qt.bits} group={qt.group_size} does not fit "
                f"QuantLinear({self.in_features}, {self.out_features}, bits={self.bits}, group={self.group_size})"
            )
        self._store(qt)

    def _device(self) -> torch.device:
        return (self.qweight if self.qdata is None else self.qdata).device

    def _cpu_resident(self) -> bool:
        return self.bits == 4 and self._device().type == "cpu"

    def _checkpoint_tensors(self, qt: QuantizedTensor) -> dict[str, torch.Tensor]:
        """qweight / qzeros / scales as this layer's state_dict holds them."""
        if self.layout == "awq_gemm":
            t = packing.pack_awq_gemm(qt)
            scales = qt.scales.t().to(self.dtype).contiguous()  # not via pack_awq_gemm's fp16
            return {"qweight": t["qweight"], "qzeros": t["qzeros"], "scales": scales}
        return {
            "qweight": packing.pack_dense(qt.qweight, self.bits),
            "qzeros": qt.zeros.to(torch.uint8),
            "scales": qt.scales.to(self.dtype),
        }

    @torch.no_grad()
    def _store(self, qt: QuantizedTensor) -> None:
        """Hold `qt` once: in the CPU kernel layout on the CPU (4-bit), else in the checkpoint tensors."""
        dev = self._device()
        if self._cpu_resident():
            # scales rounded to the layer dtype first: the same values the checkpoint tensors hold
            qt = QuantizedTensor(qt.qweight, qt.scales.to(self.dtype), qt.zeros, qt.bits, qt.group_size)
            t = packing.pack_cpu_w4(qt)
            self.qdata, self.params = t["qdata"], t["params"]
            self.qweight = self.qzeros = self.scales = None
            return
        for name, t in self._checkpoint_tensors(qt).items():
            setattr(self, name, t.to(dev).contiguous())
        self.qdata = self.params = None

    def quantized_tensor(self) -> QuantizedTensor:
        """The codes, scales (in the layer dtype) and zeros this layer holds."""
        if self.qdata is not None:
            shape = (self.out_features, self.in_features)
            return packing.unpack_cpu_w4(self.qdata, self.params, shape, self.group_size, self.dtype)
        if self.layout == "awq_gemm":
            return packing.unpack_awq_gemm(self.qweight, self.qzeros, self.scales, self.group_size)
        q = packing.unpack_dense(self.qweight, self.bits, self.in_features)
        return QuantizedTensor(q, self.scales, self.qzeros, self.bits, self.group_size)

    def _to_checkpoint_buffers(self) -> None:
        if self.qdata is not None:
            qt = self.quantized_tensor()
            for name, t in self._checkpoint_tensors(qt).items():
                setattr(self, name, t)
            self.qdata = self.params = None

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.qdata is not None:  # rebuilt from the one copy this layer holds
            for name, t in self._checkpoint_tensors(self.quantized_tensor()).items():
                destination[prefix + name] = t

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._to_checkpoint_buffers()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self._cpu_resident():
            self._store(self.quantized_tensor())

    # ------------------------------------------------------------------ forward

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pure torch: dequantize the whole weight, fp32 matmul, result in x.dtype."""
        from awqforge.kernels.reference import reference_linear

        return reference_linear(x, self.quantized_tensor(), self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_kernel and kernels_enabled() and self.bits == 4:
            if x.device.type == "cpu":
                y = self._forward_cpu(x)
                if y is not None:
                    return y
            elif x.is_cuda:
                y = self._forward_cuda(x)
                if y is not None:
                    return y
        return self.reference_forward(x)

    def _forward_cpu(self, x: torch.Tensor) -> torch.Tensor | None:
        g = effective_group_size(self.in_features, self.group_size)
        if g % 2 or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return None
        from awqforge.kernels import cpu

        try:
            cpu.load_extension()
        except cpu.KernelBuildError as exc:
            if not _cpu_reference:
                _cpu_reference.append(str(exc))
            _warn_once("cpu-build", f"{exc}; QuantLinear uses the (slow) pure-torch reference on CPU")
            return None
        if self.qdata is None:  # a 4-bit layer on the CPU always holds this layout (_store)
            return None
        return cpu.w4_linear_cpu(x, self.qdata, self.params, self.out_features, g, self.bias)

    def _forward_cuda(self, x: torch.Tensor) -> torch.Tensor | None:
        g = effective_group_size(self.in_features, self.group_size)
        if self.layout != "awq_gemm" or g % 16 or x.dtype not in (torch.float16, torch.bfloat16):
            return None
        from awqforge.kernels.triton_w4a16 import w4a16_linear

        return w4a16_linear(x, self.qweight, self.qzeros, self.scales, self.group_size, self.bias)

    def _apply(self, fn, recurse=True):
        # .to()/.cuda()/.half() act on the checkpoint tensors (the CPU layout's fp32 params must not be
        # cast); a 4-bit layer that is (still) on the CPU then packs them into the CPU layout again
        self._to_checkpoint_buffers()
        out = super()._apply(fn, recurse)
        self.dtype = self.scales.dtype  # .half()/.to(dtype) converted the float buffers
        if self._cpu_resident():
            self._store(self.quantized_tensor())
        return out

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, bias={self.bias is not None}, layout={self.layout}, dtype={self.dtype}"
        )
