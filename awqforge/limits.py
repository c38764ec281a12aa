"""What the quantization algorithm and our formats support (pure Python, so the job schema reads it without torch)."""

SUPPORTED_BITS = (2, 3, 4, 8)  # code widths quant.py, packing.py and the formats handle
SUPPORTED_GROUP_SIZES = (32, 64, 128, -1)  # -1: one group per output channel

# The algorithm's working sizes, read by the engine (awq.BlockSettings, awq.search) and by the memory planner
# (awqforge.plan), which must not import torch.
CHUNK_TOKENS = 16384  # tokens per forward chunk of a block (memory bound)
CHUNK_ELEMS = 1 << 23  # elements of a row chunk of the weight-sized temporaries of the search
CLIP_GRID = 20  # clip ratios 1 - i/CLIP_GRID for i < MAX_SHRINK * CLIP_GRID (AutoAWQ)
MAX_SHRINK = 0.5
CLIP_RATIOS = int(CLIP_GRID * MAX_SHRINK)  # clip ratios tried per group
# A wide input's Gram matrix X^T X and the losses' quadratic forms d G d^T (awq.search) multiply only the
# diagonal and upper column blocks of the symmetric G: (k + 1) / 2k of the full product's multiply-adds with k
# blocks (bench/README.md, issue 21, stop 5).
GRAM_BLOCKED_MIN = 1024  # inputs at least this wide are done by blocks
GRAM_BLOCKS = 8  # column blocks of an accumulated Gram matrix, at most
GRAM_BLOCK_MIN = 192  # and at least this wide (4 -> 8 blocks: 0.89x the time at 4864 wide, 0.90x at 2304)
FORM_BLOCKS = 8  # column blocks of a quadratic form, at most
FORM_BLOCK_MIN = 512  # and at least this wide (a narrower product runs further from the machine's peak)


def gram_blocks(width: int) -> int:
    """Column blocks the Gram matrix of an input this wide is accumulated in (1: the full product)."""
    return min(GRAM_BLOCKS, width // GRAM_BLOCK_MIN) if width >= GRAM_BLOCKED_MIN else 1


def form_blocks(width: int) -> int:
    """Column blocks of a quadratic form d G d^T over an input this wide (1: the full product)."""
    return max(1, min(FORM_BLOCKS, width // FORM_BLOCK_MIN)) if width >= GRAM_BLOCKED_MIN else 1


def blocked_share(blocks: int) -> float:
    """The share of a symmetric product's multiply-adds done with this many column blocks."""
    return (blocks + 1) / (2 * blocks)


# The module search's race (awq.search.module_losses): at most RESCORE_MAX candidates rescored on the rest of
# the samples; their fake-quantized weights are kept between the race's chunks while all of them fit in
# RACE_CACHE_BYTES (else refilled per chunk: gate+up of Qwen2.5-0.5B 132 ms against 717 ms for the MLP's
# forward on a chunk), which the memory plan charges to the scale search.
RESCORE_MAX = 6
RACE_CACHE_BYTES = 256 << 20

# GPTQ rounding only on a linear whose calibration tokens are at least this many per input channel (else it is
# rounded to nearest): fewer cannot pin down its input Gram matrix (bench/README.md, issue 21, stop 3)
GPTQ_TOKENS_PER_INPUT = 4

# lm-eval requests per forward in task evaluation (awqforge.tasks_eval), which the planner charges logits for.
TASK_BATCH_SIZE = 8
