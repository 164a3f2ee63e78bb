"""``@triton.jit`` tile helpers shared by the Re-attention kernels (forward, statistics, backward).

Every kernel works on tiles ``[HP, BLOCK_M, BLOCK_N]`` of *slots* x query rows x keys. A slot is
one (row group, head) pair: the ``HP`` slots of a program hold ``G`` groups of ``BLOCK_M`` query
rows for each of the ``H`` heads (``HP = max(8, next_pow2(H))``, ``G = HP // H``), slot ``s`` being
head ``s % H`` of row group ``s // H``; slots ``>= G * H`` are padding. The heads of a group must
sit in one program because they mix; the mixing is one tensor-core product over the slot axis
(``W_slots [HP, HP] @ P [HP, BLOCK_M * BLOCK_N]``, ``W_slots`` the block-diagonal of ``G`` copies
of ``W``; ``_mix``). H = 6 runs 6 of 8 slots, H = 4 two row groups in 8, H = 12 12 of 16.
The math is written out in ``docs/math.md``.

Scores are kept in base-2 units, ``S2 = log2(e) * (scale * q.k + mask)``, so every exponential
is one ``exp2``. The softmax statistics of a row are two numbers, the row maximum ``m2`` of S2
and ``l2 = log2 sum_j 2^(S2_j - m2)``, and ``P = 2^((S2 - m2) - l2)``: subtracting the maximum
first keeps rows whose every score carries a large finite mask (finfo.min, -1e9) exact, where a
single logsumexp ``m2 + l2`` would absorb ``l2`` and give ``P = 1`` instead of ``1 / Nk``.
A row whose keys are all masked (-inf or False) gets ``m2 = +inf, l2 = 0``, hence ``P = 0``.

Masks: MASK_KIND 0 = none, 1 = bool (stored as uint8, 1 = attend), 2 = additive (float; -inf
masks). Dropout: Z[b, h, i, j] = (u >= p) with u uniform from Philox keyed by ``seed`` and the
counters (j // 4, i, b * H + h, 0), word j % 4 (``_dropout_keep``), a pure function of the
position, so every sweep replays it
(``kernels.dropout.dropout_keep_mask`` materializes it for tests).

Nothing here imports ``reattn``; only triton.
"""
import triton
import triton.language as tl

MASK_NONE = 0
MASK_BOOL = 1
MASK_ADDITIVE = 2

NORM_NONE = 0
NORM_LAYER = 1
NORM_BATCH = 2  # normalized with given per-head batch statistics (training BatchNorm)

LOG2E = 1.4426950408889634


def _takes_k8_dots() -> bool:
    """Whether this Triton compiles a 32-bit ``tl.dot`` over K = 8 (Triton 3.9 does; 3.6 asks K >= 16 of
    every 16- and 32-bit product), from the NVIDIA backend's own rule."""
    try:
        from triton.backends.nvidia.compiler import min_dot_size
        from triton.backends.compiler import GPUTarget

        return min_dot_size(GPUTarget("cuda", 90, 32))(tl.float32, tl.float32)[2] <= 8
    except Exception:  # no NVIDIA backend, or another rule's signature: the K >= 16 form compiles everywhere
        return False


# Products over the 8 slots in 32/64-bit operands (the fp32 head mixing, LayerNorm's means) take K = 8 where
# Triton allows it; elsewhere they take the block-diagonal K = 16 form of ``_mix``.
K8_DOTS = tl.constexpr(_takes_k8_dots())


@triton.jit
def _mm(a, b, acc, LOWP: tl.constexpr, LOWP_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """``acc + a @ b`` for 2-D or batched 3-D tiles.

    LOWP: both operands cast to LOWP_DTYPE (fp16/bf16) for the tensor cores, fp32 accumulator
    (GPU only: bf16 ``tl.dot`` is wrong in Triton's interpreter). Otherwise the operands are used
    as given (fp32 or fp64) with ``input_precision=PRECISION`` ("ieee" exact, "tf32" allowed).
    """
    if LOWP:
        return tl.dot(a.to(LOWP_DTYPE), b.to(LOWP_DTYPE), acc)
    else:
        return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _product_result(x, HP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """x [HP, BLOCK_M, BLOCK_D] (fp16/bf16) as the result of a tensor-core product: I @ x, exact.

    A tile loaded from memory reaches a product's operand through shared memory, and that read
    stays where the product is: inside a loop, the tile would be re-read from shared memory on
    every iteration. A product's result becomes the next product's operand within registers, and
    that conversion is hoisted out of the loops, so the tile is read from shared memory once (here)
    and held in registers (HP * BLOCK_M * BLOCK_D / (32 * num_warps) 16-bit values per thread).
    Costs one [BLOCK_M, BLOCK_M] x [BLOCK_M, BLOCK_D] product per slot.
    """
    eye = (tl.arange(0, BLOCK_M)[:, None] == tl.arange(0, BLOCK_M)[None, :]).to(x.dtype)
    eye3 = tl.broadcast_to(eye[None, :, :], (HP, BLOCK_M, BLOCK_M))
    return tl.dot(eye3, x, tl.zeros([HP, BLOCK_M, BLOCK_D], tl.float32)).to(x.dtype)


@triton.jit
def _slot_rows(row0, H, N_Q, HP: tl.constexpr, G: tl.constexpr, BLOCK_M: tl.constexpr):
    """The slots of a program whose first query row is ``row0``.

    Returns (head [HP] int32, slot_ok [HP], rows [HP, BLOCK_M] int32, rows_ok [HP, BLOCK_M]):
    slot s is head s % H of rows row0 + (s // H) * BLOCK_M + arange(BLOCK_M); rows_ok is False for
    padding slots and rows past N_Q. The key-major backward uses it over keys (rows = keys).
    """
    offs_s = tl.arange(0, HP)
    head = offs_s % H
    slot_ok = offs_s < G * H
    # Padding slots take the rows of group 0: where they carry the mixing bias (a P of 1 wherever
    # a key is real), their keys must be real wherever any group's are.
    group = tl.where(slot_ok, offs_s // H, 0)
    rows = row0 + group[:, None] * BLOCK_M + tl.arange(0, BLOCK_M)[None, :]
    return head, slot_ok, rows, slot_ok[:, None] & (rows < N_Q)


@triton.jit
def _load_rows(X, head, rows, rows_ok, offs_d, D, stride_h, stride_m, stride_d, CDT: tl.constexpr,
               DOT_LOWP: tl.constexpr):
    """[HP, BLOCK_M, BLOCK_D] tile of X (one batch element) at the slots' heads and rows; 0 outside."""
    ptrs = X + (head[:, None, None] * stride_h + rows[:, :, None] * stride_m + offs_d[None, None, :] * stride_d)
    x = tl.load(ptrs, mask=rows_ok[:, :, None] & (offs_d < D)[None, None, :], other=0.0)
    if not DOT_LOWP:
        x = x.to(CDT)
    return x


@triton.jit
def _load_keys(X, head, offs_n, N_K, offs_d, D, stride_h, stride_n, stride_d, CDT: tl.constexpr,
               DOT_LOWP: tl.constexpr, TRANSPOSED: tl.constexpr, KEYS_PADDED: tl.constexpr, EVEN_D: tl.constexpr):
    """[HP, BLOCK_N, BLOCK_D] tile of X at the slots' heads (V), or its transpose [HP, BLOCK_D, BLOCK_N] (K).

    Keys past N_K (only in the last block, KEYS_PADDED) and head-dim columns past D (unless
    EVEN_D) load as 0, so padded keys contribute nothing to A V. Padding slots read a real head
    (s % H) whose results are discarded: full blocks load without any predicate.
    """
    h = head[:, None, None] * stride_h
    n = offs_n
    if TRANSPOSED:
        ptrs = X + (h + offs_d[None, :, None] * stride_d + n[None, None, :] * stride_n)
        ok = (offs_d < D)[None, :, None] & (offs_n < N_K)[None, None, :]
    else:
        ptrs = X + (h + n[None, :, None] * stride_n + offs_d[None, None, :] * stride_d)
        ok = (offs_n < N_K)[None, :, None] & (offs_d < D)[None, None, :]
    if KEYS_PADDED or not EVEN_D:
        x = tl.load(ptrs, mask=ok, other=0.0)
    else:
        x = tl.load(ptrs)
    if not DOT_LOWP:
        x = x.to(CDT)
    return x


@triton.jit
def _live_zero(offs):
    """0, computed from a loop's block offsets ``offs`` (>= 0), which the compiler cannot see is 0.

    A tile loaded at addresses that do not change along a loop is loop-invariant: the compiler
    hoists its addresses (or the tile itself) out of the loop and holds them in registers for its
    whole length. Adding this 0 to the rows ties the addresses to the iteration, so they are
    recomputed from a few per-thread vectors where they are used instead.
    """
    return (tl.max(offs, axis=0) >= 0).to(tl.int32) - 1


@triton.jit
def _scores_product(a_own, A, B, head, rows, rows_ok, offs_n, N_K, D, stride_ah, stride_am, stride_ad,
                    stride_bh, stride_bn, stride_bd,
                    HP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    D_CHUNKS: tl.constexpr, CDT: tl.constexpr, DOT_LOWP: tl.constexpr, LOWP_DTYPE: tl.constexpr,
                    DOT_PRECISION: tl.constexpr, KEYS_PADDED: tl.constexpr, EVEN_D: tl.constexpr,
                    TIE: tl.constexpr = True):
    """[HP, BLOCK_M, BLOCK_N] = A rows . B rows over the whole head dim (q k^T, or dO v^T).

    With one head-dim chunk ``a_own`` is the program's A tile, loaded once; with several (the
    launch rule splits the head dim when a program's tiles would not fit), every chunk of A is
    re-read (from cache) for every key block, so only BLOCK_D columns are staged at a time.
    TIE: the chunks' addresses are tied to the key block too (``_live_zero``), not only their
    predicate: fewer registers held across the sweep, a few more integer instructions per block
    (the backward's rules take it where the norms' or the mask's tiles need the registers). Only
    for tensor-core products (DOT_LOWP): with fp32 operand tiles the per-block address math costs
    more registers than it frees (at 4 warps, the fp32 forward at 32 slots, D = 128 on sm_80 spilled
    13,856 B per thread tied, 10,280 B or less untied).
    """
    acc = tl.zeros([HP, BLOCK_M, BLOCK_N], CDT)
    for chunk in tl.static_range(D_CHUNKS):
        offs_d = chunk * BLOCK_D + tl.arange(0, BLOCK_D)
        if D_CHUNKS == 1:
            a_c = a_own
        else:
            # Tied to the key block: loop-invariant, the compiler would hoist every chunk's A tile
            # out of the key loop and hold them all, which the split is meant to avoid.
            if TIE and DOT_LOWP:
                a_c = _load_rows(A, head, rows + _live_zero(offs_n), rows_ok, offs_d, D, stride_ah, stride_am,
                                 stride_ad, CDT, DOT_LOWP)
            else:
                n_live = (rows * 0 + tl.max(offs_n, axis=0)) >= 0
                a_c = _load_rows(A, head, rows, rows_ok & n_live, offs_d, D, stride_ah, stride_am, stride_ad, CDT,
                                 DOT_LOWP)
        b_c = _load_keys(B, head, offs_n, N_K, offs_d, D, stride_bh, stride_bn, stride_bd, CDT, DOT_LOWP, True,
                         KEYS_PADDED, EVEN_D)
        acc = _mm(a_c, b_c, acc, DOT_LOWP, LOWP_DTYPE, DOT_PRECISION)
    return acc


@triton.jit
def _MASK_FLOOR(CDT: tl.constexpr):
    """The most negative additive mask value whose product with log2(e) is finite in CDT."""
    if CDT == tl.float64:
        return -1.2e308
    else:
        return -2.35e38


@triton.jit
def _scores(qk, offset3, b, head3, rows3, rows_ok3, keys3, N_K, scale2, MASK, stride_mb, stride_mh, stride_mm,
            stride_mn, CDT: tl.constexpr, MASK_KIND: tl.constexpr, KEYS_PADDED: tl.constexpr):
    """(S2 - offset, kept): scores in base-2 units minus a per-row offset, and the entries that take part.

    qk [HP, M, N] is q.k over the whole head dim; head3, rows3, keys3 are the slots' heads
    [HP, 1, 1], query rows (broadcastable to [HP, M, 1]) and keys ([HP or 1, 1, N]); rows_ok3
    marks real rows. S2 = qk * scale2 (+ log2(e) * additive mask), ``scale2`` = scale * log2(e);
    ``offset3`` (the row max in the second sweep, 0 in the first) is subtracted in the same fused
    multiply-add. Entries not kept (masked, or keys past N_K when KEYS_PADDED: only the last key
    block has those) get -inf; without a mask and KEYS_PADDED False ``kept`` is all True.
    Rows outside ``rows_ok3`` keep their scores (their outputs are never stored).
    """
    kept = tl.full(qk.shape, True, tl.int1)  # (unused unless something is masked)
    key_ok = keys3 < N_K
    if MASK_KIND != 2:
        s = qk * scale2 - offset3
    if MASK_KIND != 0:
        ptrs = (MASK + b * stride_mb) + (head3 * stride_mh + rows3 * stride_mm + keys3 * stride_mn)
        ok = rows_ok3 & key_ok
        if MASK_KIND == 1:
            kept = tl.load(ptrs, mask=ok, other=1) != 0
        else:
            add = tl.load(ptrs, mask=ok, other=0.0).to(CDT)
            kept = add != float("-inf")
            # Clamped so log2(e) * add stays finite: a fill of finfo.min must stay a (huge) finite
            # score, as in eager, not turn into -inf and mask the entry. The offset goes last:
            # with a large fill, S2 - m2 is exact only as (qk + mask) - m2.
            s = (qk * scale2 + tl.maximum(add, _MASK_FLOOR(CDT)) * LOG2E) - offset3
        if KEYS_PADDED:
            kept = kept & key_ok
    elif KEYS_PADDED:
        kept = tl.broadcast_to(key_ok, s.shape)
    if MASK_KIND != 0 or KEYS_PADDED:
        s = tl.where(kept, s, float("-inf"))
    return s, kept


@triton.jit
def _row_stats_block(m_i, l_i, q, Qb, Kb, b, head, rows, rows_ok, start_n, N_K, D, stride_qh, stride_qm,
                     stride_qd, stride_kh, stride_kn, stride_kd, scale2, MASK, stride_mb, stride_mh, stride_mm,
                     stride_mn, HP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_D: tl.constexpr, D_CHUNKS: tl.constexpr, CDT: tl.constexpr, MASK_KIND: tl.constexpr,
                     RAW_MAX: tl.constexpr, KEYS_PADDED: tl.constexpr, EVEN_D: tl.constexpr, DOT_LOWP: tl.constexpr,
                     LOWP_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One key block of the first sweep: the online row max and sum, updated.

    RAW_MAX (no additive mask, scale > 0): the max runs on q.k itself and the scale goes into the
    exponent's fused multiply-add, so m_i is the max of q.k, not of S2.
    """
    offs_n = start_n + tl.arange(0, BLOCK_N)
    qk = _scores_product(q, Qb, Kb, head, rows, rows_ok, offs_n, N_K, D, stride_qh, stride_qm, stride_qd,
                         stride_kh, stride_kn, stride_kd, HP, BLOCK_M, BLOCK_N, BLOCK_D, D_CHUNKS, CDT, DOT_LOWP,
                         LOWP_DTYPE, DOT_PRECISION, KEYS_PADDED, EVEN_D)
    zero = tl.zeros([HP, BLOCK_M, 1], CDT)
    head3 = head[:, None, None]
    rows3 = rows[:, :, None]
    rows_ok3 = rows_ok[:, :, None]
    keys3 = offs_n[None, None, :]
    if RAW_MAX:
        s, _ = _scores(qk, zero, b, head3, rows3, rows_ok3, keys3, N_K, 1.0, MASK, stride_mb, stride_mh, stride_mm,
                       stride_mn, CDT, MASK_KIND, KEYS_PADDED)
        m_new = tl.maximum(m_i, tl.max(s, axis=2))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new) * scale2
        l_i = l_i * tl.exp2(m_i * scale2 - m_ref) + tl.sum(tl.exp2(s * scale2 - m_ref[:, :, None]), axis=2)
    else:
        s, _ = _scores(qk, zero, b, head3, rows3, rows_ok3, keys3, N_K, scale2, MASK, stride_mb, stride_mh,
                       stride_mm, stride_mn, CDT, MASK_KIND, KEYS_PADDED)
        m_new = tl.maximum(m_i, tl.max(s, axis=2))
        # Nothing kept yet in a row: m_new = -inf; 0 as the reference keeps exp2 at 0, not NaN.
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_ref) + tl.sum(tl.exp2(s - m_ref[:, :, None]), axis=2)
    return m_new, l_i


@triton.jit
def _row_stats(q, Qb, Kb, b, head, slot_ok, rows, rows_ok, N_K, D, stride_qh, stride_qm, stride_qd,
               stride_kh, stride_kn, stride_kd, scale2, MASK, stride_mb, stride_mh, stride_mm, stride_mn,
               HP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
               D_CHUNKS: tl.constexpr, CDT: tl.constexpr, MASK_KIND: tl.constexpr, RAW_MAX: tl.constexpr,
               EVEN_D: tl.constexpr, DOT_LOWP: tl.constexpr, LOWP_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
               TAIL_N: tl.constexpr = 0, TAIL_PIPELINED: tl.constexpr = False):
    """The first key sweep: (m2, l2) [HP, BLOCK_M], the row max of S2 and log2 of sum 2^(S2 - m2).

    Online over key blocks; the keys past the last full block pay for the key-padding select:
    one peeled block, or (TAIL_N) a loop of TAIL_N-key blocks, pipelined as the kernel's loops with
    TAIL_PIPELINED (kernels/forward.py says when). A row with no key kept gets
    (+inf, 0), so 2^((S2 - m2) - l2) = 0.
    Padding slots get (0, 0): their P is 1 wherever kept, which ``_slot_params`` uses to add the
    mixing bias inside the mixing product.
    """
    m_i = tl.full([HP, BLOCK_M], float("-inf"), CDT)
    l_i = tl.zeros([HP, BLOCK_M], CDT)
    n_full = (N_K // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        m_i, l_i = _row_stats_block(m_i, l_i, q, Qb, Kb, b, head, rows, rows_ok, start_n, N_K, D, stride_qh,
                                    stride_qm, stride_qd, stride_kh, stride_kn, stride_kd, scale2, MASK, stride_mb,
                                    stride_mh, stride_mm, stride_mn, HP, BLOCK_M, BLOCK_N, BLOCK_D, D_CHUNKS, CDT,
                                    MASK_KIND, RAW_MAX, False, EVEN_D, DOT_LOWP, LOWP_DTYPE, DOT_PRECISION)
    if TAIL_N == 0:
        if n_full < N_K:
            m_i, l_i = _row_stats_block(m_i, l_i, q, Qb, Kb, b, head, rows, rows_ok, n_full, N_K, D, stride_qh,
                                        stride_qm, stride_qd, stride_kh, stride_kn, stride_kd, scale2, MASK,
                                        stride_mb, stride_mh, stride_mm, stride_mn, HP, BLOCK_M, BLOCK_N, BLOCK_D,
                                        D_CHUNKS, CDT, MASK_KIND, RAW_MAX, True, EVEN_D, DOT_LOWP, LOWP_DTYPE,
                                        DOT_PRECISION)
    else:
        for start_n in tl.range(n_full, N_K, TAIL_N, num_stages=None if TAIL_PIPELINED else 1):
            m_i, l_i = _row_stats_block(m_i, l_i, q, Qb, Kb, b, head, rows, rows_ok, start_n, N_K, D, stride_qh,
                                        stride_qm, stride_qd, stride_kh, stride_kn, stride_kd, scale2, MASK,
                                        stride_mb, stride_mh, stride_mm, stride_mn, HP, BLOCK_M, TAIL_N, BLOCK_D,
                                        D_CHUNKS, CDT, MASK_KIND, RAW_MAX, True, EVEN_D, DOT_LOWP, LOWP_DTYPE,
                                        DOT_PRECISION)
    if RAW_MAX:
        m_i = m_i * scale2
    empty = l_i == 0.0
    m2 = tl.where(empty, float("inf"), m_i)
    l2 = tl.where(empty, 0.0, tl.log2(tl.where(empty, 1.0, l_i)))
    return _padding_slot_stats(m2, l2, slot_ok)


@triton.jit
def _padding_slot_stats(m2, l2, slot_ok):
    """(m2, l2) with (0, 0) on padding slots, whose q is 0: their P = 2^(0 - 0 - 0) = 1 where kept."""
    return tl.where(slot_ok[:, None], m2, 0.0), tl.where(slot_ok[:, None], l2, 0.0)


@triton.jit
def _load_row_stats(STATS, slot_ok, rows, rows_ok, head, stride_sp, stride_sh, stride_sm, CDT: tl.constexpr):
    """(m2, l2) [HP, BLOCK_M] from a [2, .., H, Nq] statistics tensor (one batch element).

    (+inf, 0) on rows past N_Q, (0, 0) on padding slots (``_padding_slot_stats``).
    """
    ptrs = STATS + (head[:, None] * stride_sh + rows * stride_sm)
    m2 = tl.load(ptrs, mask=rows_ok, other=float("inf")).to(CDT)
    l2 = tl.load(ptrs + stride_sp, mask=rows_ok, other=0.0).to(CDT)
    return _padding_slot_stats(m2, l2, slot_ok)


@triton.jit
def _store_row_stats(STATS, m2, l2, rows, rows_ok, head, stride_sp, stride_sh, stride_sm):
    ptrs = STATS + (head[:, None] * stride_sh + rows * stride_sm)
    tl.store(ptrs, m2.to(STATS.dtype.element_ty), mask=rows_ok)
    tl.store(ptrs + stride_sp, l2.to(STATS.dtype.element_ty), mask=rows_ok)


@triton.jit
def _dropout_keep(seed, b, H, head3, rows3, key0, dropout_p, HP: tl.constexpr, M: tl.constexpr, N: tl.constexpr):
    """Bool keep-mask of dropout [HP, M, N] for batch ``b`` at the slots' heads ``head3`` [HP, 1, 1],
    query rows ``rows3`` ([HP or 1, M, 1]) and the N keys ``key0 + arange(N)`` (key0 a multiple of 4,
    a scalar or [HP, 1, 1]).

    Z[b, h, i, j] = (u >= p), u the (j % 4)-th word of Philox4x32-10(seed; j // 4, i, b * H + h, 0)
    as a uniform float: one Philox evaluation (its ten rounds are most of dropout's cost) serves four
    consecutive keys, and the pattern is a function of the position alone, replayed by every sweep.
    """
    zero = tl.zeros([HP, M, N // 4], tl.int32)
    c0 = zero + (key0 // 4 + tl.arange(0, N // 4)[None, None, :])
    c1 = zero + rows3
    c2 = zero + (b * H + head3).to(tl.int32)
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, c2, zero)
    # Interleave the words so key 4t + w gets word w: join adds a trailing axis of 2, twice.
    r = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), [HP, M, N])
    return tl.random.uint_to_uniform_float(r) >= dropout_p


@triton.jit
def _probs(t2, l2_3, b, H, head3, rows3, key0, seed, dropout_p, CDT: tl.constexpr, HAS_DROPOUT: tl.constexpr,
           KEYS_FIRST: tl.constexpr):
    """(P, P~ = dropout(P), drop_scale = Z / (1 - p)) from t2 = S2 - m2 and the row log-sums l2.

    Tiles are [HP, queries, keys], or [HP, keys, queries] with KEYS_FIRST (the key-major backward);
    rows3 is the queries as [HP or 1, M, 1] either way, key0 the first key (``_dropout_keep``).
    """
    p = tl.exp2(t2 - l2_3)
    if HAS_DROPOUT:
        if KEYS_FIRST:
            keep = tl.permute(_dropout_keep(seed, b, H, head3, rows3, key0, dropout_p, t2.shape[0], t2.shape[2],
                                            t2.shape[1]), (0, 2, 1))
        else:
            keep = _dropout_keep(seed, b, H, head3, rows3, key0, dropout_p, t2.shape[0], t2.shape[1], t2.shape[2])
        # 1 / (1 - p) in the computation dtype (fp64 for fp64 inputs), not in fp32.
        drop_scale = tl.where(keep, 1.0 / (tl.full([], 1.0, CDT) - dropout_p), 0.0)
        p_tilde = p * drop_scale
    else:
        drop_scale = tl.full(p.shape, 1.0, CDT)
        p_tilde = p
    return p, p_tilde, drop_scale


@triton.jit
def _mix(w_slots, x, HP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CDT: tl.constexpr,
         DOT_LOWP: tl.constexpr, MIX_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """w_slots [HP, HP] @ x [HP, BLOCK_M, BLOCK_N] over the slot axis, on the tensor cores.

    With DOT_LOWP the operands are MIX_DTYPE: fp16 in the forward (probabilities and mixing
    weights are of order 1: fp16 keeps three more bits than bf16), bf16 for gradients (their range
    is not bounded). A 16-bit product needs K >= 16: at HP = 8 the entries are split in two halves
    stacked as 16 rows, mixed by the block diagonal [[W, 0], [0, W]]; so do 32-bit products at HP = 8
    where Triton asks K >= 16 of them (``K8_DOTS``).
    """
    if HP == 8 and (DOT_LOWP or not K8_DOTS):
        out = _mix_halves(w_slots, w_slots, x, HP, BLOCK_M, BLOCK_N, CDT, DOT_LOWP, MIX_DTYPE, DOT_PRECISION)
    else:
        E: tl.constexpr = BLOCK_M * BLOCK_N
        flat = tl.reshape(x, (HP, E))
        out = tl.reshape(_mm(w_slots, flat, tl.zeros([HP, E], CDT), DOT_LOWP, MIX_DTYPE, DOT_PRECISION),
                         (HP, BLOCK_M, BLOCK_N))
    return out


@triton.jit
def _mix_halves(w_first, w_second, x, HP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                CDT: tl.constexpr, DOT_LOWP: tl.constexpr, MIX_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """``_mix``'s K = 16 form at HP = 8: x's entries [HP, BLOCK_M, BLOCK_N] in two halves (query rows below and
    from BLOCK_M / 2) stacked as 16 rows and mixed by the block diagonal [[w_first, 0], [0, w_second]]; the
    forward's value sums give the second half weights of their own (``forward._value_sums_weights``)."""
    E: tl.constexpr = BLOCK_M * BLOCK_N
    w2 = tl.reshape(tl.permute(tl.join(tl.join(w_first, tl.zeros_like(w_first)),
                                       tl.join(tl.zeros_like(w_second), w_second)), (2, 0, 3, 1)), (16, 16))
    x2 = tl.reshape(tl.permute(tl.reshape(x, (HP, 2, E // 2)), (1, 0, 2)), (16, E // 2))
    out2 = _mm(w2, x2, tl.zeros([16, E // 2], CDT), DOT_LOWP, MIX_DTYPE, DOT_PRECISION)
    return tl.reshape(tl.permute(tl.reshape(out2, (2, HP, E // 2)), (1, 0, 2)), (HP, BLOCK_M, BLOCK_N))


@triton.jit
def _layer_norm(mix, group_mean, eps, HP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                CDT: tl.constexpr, DOT_PRECISION: tl.constexpr, APPROX_RSQRT: tl.constexpr, CENTERED: tl.constexpr):
    """(xhat, rstd) of LayerNorm across the heads of each row group at every (i, j).

    CENTERED: ``mix`` is already M - mean(M), mixed by centered weights (``_center_across_heads``).

    ``group_mean`` [HP, HP] averages the slots of a group (1/H between slots of one group, 0
    elsewhere), so the means are products on the tensor cores: mean = J M, var = J (M - mean)^2.
    They run in fp32 (tf32 operands on a GPU: fp16 would flush the small variances of attention
    maps to subnormals). Padding slots come out 0.

    APPROX_RSQRT, with tf32 means (DOT_PRECISION "tf32": fp16/bf16 inputs, or fp32 with TF32 allowed): 1/std
    is one approximate reciprocal square root (``rsqrt.approx``, relative error below 2^-22, PTX ISA), far
    below the means' own 2^-11. The correctly rounded 1/sqrt(x) takes a square root and a division with
    their special-case paths, ~10 instructions per entry of the tile (the LayerNorm forward at DeiT-S
    issued 160 of its ~600 instructions per key block there). With exact means ("ieee": fp32 and fp64
    inputs) it stays correctly rounded; the dK/dV kernel keeps it too (at 8 slots, D = 64, its LayerNorm
    launch then spilled 16 B at 255 registers, and it is bound by shared memory, not by issue).
    """
    xc = mix
    if not CENTERED:
        xc = mix - _mix(group_mean, mix, HP, BLOCK_M, BLOCK_N, CDT, False, CDT, DOT_PRECISION)
    var = _mix(group_mean, xc * xc, HP, BLOCK_M, BLOCK_N, CDT, False, CDT, DOT_PRECISION)
    if APPROX_RSQRT and DOT_PRECISION == "tf32":
        rstd = tl.math.rsqrt(var + eps)
    else:
        rstd = 1.0 / tl.sqrt(var + eps)
    return xc * rstd, rstd


@triton.jit
def _head_vector(X, head, slot_ok, stride, CDT: tl.constexpr, PRESENT: tl.constexpr, DEFAULT: tl.constexpr):
    """[HP] per-slot copy of a per-head vector (DEFAULT where absent or on padding slots)."""
    if PRESENT:
        return tl.load(X + head * stride, mask=slot_ok, other=DEFAULT).to(CDT)
    else:
        return tl.full([head.shape[0]], DEFAULT, CDT)


@triton.jit
def _slot_params(W, C, NW, NB, BN, head, slot_ok, H, out_scale, stride_wg, stride_wh, stride_c, stride_nw,
                 stride_nb, HP: tl.constexpr, G: tl.constexpr, CDT: tl.constexpr, HAS_MIX_BIAS: tl.constexpr,
                 NORM: tl.constexpr, HAS_NORM_WEIGHT: tl.constexpr, HAS_NORM_BIAS: tl.constexpr,
                 BIAS_SLOT: tl.constexpr, FOLD: tl.constexpr):
    """Per-slot parameters (w_slots [HP, HP], c [HP], gamma [HP], beta [HP]) with the affine maps folded in.

    w_slots[s, s'] = W[head(s), head(s')] between slots of one row group, 0 elsewhere. The output
    scale tau and any norm that is an affine map per head are folded into the mixing, so the
    normalized map is ``w_slots @ P~ + c`` directly: NORM_NONE: tau W, tau c. NORM_BATCH (the
    batch statistics are given, BN [2, H] = mean, 1/std): alpha = tau gamma / std, alpha W and
    alpha (c - mean) + tau beta. NORM_LAYER keeps W and c and returns tau gamma, tau beta for
    after the normalization. Without FOLD (the backward): W, c, gamma, beta as given.

    BIAS_SLOT (a padding slot exists and there is no dropout): the bias becomes that slot's column
    of w_slots, whose P is 1 wherever kept (``_padding_slot_stats``), so the tensor cores add it;
    c comes back 0.
    """
    offs_s = tl.arange(0, HP)
    same_group = (offs_s // H)[:, None] == (offs_s // H)[None, :]
    w = tl.load(W + head[:, None] * stride_wg + head[None, :] * stride_wh,
                mask=same_group & slot_ok[:, None] & slot_ok[None, :], other=0.0).to(CDT)
    c = _head_vector(C, head, slot_ok, stride_c, CDT, HAS_MIX_BIAS, 0.0)
    gamma = _head_vector(NW, head, slot_ok, stride_nw, CDT, HAS_NORM_WEIGHT, 1.0)
    beta = _head_vector(NB, head, slot_ok, stride_nb, CDT, HAS_NORM_BIAS, 0.0)
    if not FOLD:
        pass
    elif NORM == 2:
        mean = tl.load(BN + head, mask=slot_ok, other=0.0).to(CDT)
        alpha = out_scale * gamma * tl.load(BN + H + head, mask=slot_ok, other=0.0).to(CDT)
        w = w * alpha[:, None]
        c = alpha * (c - mean) + out_scale * beta
    elif NORM == 1:
        gamma = gamma * out_scale
        beta = beta * out_scale
    else:
        w = w * out_scale
        c = c * out_scale
    if BIAS_SLOT:
        w = tl.where(offs_s[None, :] == G * H, c[:, None], w)
        c = tl.zeros_like(c)
    return w, c, gamma, beta


@triton.jit
def _group_mean(H, slot_ok, HP: tl.constexpr, CDT: tl.constexpr):
    """[HP, HP] averaging matrix of LayerNorm across heads: 1/H between real slots of one row group."""
    offs_s = tl.arange(0, HP)
    same = ((offs_s // H)[:, None] == (offs_s // H)[None, :]) & slot_ok[:, None] & slot_ok[None, :]
    return tl.where(same, tl.full([], 1.0, CDT) / H, 0.0)


@triton.jit
def _center_across_heads(w_slots, c, slot_ok, H, HP: tl.constexpr, G: tl.constexpr, CDT: tl.constexpr,
                         HAS_MIX_BIAS: tl.constexpr, BIAS_SLOT: tl.constexpr):
    """(w_slots, c) of ``_slot_params`` (NORM_LAYER, BIAS_SLOT's placement) minus their means over the heads.

    LayerNorm across heads subtracts mean_g M_g = sum_h mean_g(W[g, h]) P_h + mean(c) from
    M_g = sum_h W[g, h] P_h + c_g: linear in P, so the centered map is one product, (W - 1 mean_g(W)) P + (c - mean(c)),
    where the norm took a second product for the mean and a subtraction at every entry (and M cancelled against its
    mean). Every row group holds the same H x H weights, so each column's mean over the rows of its own group serves
    them all; the means come from w_slots and c (or the bias slot's column) as given, with no load of W or C again.
    """
    offs = tl.arange(0, HP)
    same = ((offs // H)[:, None] == (offs // H)[None, :]) & slot_ok[:, None] & slot_ok[None, :]
    col_mean = tl.sum(tl.where(same, w_slots, 0.0), axis=0) / H  # [HP]: mean over the heads g of W[g, head(s)]
    w_slots = tl.where(same, w_slots - col_mean[None, :], w_slots)
    if HAS_MIX_BIAS:
        if BIAS_SLOT:  # the bias is the padding slot's column (``_slot_params``), c came back 0
            bias_column = (offs[None, :] == G * H) & (offs < H)[:, None]
            c_mean = tl.sum(tl.sum(tl.where(bias_column, w_slots, 0.0), axis=1), axis=0) / H
            w_slots = tl.where((offs[None, :] == G * H) & slot_ok[:, None], w_slots - c_mean, w_slots)
        else:
            c_mean = tl.sum(tl.where(offs < H, c, 0.0), axis=0) / H
            c = tl.where(slot_ok, c - c_mean, c)
    return w_slots, c
