"""Numeric tolerances shared by every equivalence test (one place to change them)."""

# float32 result vs a dense float64 reference (engine methods, closed forms).
ENGINE_RTOL = 1e-4
ENGINE_ATOL = 1e-6
# Batched per-sample gradients vs a batch-of-one loop.
GRAD_RTOL = 1e-5
GRAD_ATOL = 1e-6
# Distributed vs single process.
DIST_RTOL = 1e-5
