"""qamw_ext: QAM-W and AAAC weight quantization for LLMs, with CUDA and C++ kernels."""
from . import ops, reference  # noqa: F401
# The codecs register themselves; checkpoint registers the transformers quantizer so that
# from_pretrained of a saved directory works once qamw_ext is imported.
from . import aaac, baselines, qamw  # noqa: F401,E402
from . import checkpoint  # noqa: F401,E402
from .ops import (aaac_dequantize, aaac_gemv, hadamard, nearest_codeword_1d,  # noqa: F401
                  nearest_codeword_2d, pack_bits, qamw_dequantize, qamw_gemv, unpack_bits)

__version__ = "0.1.0"
