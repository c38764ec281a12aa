"""What the quantization algorithm and our formats support (pure Python, so the job schema reads it without torch)."""

SUPPORTED_BITS = (2, 3, 4, 8)  # code widths quant.py, packing.py and the formats handle
SUPPORTED_GROUP_SIZES = (32, 64, 128, -1)  # -1: one group per output channel
