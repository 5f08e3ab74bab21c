"""Weight quantization: group-wise integer primitives and code packing."""

from core.quant.gptq import gptq_quantize_weight, gptq_quantize_weights
from core.quant.metrics import quantization_error, sqnr_db
from core.quant.packing import PACKERS, Packer, pack_codes, pack_int32, unpack_codes, unpack_int32
from core.quant.primitives import SUPPORTED_BITS, dequantize_weight, quantize_weight

__all__ = [
    "PACKERS",
    "Packer",
    "SUPPORTED_BITS",
    "dequantize_weight",
    "gptq_quantize_weight",
    "gptq_quantize_weights",
    "pack_codes",
    "pack_int32",
    "quantization_error",
    "quantize_weight",
    "sqnr_db",
    "unpack_codes",
    "unpack_int32",
]
