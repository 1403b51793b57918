"""Error metrics shared by the op tests and benchmarks."""

import numpy as np


def rel_rms_error(ref, out) -> float:
    """``rms(ref - out) / (rms(ref) + 1e-8)``, computed in float64; 0 when max |diff| <= 1e-6."""
    ref = np.asarray(ref, np.float64)
    out = np.asarray(out, np.float64)
    if ref.shape != out.shape:
        raise ValueError(f"shape mismatch: reference {ref.shape} vs output {out.shape}")
    diff = ref - out
    if diff.size == 0 or np.max(np.abs(diff)) <= 1e-6:
        return 0.0
    return float(np.sqrt(np.mean(diff ** 2)) / (np.sqrt(np.mean(ref ** 2)) + 1e-8))


def assert_close(name: str, ref, out, tol: float) -> None:
    err = rel_rms_error(ref, out)
    assert np.all(np.isfinite(np.asarray(out, np.float64))), f"{name}: non-finite values"
    assert err <= tol, f"{name}: relative RMS error {err:.3e} > tolerance {tol:.1e}"
