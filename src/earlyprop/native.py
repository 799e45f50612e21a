"""Compiled relaxation loops for the lean chain on CPU (numba; optional: ``pip install earlyprop[native]``).

On CPU every torch op costs 2-20 us whatever its size, and a relaxation step of a 784-500-10 net at batch 20
is ~6-12 ops on 10K numbers: the dispatch, not the arithmetic, sets its cost (BENCHMARKS.md). These kernels run
whole stretches of steps of :class:`earlyprop.chain.Chain` in one compiled call: the Euler step of BF-1 with the
nudge of BF-9 (:func:`euler_steps`) and the block sweeps of SC23 (:func:`block_sweeps`), for layered chains of
linear, hard-sigmoid, logistic and tanh layers. Same equations as the torch loops, up to round-off
(tests/speed/test_fast_paths.py runs both against the general loop in float64). Without numba, or for chains
outside their reach (:func:`earlyprop.native_chain.fits`), the torch loops run.

Layout: the free layers live in one flat buffer, layer k row-major at ``layout[START, k]`` with
``layout[SIZE, k]`` units per example and rate ``layout[KIND, k]``, whose bounds (+-inf when unbounded), gain
and shift are ``params[:, k]``. ``weights[k - 2]`` is W_k, shape (n_k, n_{k-1}), for k = 2..n, and
``statics[k - 1]`` layer k's bias plus input drive, (batch, n_k).
"""

from __future__ import annotations

import math

import numpy as np

from earlyprop.native_cache import stamp_cache

try:
    import numba
except ImportError:  # the torch loops of chain.Chain run instead
    numba = None

START, SIZE, KIND = 0, 1, 2  # rows of layout
LO, HI, GAIN, SHIFT = 0, 1, 2, 3  # rows of params
LINEAR, HARD, SIGMOID, TANH = 0, 1, 2, 3
# No 'nnan'/'ninf' fast-math: a diverging state must stay NaN/inf for relax's finiteness check to see it.
FASTMATH = {"reassoc", "contract", "nsz", "arcp"}


def available() -> bool:
    """Whether numba is installed (then the lean chain's CPU loops can run compiled)."""
    return numba is not None


def _jit(function=None, *, fastmath=FASTMATH, inline="never"):
    """numba.njit, cached on disk, with the kernels' options. ``inline="always"`` inlines a function into its
    compiled callers at numba's level: for the small functions that only orchestrate kernels, whose linked code
    numba would otherwise optimise again in each caller (seconds of compiling; BENCHMARKS.md)."""
    if function is None:
        return lambda function: _jit(function, fastmath=fastmath, inline=inline)
    if numba is None:
        return function
    # error_model numpy: x / 0 is inf or NaN as in torch, not a ZeroDivisionError check that stops vectorisation
    options = dict(fastmath=fastmath, error_model="numpy", nogil=True, inline=inline)
    try:
        dispatcher = numba.njit(cache=True, **options)(function)
    except RuntimeError:  # no writable cache (a read-only install, no user cache dir): compile in each process
        return numba.njit(**options)(function)
    stamp_cache(dispatcher)  # fresh when any kernel file changes, not only its own (earlyprop.native_cache)
    return dispatcher


@_jit
def _clip(v, lo, hi):
    # compares, not min/max: NaN passes through, as torch.clamp lets it
    if v < lo:
        return lo
    if v > hi:
        return hi
    return v


@_jit
def _copy(source, target):
    # a loop: numba's slice assignment goes through its broadcasting machinery, ~4x slower at these sizes
    for i in range(source.shape[0]):
        target[i] = source[i]


@_jit
def _fill_rates(s, r, slope, layout, params, batch, parity):
    """rho(s) into ``r`` for the layers of ``parity`` (0 even, 1 odd, -1 all), and rho'(s) into ``slope`` for the
    smooth ones."""
    for k in range(1, layout.shape[1]):
        if parity >= 0 and k % 2 != parity:
            continue
        first, stop, kind = layout[START, k], layout[START, k] + batch * layout[SIZE, k], layout[KIND, k]
        # loops run over slices from 0: an index that may be negative (numba wraps those) stops vectorisation
        source, rates = s[first:stop], r[first:stop]
        if kind == HARD:
            lo, hi = params[LO, k], params[HI, k]
            for i in range(source.shape[0]):
                rates[i] = _clip(source[i], lo, hi)
        elif kind == LINEAR:
            _copy(source, rates)
        else:
            _smooth_rates(source, rates, slope[first:stop], kind, params[GAIN, k], params[SHIFT, k])


@_jit
def fill_all_rates(s, r, slope, layout, params, batch):
    """:func:`_fill_rates` for every free layer. (Callers in compiled code use this, not a literal -1: numba
    compiles one specialisation of a function per literal argument, and each costs seconds.)"""
    _fill_rates(s, r, slope, layout, params, batch, np.int64(-1))


@_jit(fastmath=FASTMATH - {"reassoc"})  # see _exp
def _smooth_rates(s, r, slope, kind, gain, shift):
    """The logistic rate sigmoid(gain (s - shift)) and its slope gain r (1 - r), or (TANH) tanh(s) =
    2 sigmoid(2 s) - 1 and 1 - r^2, through :func:`_exp`: one pass, no scratch."""
    one = s.dtype.type(1.0)
    if kind == TANH:
        two = s.dtype.type(2.0)
        for i in range(s.shape[0]):
            v = two / (one + _exp(-two * s[i])) - one
            r[i], slope[i] = v, one - v * v
    else:
        for i in range(s.shape[0]):
            v = one / (one + _exp(gain * (shift - s[i])))
            r[i], slope[i] = v, gain * (v - v * v)


def _exp(x):
    """exp(x) in a form that vectorises (numba's math.exp is a scalar libm call, ~6x slower here); compiled by
    the overload below: x = k ln2 + r with |r| <= ln2 / 2 (ln2 split in two so that k ln2 is exact), e^r by its
    Taylor series (to r^13 in float64, r^7 in float32: truncation < 0.1 ulp), times 2^k built in the exponent
    bits. Within 1 ulp of exp (tests/speed/test_native.py). x is clipped to the range of normal results, so
    e^x saturates at its ends (sigmoid's 1 / (1 + e^x) is then 0 or 1 to working precision all the same)."""
    return math.exp(x)


if numba is not None:
    from llvmlite import ir
    from numba.core import types
    from numba.extending import intrinsic, overload

    _SAME_WIDTH = {types.int64: (types.float64, ir.DoubleType()), types.int32: (types.float32, ir.FloatType()),
                   types.float64: (types.int64, ir.IntType(64)), types.float32: (types.int32, ir.IntType(32))}

    @intrinsic
    def _bitcast(typingctx, value):
        """The float with the bit pattern of an int32 / int64, or the int of a float32 / float64 (LLVM's bitcast)."""
        if value not in _SAME_WIDTH:
            return None
        result, llvm_type = _SAME_WIDTH[value]
        return result(value), lambda context, builder, signature, args: builder.bitcast(args[0], llvm_type)

    # inlined into its caller (a call per element would not vectorise), whose fast-math flags then apply: call it
    # only from functions compiled without 'reassoc', which would fold the two parts of k ln2 back together
    @overload(_exp, inline="always")
    def _exp_overload(x):
        if x not in (types.float32, types.float64):
            return None
        wide = x == types.float64
        real, integer = (np.float64, np.int64) if wide else (np.float32, np.int32)
        limit, bias, mantissa = (708.0, 1023, 52) if wide else (87.0, 127, 23)
        log2e, ln2_hi, ln2_lo = real(1.4426950408889634), real(0.693145751953125), real(1.4286068203094173e-06)
        lo, hi, half, bias, mantissa = real(-limit), real(limit), real(0.5), integer(bias), integer(mantissa)
        # float64's 2^k from k's float: k + 1.5 2^52 holds k in its low bits, so (its bits + offset) << 52 is 2^k's:
        # integer ops, which vectorise, where float64 -> int64 conversion has no AVX2 instruction (sigmoid 25-30%
        # faster in float64; BENCHMARKS.md); float32's conversion has one
        magic = real(1.5 * 2.0 ** int(mantissa))
        offset = integer(bias - int(magic.view(integer)))
        c = tuple(real(1.0 / math.factorial(i)) for i in range(14))

        # Horner, written out (a loop over the coefficients does not vectorise); the float64 series is longer
        def exp64(x):
            v = _clip(x, lo, hi)
            k = np.floor(v * log2e + half)
            r = (v - k * ln2_hi) - k * ln2_lo
            p = ((((c[13] * r + c[12]) * r + c[11]) * r + c[10]) * r + c[9]) * r + c[8]
            p = ((((((p * r + c[7]) * r + c[6]) * r + c[5]) * r + c[4]) * r + c[3]) * r + c[2]) * r + c[1]
            return (p * r + c[0]) * _bitcast(integer((_bitcast(k + magic) + offset) << mantissa))

        def exp32(x):
            v = _clip(x, lo, hi)
            k = np.floor(v * log2e + half)
            r = (v - k * ln2_hi) - k * ln2_lo
            p = ((((((c[7] * r + c[6]) * r + c[5]) * r + c[4]) * r + c[3]) * r + c[2]) * r + c[1]) * r + c[0]
            return p * _bitcast(integer((integer(k) + bias) << mantissa))

        exp = exp64 if wide else exp32
        return exp


@_jit
def _fields(r, statics, b0, rows, k, layout, weights, out):
    """h_k = b_k + (input drive) + W_k rho(s_{k-1}) + W_{k+1}^T rho(s_{k+1}) of examples b0 .. b0 + rows - 1
    (rows <= 4) into out[:rows]."""
    n, m = layout.shape[1] - 1, layout[SIZE, k]
    for q in range(rows):
        _copy(statics[k - 1][b0 + q], out[q, :m])
    if k > 1:
        _add_dots(r[layout[START, k - 1]:], b0, rows, layout[SIZE, k - 1], weights[k - 2], out)
    if k < n:
        w, width, above = weights[k - 1], layout[SIZE, k + 1], r[layout[START, k + 1]:]
        q = 0
        while q + 2 <= rows:  # two examples share each load of W
            at = (b0 + q) * width
            _add_axpy_pairs(above[at:at + width], above[at + width:at + 2 * width], w, out[q, :m], out[q + 1, :m])
            q += 2
        if q < rows:
            _add_axpys(above[(b0 + q) * width:(b0 + q + 1) * width], w, out[q, :m])


@_jit
def _add_dots(r, b0, rows, width, w, out):
    """out[q, j] += W[j] . r[b0 + q] (W: (m, width), r: examples of ``width`` units): four examples at a time share
    each load of W (a lone dot product waits on its one accumulator: ~1.6-2x slower), and two rows of W each load
    of the examples (A's 20 x 500 x 10 field: 3.8-4.3 -> 3.1-3.8 us in float32, 10.2-10.5 -> 6.3-7.2 us in
    float64; BENCHMARKS.md)."""
    m = w.shape[0]
    if rows == 4:
        r0, r1 = r[b0 * width:(b0 + 1) * width], r[(b0 + 1) * width:(b0 + 2) * width]
        r2, r3 = r[(b0 + 2) * width:(b0 + 3) * width], r[(b0 + 3) * width:(b0 + 4) * width]
        for j in range(0, m - 1, 2):
            row, a0, a1, a2, a3 = w[j], out[0, j], out[1, j], out[2, j], out[3, j]
            other, c0, c1, c2, c3 = w[j + 1], out[0, j + 1], out[1, j + 1], out[2, j + 1], out[3, j + 1]
            for i in range(width):
                x, y, p0, p1, p2, p3 = row[i], other[i], r0[i], r1[i], r2[i], r3[i]
                a0 += p0 * x
                a1 += p1 * x
                a2 += p2 * x
                a3 += p3 * x
                c0 += p0 * y
                c1 += p1 * y
                c2 += p2 * y
                c3 += p3 * y
            out[0, j], out[1, j], out[2, j], out[3, j] = a0, a1, a2, a3
            out[0, j + 1], out[1, j + 1], out[2, j + 1], out[3, j + 1] = c0, c1, c2, c3
        if m % 2:
            j = m - 1
            row, a0, a1, a2, a3 = w[j], out[0, j], out[1, j], out[2, j], out[3, j]
            for i in range(width):
                x = row[i]
                a0 += r0[i] * x
                a1 += r1[i] * x
                a2 += r2[i] * x
                a3 += r3[i] * x
            out[0, j], out[1, j], out[2, j], out[3, j] = a0, a1, a2, a3
        return
    for q in range(rows):
        below = r[(b0 + q) * width:(b0 + q + 1) * width]
        for j in range(m):
            acc, row = out[q, j], w[j]
            for i in range(width):
                acc += below[i] * row[i]
            out[q, j] = acc


@_jit
def _add_axpys(above, w, out):
    """out += W^T above (W: (len(above), len(out))): one axpy per row of W, four at a time (one pass over out per
    four rows)."""
    i, width, m = 0, above.shape[0], out.shape[0]
    while i + 4 <= width:
        a0, a1, a2, a3 = above[i], above[i + 1], above[i + 2], above[i + 3]
        w0, w1, w2, w3 = w[i], w[i + 1], w[i + 2], w[i + 3]
        for j in range(m):
            out[j] += a0 * w0[j] + a1 * w1[j] + a2 * w2[j] + a3 * w3[j]
        i += 4
    while i < width:
        a0, w0 = above[i], w[i]
        for j in range(m):
            out[j] += a0 * w0[j]
        i += 1


@_jit
def _add_axpy_pairs(a, b, w, out_a, out_b):
    """out_a += W^T a and out_b += W^T b (two examples): each load of W serves both, four rows per pass over the
    outputs (A's 20 x 10 x 500 field: 6.95 -> 5.47 us in float32, 16.1 -> 8.7 us in float64 against
    :func:`_add_axpys` per example; BENCHMARKS.md)."""
    i, width, m = 0, a.shape[0], out_a.shape[0]
    while i + 4 <= width:
        a0, a1, a2, a3, b0, b1, b2, b3 = a[i], a[i + 1], a[i + 2], a[i + 3], b[i], b[i + 1], b[i + 2], b[i + 3]
        w0, w1, w2, w3 = w[i], w[i + 1], w[i + 2], w[i + 3]
        for j in range(m):
            x0, x1, x2, x3 = w0[j], w1[j], w2[j], w3[j]
            out_a[j] += a0 * x0 + a1 * x1 + a2 * x2 + a3 * x3
            out_b[j] += b0 * x0 + b1 * x1 + b2 * x2 + b3 * x3
        i += 4
    if i + 2 <= width:
        a0, a1, b0, b1, w0, w1 = a[i], a[i + 1], b[i], b[i + 1], w[i], w[i + 1]
        for j in range(m):
            x0, x1 = w0[j], w1[j]
            out_a[j] += a0 * x0 + a1 * x1
            out_b[j] += b0 * x0 + b1 * x1
        i += 2
    if i < width:
        a0, b0, w0 = a[i], b[i], w[i]
        for j in range(m):
            out_a[j] += a0 * w0[j]
            out_b[j] += b0 * w0[j]


@_jit
def _move(s, target, rate, lo, hi, measure, commit):
    """s <- clip(s + rate (target - s), lo, hi) in place (unless ``commit`` is False); the max |change| when
    ``measure``, else 0. (One loop per case, so that each is a straight vectorisable loop.)"""
    if not measure:
        for j in range(s.shape[0]):
            v = s[j]
            s[j] = _clip(v + rate * (target[j] - v), lo, hi)
        return 0.0
    worst = 0.0
    for j in range(s.shape[0]):
        v = s[j]
        new = _clip(v + rate * (target[j] - v), lo, hi)
        worst = max(worst, abs(new - v))
        target[j] = new
    if commit:
        _copy(target, s)
    return worst


@_jit
def move_toward_fields(s, fields, static, rate, lo, hi):
    """s <- clip(s + rate (fields + static - s), lo, hi) over whole flat buffers: the torch loops' Euler update of
    plain layers (rho(s) = s, rho'(s) = 1) with the static fields added in the same pass (one call instead of
    addmm's copies of them, a lerp and a clamp: :func:`earlyprop.chain_loops.euler_loop`)."""
    for i in range(s.shape[0]):
        v = s[i]
        s[i] = _clip(v + rate * (fields[i] + static[i] - v), lo, hi)


@_jit
def euler_steps(s, r, slope, rows, statics, pull, kpull, layout, params, weights, eps, count, measure, commit, project,
                nudged):
    """``count`` leaky-integrator steps s <- s + eps (G - s), G = rho'(s) h(s) + pull - kpull s on the driven
    layer (the nudge of BF-9 with pull = kpull d), each layer then clipped to its bounds when ``project``; in
    place unless ``commit`` is False. Returns max|step| / eps of the last step when ``measure``, else 0.
    ``r``, ``slope``: scratch as long as s (the rates, rho' of the smooth layers);
    ``rows``: scratch for four examples' fields, (4, max n_k)."""
    n, batch = layout.shape[1] - 1, statics[0].shape[0]
    worst, one, zero, inf = 0.0, s.dtype.type(1.0), s.dtype.type(0.0), s.dtype.type(np.inf)
    for t in range(count):
        fill_all_rates(s, r, slope, layout, params, batch)  # every field of this step reads these rates
        last = measure and t == count - 1
        for k in range(1, n + 1):
            m, lo, hi, kind = layout[SIZE, k], params[LO, k], params[HI, k], layout[KIND, k]
            clip_lo, clip_hi = (lo, hi) if project else (-inf, inf)
            for b0 in range(0, batch, 4):
                block = min(4, batch - b0)
                _fields(r, statics, b0, block, k, layout, weights, rows)
                for b in range(b0, b0 + block):
                    state, h = s[layout[START, k] + b * m:layout[START, k] + (b + 1) * m], rows[b - b0, :m]
                    if kind == HARD:  # rho'(s) of the hard sigmoid: 1 on the closed interval, else 0
                        for j in range(m):
                            h[j] = h[j] * (one if lo <= state[j] <= hi else zero)
                    elif kind != LINEAR:
                        at = layout[START, k] + b * m
                        factor = slope[at:at + m]
                        for j in range(m):
                            h[j] = h[j] * factor[j]
                    if nudged and k == n:
                        p, c = pull[b * m:(b + 1) * m], kpull[b]
                        for j in range(m):
                            h[j] = h[j] + p[j] - c * state[j]
                    worst = max(worst, _move(state, h, eps, clip_lo, clip_hi, last, commit))
    return worst / eps


@_jit
def block_sweeps(s, r, slope, rows, statics, pull, curvature, layout, params, weights, omega, count, measure, nudged):
    """``count`` sweeps of exact block minimisation (SC23), even layers then odd: each layer moves ``omega`` of
    the way to its minimiser h_k (the driven one, nudged, to (h_n + pull) / a, a = ``curvature`` per example),
    then is clipped to its bounds. Returns the last sweep's max|change| / omega when ``measure``, else 0."""
    n, batch = layout.shape[1] - 1, statics[0].shape[0]
    worst = 0.0
    for t in range(count):
        last = measure and t == count - 1
        for parity in (0, 1):
            _fill_rates(s, r, slope, layout, params, batch, 1 - parity)  # the neighbours of this group
            for k in range(2 - parity, n + 1, 2):
                m, lo, hi = layout[SIZE, k], params[LO, k], params[HI, k]
                for b0 in range(0, batch, 4):
                    block = min(4, batch - b0)
                    _fields(r, statics, b0, block, k, layout, weights, rows)
                    for b in range(b0, b0 + block):
                        h = rows[b - b0, :m]
                        if nudged and k == n:
                            p, a = pull[b * m:(b + 1) * m], curvature[b]
                            for j in range(m):
                                h[j] = (h[j] + p[j]) / a
                        state = s[layout[START, k] + b * m:layout[START, k] + (b + 1) * m]
                        worst = max(worst, _move(state, h, omega, lo, hi, last, np.bool_(True)))
    return worst / omega

