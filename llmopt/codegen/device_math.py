"""Device functions shared by several kernels: the activations and tanh, one of each.

Why one module: the GEMV / flat GEMM epilogue and the gated-activation kernel must compute
the same GELU, and dense and paged attention the same softcap ``c * tanh(s / c)``; two
copies drift (the GEMV's ``1 + erf`` GELU lost all relative precision for very negative
inputs while the gated kernel's did not; dense and paged softcap used different tanh
forms). Every kernel that needs one of these imports it from here.

Math, fp32 in and out, no libdevice (so the interpreter and every backend run them):

    silu(g)       = g / (1 + e^-g)
    gelu(g)       = g * Phi(g),  Phi(g) = erfc(-g / sqrt 2) / 2, from erfc(|g| / sqrt 2)
                    (``1 + erf(g)`` would cancel for g << 0)
    gelu_tanh(g)  = g * sigmoid(2 z),  z = sqrt(2/pi) (g + 0.044715 g^3)
                    (= 0.5 g (1 + tanh z) without the cancellation of 1 + tanh z)
    tanh(x)       = sign(x) (1 - e^-2|x|) / (1 + e^-2|x|), odd Taylor series below |x| = 0.1

Each is tested against fp64 at its tails (tests/codegen/test_cuda_fixes.py). Sources:
GELU and its tanh approximation, Hendrycks & Gimpel 2016 (arXiv:1606.08415); ``erfcc``,
Numerical Recipes (2nd ed.) §6.2.
"""
import triton
import triton.language as tl


@triton.jit
def erfc_nonneg(z):
    """erfc(z) for z >= 0 in fp32, relative error about (1 + z^2) * 1.2e-7, tail included.

    Chebyshev fit of Numerical Recipes' ``erfcc`` (fractional error < 1.2e-7), with
    ``exp(-z^2)`` split as ``exp(-zh^2) * exp(-(z - zh)(z + zh))``, ``zh`` being ``z`` cut to
    12 significant bits so ``zh^2`` is exact: no rounding of ``z^2`` adds to the error that
    ``z``'s own fp32 rounding already costs (z^2 * 1.2e-7, the conditioning of exp(-z^2)).
    """
    t = 1.0 / (1.0 + 0.5 * z)
    p = 0.17087277
    p = -0.82215223 + t * p
    p = 1.48851587 + t * p
    p = -1.13520398 + t * p
    p = 0.27886807 + t * p
    p = -0.18628806 + t * p
    p = 0.09678418 + t * p
    p = 0.37409196 + t * p
    p = 1.00002368 + t * p
    p = -1.26551223 + t * p
    zh = (z.to(tl.int32, bitcast=True) & -4096).to(tl.float32, bitcast=True)
    return t * tl.exp(-zh * zh) * tl.exp((zh - z) * (z + zh) + p)


@triton.jit
def apply_activation(g, ACTIVATION: tl.constexpr):
    """act(g) for fp32 ``g``, ``ACTIVATION`` one of ``"silu"``, ``"gelu"``, ``"gelu_tanh"``."""
    if ACTIVATION == "silu":
        # exp overflows to inf for very negative g, giving g / inf = -0: the right limit.
        act = g / (1.0 + tl.exp(-g))
    elif ACTIVATION == "gelu":
        e = erfc_nonneg(tl.abs(g) * 0.7071067811865476)
        act = g * tl.where(g >= 0, 1.0 - 0.5 * e, 0.5 * e)
    else:
        z = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        act = g / (1.0 + tl.exp(-2.0 * z))
    return act


@triton.jit
def tanh(x):
    """tanh in fp32: (1 - e^{-2|x|}) / (1 + e^{-2|x|}), which never overflows, and its odd
    Taylor series below |x| = 0.1 where the subtraction would lose digits (error < 1e-9)."""
    ax = tl.abs(x)
    t = tl.exp(-2.0 * ax)
    big = (1.0 - t) / (1.0 + t)
    x2 = ax * ax
    small = ax * (1.0 + x2 * (-0.3333333333333333 + x2 * (0.13333333333333333 + x2 * -0.05396825396825397)))
    r = tl.where(ax < 0.1, small, big)
    return tl.where(x < 0, -r, r)
