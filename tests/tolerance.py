"""How close two computations of the same score must agree: a tolerance that follows floating-point rounding of
the magnitudes compared, not one machine's luck.

The engine and a per-cell loop compute the same forward pass with other batch shapes, chunkings and summation
orders; on another CPU (other SIMD kernels) the rounding differs again. Each step rounds to the dtype's epsilon
relative to the operands, and a transformer's depth accumulates it: a log-probability of -3.02 was seen 4.3e-5
(1.4e-5 relative, about 120 float32 epsilons) from its per-cell loop on an AVX2 machine. So two values agree when

    |actual - expected| <= ULPS * eps(dtype) * (|expected| + scale)

where ``scale`` is the magnitude of the operands the difference was rounded from: 1 for probabilities and
log-probabilities (the logits they come from are of order 1 to 10, covered by the ULPS margin), the larger score
for a difference of two scores. 256 float32 epsilons is 3.1e-5 relative; a real bug (a wrong layer, position or
run patched) moves a score by orders of magnitude more. A float64 model is scored in float64, so its tolerance is
tight for real (5.7e-14 relative).

    >>> import numpy as np
    >>> assert_close(np.float32(-3.02) + np.float32(4.3e-5), -3.02)   # rounding, on any CPU
    >>> close(-3.02 + 1e-3, -3.02)                                    # a real difference
    False
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

ULPS = 256


def _eps(dtype: torch.dtype | np.dtype | type) -> float:
    if isinstance(dtype, torch.dtype):
        return float(torch.finfo(dtype).eps)
    return float(np.finfo(dtype).eps)


def tolerances(dtype: Any = torch.float32, scale: float = 1.0, ulps: float = ULPS) -> dict[str, float]:
    """``rtol`` and ``atol`` for numpy's assert_allclose (atol + rtol * |expected|) under the rule above."""
    eps = _eps(dtype)
    return {"rtol": ulps * eps, "atol": ulps * eps * scale}


def assert_close(actual: Any, expected: Any, *, dtype: Any = torch.float32, scale: float = 1.0, ulps: float = ULPS,
                 err_msg: str = "") -> None:
    """Assert that arrays (or numbers) agree to ``ulps`` epsilons of ``dtype`` of their magnitude plus ``scale``."""
    np.testing.assert_allclose(np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64),
                               err_msg=err_msg, **tolerances(dtype, scale, ulps))


def close(actual: Any, expected: Any, *, dtype: Any = torch.float32, scale: float = 1.0, ulps: float = ULPS) -> bool:
    """Whether ``assert_close`` would pass."""
    return bool(np.allclose(np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64),
                            **tolerances(dtype, scale, ulps)))


def within_rounding(expected: Any, *, dtype: Any = torch.float32, scale: float = 1.0, ulps: float = ULPS) -> Any:
    """``pytest.approx`` under the same rule, for ``assert value == approx(expected)``."""
    t = tolerances(dtype, scale, ulps)
    return pytest.approx(expected, rel=t["rtol"], abs=t["atol"])
