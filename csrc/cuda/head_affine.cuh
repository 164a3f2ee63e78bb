// The element-wise steps of one-sweep training BatchNorm (HeadAffineParams in params.h; docs/math.md,
// "Training BatchNorm in one sweep"), written once for the GPU and the host emulator (device.cuh).
//
// Once the batch statistics are summed, the norm is a per-head affine map that commutes with the
// product by V, so the forward's finish is O = alpha[h] R' + beta[h] U, and the backward's BatchNorm
// sums are sums over [B, Nq, D] per head of dO . R and dO . U with R = xhat V = rstd (R' - mean(X) U):
// the backward reads the R' the forward kept and forms R's sum from the per-head constants, so the
// forward writes nothing for it. Both are memory-bound: each element is read once (and O written once).
// Where the rows allow (the host's HeadAffineParams::vector) a thread item is one 16-byte access of
// each 16-bit tensor (8 columns; each fp32 input: two 16-byte loads), against 8 accesses of each and
// the index arithmetic per element. Where they do not (a head dim such as 35) but a head's rows lie D
// apart in every tensor and U is one row, a 16-bit block walks its rows as one flat span in such 16-byte
// groups instead (for_each_group), whatever D; each block decides that for itself, from the parameters.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "block.cuh"
#include "parameters.cuh"
#include "params.h"

namespace reattn {
namespace cuda {

// The query rows [begin, end) of head h of batch element b that this block owns.
struct HeadRows {
  int64_t b;
  int h, begin, end;
};

REATTN_FN HeadRows head_rows(const HeadAffineParams& p) {
  // Unsigned (B H fits int32, checked by the host): the division takes no sign fixes.
  const unsigned bh = dev::block_index_x(), H = static_cast<unsigned>(p.H);
  const unsigned b = bh / H;
  HeadRows rows;
  rows.b = b;
  rows.h = static_cast<int>(bh - b * H);
  rows.begin = dev::block_index_y() * p.rows;
  rows.end = rows.begin + p.rows < p.Nq ? rows.begin + p.rows : p.Nq;
  return rows;
}

// The element offset of the block's first element in a [B, H, Nq, D] tensor with strides st.
REATTN_FN int64_t block_offset(const Strides4& st, const HeadRows& rows) {
  return rows.b * st.b + rows.h * st.h + static_cast<int64_t>(rows.begin) * st.n;
}

// The first element of the block's first row in a [B, H, Nq, D] tensor with strides st.
template <typename E>
REATTN_FN E* block_start(E* base, const Strides4& st, const HeadRows& rows) {
  return base + block_offset(st, rows);
}

// The strides of head_affine's output, a contiguous [B, H, Nq, D] tensor.
REATTN_FN Strides4 out_strides(const HeadAffineParams& p) {
  return Strides4{int64_t(p.H) * p.Nq * p.D, int64_t(p.Nq) * p.D, p.D, 1};
}

// kVec consecutive columns of a row, as whole 16-byte accesses where kVec * sizeof(X) is a multiple of
// 16 (the vector items: 8 columns of a 16-bit type, 4 of fp32; the address 16-byte aligned), else one
// element (kVec = 1).
template <typename X, int kVec>
REATTN_FN void load_columns(const X* address, X (&x)[kVec]) {
  if constexpr (kVec == 1) {
    x[0] = *address;
  } else {
    static_assert(kVec * sizeof(X) % 16 == 0, "vector items are whole 16-byte loads");
#pragma unroll
    for (int k = 0; k < kVec * static_cast<int>(sizeof(X)) / 16; ++k) {
      const dev::Words4 v = dev::load_16(reinterpret_cast<const char*>(address) + 16 * k);
      std::memcpy(reinterpret_cast<char*>(x) + 16 * k, v.w, 16);
    }
  }
}

template <typename T, int kVec>
REATTN_FN void load_columns_as_acc(const T* address, typename Storage<T>::acc (&x)[kVec]) {
  T t[kVec];
  load_columns<T, kVec>(address, t);
  for (int k = 0; k < kVec; ++k) x[k] = Storage<T>::load(t[k]);
}

template <typename T, int kVec>
REATTN_FN void store_columns(T* address, const typename Storage<T>::acc (&x)[kVec]) {
  T t[kVec];
  for (int k = 0; k < kVec; ++k) t[k] = Storage<T>::store(x[k]);
  if constexpr (kVec == 1) {
    *address = t[0];
  } else {
    static_assert(kVec * sizeof(T) % 16 == 0, "vector items are whole 16-byte stores of T");
#pragma unroll
    for (int k = 0; k < kVec * static_cast<int>(sizeof(T)) / 16; ++k) {
      dev::Words4 v;
      std::memcpy(v.w, reinterpret_cast<const char*>(t) + 16 * k, 16);
      dev::store_16(reinterpret_cast<char*>(address) + 16 * k, v);
    }
  }
}

// Columns per vector item: one 16-byte access of T (8 of a 16-bit type, 4 of fp32), the accumulation
// type's loads then whole 16-byte ones too; fp64 has none (1).
template <typename T>
constexpr int vector_columns() {
  return sizeof(typename Storage<T>::acc) == 4 ? 16 / static_cast<int>(sizeof(T)) : 1;
}

// Runs body(e, i, d) for each item of the block: item e covers columns [d, d + kVec) of the block's local
// row i; consecutive threads take consecutive items, so every warp access is contiguous. columns(d) runs
// before the items of columns d: once per thread where a thread keeps its columns, else before each item.
template <int kVec, typename Columns, typename Body>
REATTN_FN void for_each_item(const HeadAffineParams& p, const HeadRows& rows, Columns&& columns, Body&& body) {
  const unsigned per_row = static_cast<unsigned>(p.D / kVec);
  const unsigned count = static_cast<unsigned>(rows.end - rows.begin);
  const unsigned t = dev::thread_index();
  if (per_row <= kHeadAffineThreads / 2 || kHeadAffineThreads % per_row == 0) {
    // A pass of the block's first step * per_row threads covers `step` whole rows (every thread where
    // per_row divides 256: D = 32, 64, 128 with vector items; 245 of 256 at D = 35): a thread keeps its
    // columns and steps its row by a constant, so an item costs its loads, its arithmetic and a few address
    // additions, with no division (at D = 35, 35 integer instructions per element went to the division
    // and the 64-bit addresses of each item).
    const unsigned step = kHeadAffineThreads / per_row;
    const unsigned first = t / per_row, column = t - first * per_row;
    if (first >= step) return;
    columns(column * kVec);
    for (unsigned i = first; i < count; i += step) body(i * per_row + column, i, column * kVec);
    return;
  }
  // Unsigned: the division by per_row is a multiply-high and one correction, without sign fixes.
  const unsigned items = count * per_row;
  for (unsigned e = t; e < items; e += kHeadAffineThreads) {
    const unsigned i = e / per_row, d = (e - i * per_row) * kVec;
    columns(d);
    body(e, i, d);
  }
}

// The sum of `parts` rows `stride` apart at columns [d, d + kVec), added in order, one part at a time (a few per
// column, once per block).
template <typename A, int kVec>
REATTN_FN void load_parts(const A* u, int parts, int64_t stride, unsigned d, A (&y)[kVec]) {
  load_columns<A, kVec>(u + d, y);
#pragma unroll 1
  for (int k = 1; k < parts; ++k) {
    A z[kVec];
    load_columns<A, kVec>(u + k * stride + d, z);
    for (int c = 0; c < kVec; ++c) y[c] += z[c];
  }
}

// U's kVec columns from d of the block's row i into y. Where U is one row per (b, h) broadcast over the rows
// (u_st.n == 0: no mask, every row sees every key; kRowsOfU false) each thread reads its columns once
// (columns(d) of for_each_item), not with every item, from that row staged in shared memory by the block
// (stage_u_row); else each item loads its row's columns.
template <typename A, int kVec, bool kRowsOfU>
struct UColumns {
  const A* u;  // the staged row in shared memory, or the block's first row of U
  int64_t row_stride;
  A y[kVec];

  REATTN_FN void columns(unsigned d) {
    if constexpr (!kRowsOfU) {
      for (int c = 0; c < kVec; ++c) y[c] = u[d + c];
    }
  }
  REATTN_FN void row(unsigned i, unsigned d) {
    if constexpr (kRowsOfU) load_columns<A, kVec>(u + static_cast<int64_t>(i) * row_stride + d, y);
  }
};

// Bytes of U's staged row (none where U has a row per query): D columns and vector_columns<T>() - 1 more that
// wrap around (stage_u_row), so the flat walk's groups read their columns at consecutive addresses.
template <typename T>
REATTN_HD constexpr size_t staged_u_bytes(int D, bool staged) {
  return staged ? static_cast<size_t>(D + vector_columns<T>() - 1) * sizeof(typename Storage<T>::acc) : 0;
}

// Dynamic shared memory of head_affine_program: U's staged row.
template <typename T>
REATTN_HD constexpr size_t head_affine_shared(int D, bool staged) {
  return staged_u_bytes<T>(D, staged);
}

// U's row of the block's (b, h) into shared memory at `row`, times `scale` where kScaled (head_affine's flat
// walk stages beta U, so each element takes one FFMA), each item of kVec columns by one thread: its u_parts parts
// added in order (load_parts; one part where U comes summed), and by the blocks of query row 0 also stored to u_sum
// (unscaled) where that is set (after the forward's shares). kWrap entries past D repeat the first columns (row[j]
// = scale U[j mod D]) for the flat walk (for_each_group). Read from global memory by every thread, U's columns
// were most of the L2 requests of head_affine (4 to 7 parts of 32 bytes for 32 bytes of R' and 16 of O per item at
// DeiT-S and DeepViT-16b) and of head_dot_sums (static model). First thing in the block, from nothing but the
// parameters, so nothing of the items' state is live across it: otherwise head_affine needs 46 or more registers
// on sm_90 (5 blocks per SM where 6 fit at 40) or ptxas spills one on sm_80.
template <typename A, int kVec, int kWrap = 0, bool kScaled = false>
REATTN_FN void stage_u_row(const HeadAffineParams& p, A* row, A scale = A(1)) {
  const HeadRows rows = head_rows(p);
  const A* u = block_start(static_cast<const A*>(p.u), p.u_st, rows);
  A* u_sum = rows.begin == 0 && p.u_sum != nullptr ? static_cast<A*>(p.u_sum) + (rows.b * p.H + rows.h) * p.D
                                                    : nullptr;
  for (unsigned d = dev::thread_index() * kVec; d < static_cast<unsigned>(p.D); d += kHeadAffineThreads * kVec) {
    A y[kVec];
    load_parts<A, kVec>(u, p.u_parts, p.u_part_stride, d, y);
    for (int c = 0; c < kVec; ++c) row[d + c] = kScaled ? scale * y[c] : y[c];
    if (u_sum != nullptr) store_columns<A, kVec>(u_sum + d, y);
  }
  if constexpr (kWrap > 0) {
    const unsigned D = static_cast<unsigned>(p.D);
    for (unsigned j = D + dev::thread_index(); j < D + kWrap; j += kHeadAffineThreads) {
      unsigned d = j - D;
      while (d >= D) d -= D;  // more than once only where D < kWrap
      A y[1];
      load_parts<A, 1>(u, p.u_parts, p.u_part_stride, d, y);
      row[j] = kScaled ? scale * y[0] : y[0];
    }
  }
  dev::sync_threads();
}

// The flat walk of a block's rows [begin, end) where, in every tensor it reads, a head's rows are D apart (so
// they are one span of (end - begin) D elements) and U is one staged row: the span goes in groups of kVec
// elements at offsets where each tensor's address is 16-byte aligned (one 16-byte access of each, whatever D:
// DeepViT-L's 35 took one access per element and the index arithmetic of each, ~17 integer instructions an
// element), the lead elements before the first group and the tail after the last (each fewer than kVec) one per
// thread. Span element j is column j mod D (the span starts at a row); a thread's groups are 256 kVec elements
// apart, so its column steps by that modulo D with no division past the first. body(n, at_a, at_b, d): n
// (std::integral_constant) elements at at_a and at_b, the two tensors' span starts a and b plus j, of columns d..
// d + n - 1 (read from the staged row, wrapped past D). A thread's groups take running pointers (offsets from the
// span's start took a 64-bit address computation per tensor and group). lead: the elements before the first
// aligned group, at most span.
template <int kVec>
constexpr unsigned kGroupStep = kHeadAffineThreads * kVec;

template <int kVec, typename A, typename B, typename Body>
REATTN_FN void for_each_group(unsigned span, unsigned lead, unsigned D, A* a, B* b, Body&& body) {
  const unsigned t = dev::thread_index();
  const unsigned groups_end = lead + (span - lead) / kVec * kVec;
  constexpr std::integral_constant<int, 1> single{};
  if (t < lead) {
    body(single, a + t, b + t, t % D);
  } else if (t >= static_cast<unsigned>(kVec) && t - kVec < span - groups_end) {
    const unsigned j = groups_end + (t - kVec);
    body(single, a + j, b + j, j % D);
  }
  unsigned j = lead + t * kVec;
  if (j >= groups_end) return;
  A* at_a = a + j;
  B* at_b = b + j;
  const unsigned step_d = kGroupStep<kVec> % D;
  unsigned d = j % D;
  for (; j < groups_end; j += kGroupStep<kVec>) {
    body(std::integral_constant<int, kVec>{}, at_a, at_b, d);
    at_a += kGroupStep<kVec>;
    at_b += kGroupStep<kVec>;
    d += step_d;
    if (d >= D) d -= D;
  }
}

// The storage types that take the flat walk where it applies: the 16-bit ones, which the tensor-core forward writes
// R' in. fp32 and fp64 keep the items (with the walk in the same kernel, ptxas put 8 bytes of head_dot_sums' fp32
// build on the stack on sm_90).
template <typename T>
constexpr bool kFlatWalk = sizeof(T) == 2;

// Whether an address is 16-byte aligned.
REATTN_FN bool aligned_16(const void* address) { return (reinterpret_cast<uintptr_t>(address) & 15) == 0; }

// The lead of for_each_group for a span whose first element sits `offset` elements past a 16-byte aligned base
// (kVec elements of 16 bytes), capped at the span.
template <int kVec>
REATTN_FN unsigned group_lead(int64_t offset, unsigned span) {
  const unsigned lead = static_cast<unsigned>(-offset) & (kVec - 1);
  return lead < span ? lead : span;
}

// out = alpha[h] R' + beta[h] U, rounded once to T from the accumulation type; R' of type R (the
// accumulation type, or T). The block's rows are items of kVec columns, spread over all its threads
// (consecutive threads, consecutive columns: every warp access is contiguous).
template <typename T, typename R, int kVec, bool kRowsOfU>
REATTN_FN void head_affine_items(const HeadAffineParams& p) {
  using A = typename Storage<T>::acc;
  A* staged = reinterpret_cast<A*>(dev::shared_memory());
  if constexpr (!kRowsOfU) stage_u_row<A, kVec>(p, staged);
  const HeadRows rows = head_rows(p);
  const A* coefficients = static_cast<const A*>(p.coefficients);
  const A alpha = coefficients[rows.h], beta = coefficients[p.H + rows.h];
  const R* r = block_start(static_cast<const R*>(p.r), p.r_st, rows);
  UColumns<A, kVec, kRowsOfU> u{kRowsOfU ? block_start(static_cast<const A*>(p.u), p.u_st, rows) : staged, p.u_st.n,
                                {}};
  T* out = block_start(static_cast<T*>(p.out), out_strides(p), rows);
  for_each_item<kVec>(p, rows, [&](unsigned d) { u.columns(d); }, [&](unsigned e, unsigned i, unsigned d) {
    A x[kVec], o[kVec];
    if constexpr (std::is_same<R, A>::value) {
      load_columns<A, kVec>(r + static_cast<int64_t>(i) * p.r_st.n + d, x);
    } else {
      load_columns_as_acc<T, kVec>(r + static_cast<int64_t>(i) * p.r_st.n + d, x);
    }
    u.row(i, d);
    for (int k = 0; k < kVec; ++k) o[k] = alpha * x[k] + beta * u.y[k];
    store_columns<T, kVec>(out + e * kVec, o);
  });
}

template <typename T, typename R, int kVec>
REATTN_FN void head_affine_items(const HeadAffineParams& p) {
  if (p.u_st.n != 0) return head_affine_items<T, R, kVec, true>(p);
  head_affine_items<T, R, kVec, false>(p);
}

template <typename T, int kVec>
REATTN_FN void head_affine_items(const HeadAffineParams& p) {
  if (p.r_is_acc) return head_affine_items<T, typename Storage<T>::acc, kVec>(p);
  head_affine_items<T, T, kVec>(p);
}

// Whether two tensors' spans can be walked in the same groups of kG elements: both 16-byte aligned and their
// block offsets (in elements) alike modulo kG, so a group aligned in one is aligned in the other.
template <int kG>
REATTN_FN bool groups_align(const void* a, int64_t a_offset, const void* b, int64_t b_offset) {
  static_assert(kG > 1 && (kG & (kG - 1)) == 0, "groups of 16 bytes: a power of two elements (kFlatWalk)");
  return aligned_16(a) && aligned_16(b) && ((a_offset - b_offset) & (kG - 1)) == 0;
}

// The flat walk's condition for head_affine's block: U one staged row, R's rows of a head D apart (O's are) and
// R's groups aligned with O's.
template <typename T>
REATTN_FN bool head_affine_flat_rows(const HeadAffineParams& p) {
  if (p.vector || p.u_st.n != 0 || p.r_st.n != p.D) return false;
  const HeadRows rows = head_rows(p);
  return groups_align<vector_columns<T>()>(p.r, block_offset(p.r_st, rows), p.out,
                                           block_offset(out_strides(p), rows));
}

// head_affine by the flat walk (for_each_group): out = alpha[h] R' + (beta[h] U), the staged row holding beta U.
template <typename T, typename R>
REATTN_FN void head_affine_flat(const HeadAffineParams& p) {
  using A = typename Storage<T>::acc;
  constexpr int kG = vector_columns<T>();
  const HeadRows rows = head_rows(p);
  const A* coefficients = static_cast<const A*>(p.coefficients);
  A* staged = reinterpret_cast<A*>(dev::shared_memory());
  stage_u_row<A, 1, kG - 1, true>(p, staged, coefficients[p.H + rows.h]);
  const A alpha = coefficients[rows.h];
  const R* r = block_start(static_cast<const R*>(p.r), p.r_st, rows);
  const int64_t out_offset = block_offset(out_strides(p), rows);
  T* out = static_cast<T*>(p.out) + out_offset;
  const unsigned span = static_cast<unsigned>(rows.end - rows.begin) * static_cast<unsigned>(p.D);
  for_each_group<kG>(span, group_lead<kG>(out_offset, span), static_cast<unsigned>(p.D), r, out,
                     [&](auto columns, const R* from, T* to, unsigned d) {
                       constexpr int kN = decltype(columns)::value;
                       A x[kN], o[kN];
                       if constexpr (std::is_same<R, A>::value) {
                         load_columns<A, kN>(from, x);
                       } else {
                         load_columns_as_acc<T, kN>(from, x);
                       }
                       for (int k = 0; k < kN; ++k) o[k] = alpha * x[k] + staged[d + k];
                       store_columns<T, kN>(to, o);
                     });
}

template <typename T>
REATTN_FN void head_affine_program(const HeadAffineParams& p) {
  if constexpr (kFlatWalk<T>) {
    if (head_affine_flat_rows<T>(p)) {
      if (p.r_is_acc) return head_affine_flat<T, typename Storage<T>::acc>(p);
      return head_affine_flat<T, T>(p);
    }
  }
  if constexpr (vector_columns<T>() > 1) {
    if (p.vector) return head_affine_items<T, vector_columns<T>()>(p);
  }
  head_affine_items<T, 1>(p);
}

// R = xhat V = rstd (R' - mean(X) U) of head g as (rstd, -mean(X) rstd), in float64 from the forward's
// statistics and the mixing parameters: the forward summed X = W P~ - center with center_g = sum_h W[g, h] / Nk
// (formed here in float64 as the forward's fold formed it before rounding it: they differ by that rounding, which
// R' rounded to 16 bits dwarfs), and its mean of M = W P~ + c is mean(X) + center + c.
// Every block forms them once, so they cost issue slots, not bytes: run by one whole warp (mixing_row_sum),
// 1 / Nk comes from the host and rstd from rsqrt_refined (parameters.cuh: no float64 square root or division
// subroutine).
REATTN_FN void kept_term_coefficients(const HeadAffineParams& p, int g, double& rstd, double& shift) {
  const double center = mixing_row_sum(p.W, p.H, g);
  const double mean_x = p.stats[g] - center * p.inv_keys - head_value(p.c, g, 0.0);
  rstd = rsqrt_refined(p.stats[p.H + g] + p.eps);
  shift = -mean_x * rstd;
}

// Dynamic shared memory of head_dot_sums_program: the warps' two partial sums, then U's staged row.
template <typename T>
REATTN_HD constexpr size_t head_dot_sums_warp_bytes() {
  return 2 * (kHeadAffineThreads / dev::kWarpSize) * sizeof(typename Storage<T>::acc);
}
template <typename T>
REATTN_HD constexpr size_t head_dot_sums_shared(int D, bool staged) {
  return head_dot_sums_warp_bytes<T>() + staged_u_bytes<T>(D, staged);
}

// The end of head_dot_sums' block: each thread's sums added over the warp by butterfly shuffles and over the
// warps in order by the first thread, which writes the block's two partials (see head_dot_sums_items).
template <typename T>
REATTN_FN void write_dot_sums(const HeadAffineParams& p, const HeadRows& rows, typename Storage<T>::acc sum_r,
                              typename Storage<T>::acc sum_u) {
  using A = typename Storage<T>::acc;
  for (int mask = dev::kWarpSize / 2; mask > 0; mask /= 2) {
    sum_r += dev::shfl_xor(sum_r, mask);
    sum_u += dev::shfl_xor(sum_u, mask);
  }
  A* warp_sums = reinterpret_cast<A*>(dev::shared_memory());  // [warps][2]
  if (dev::lane_index() == 0) {
    warp_sums[2 * dev::warp_index()] = sum_r;
    warp_sums[2 * dev::warp_index() + 1] = sum_u;
  }
  dev::sync_threads();
  if (dev::warp_index() != 0) return;
  double rstd, shift;
  kept_term_coefficients(p, rows.h, rstd, shift);
  if (dev::lane_index() == 0) {
    A total_r = 0, total_u = 0;
    for (int w = 0; w < kHeadAffineThreads / dev::kWarpSize; ++w) {
      total_r += warp_sums[2 * w];
      total_u += warp_sums[2 * w + 1];
    }
    const int64_t num_m = (p.Nq + p.rows - 1) / p.rows, blocks = p.B * p.H * num_m;
    A* out = static_cast<A*>(p.partials) + static_cast<int64_t>(dev::block_index_x()) * num_m + dev::block_index_y();
    out[0] = static_cast<A>(p.scale * (rstd * static_cast<double>(total_r) + shift * static_cast<double>(total_u)));
    out[blocks] = static_cast<A>(p.scale * static_cast<double>(total_u));
  }
}

// partials[0][block], partials[1][block] = scale (sum dO . R, sum dO . U) over the block's rows, in the
// accumulation type (block = (b h, row block)): each thread sums dO . R' and dO . U over its items, the
// warp adds its lanes by butterfly shuffles, and the first thread adds the warps in order (the same
// order on every run: deterministic) and forms sum dO . R = rstd sum dO . R' - mean(X) rstd sum dO . U
// (R is linear in R' and U) in float64. The rounding is that of sums of about rows * D / 256 terms per
// thread (fixed columns: ceil(rows / step) items), 5 shuffle levels, the 8 warps and the product by
// scale; the host adds the blocks in float64. Without a mask mean(X) is ~0 (X is centred and each row
// of P~ sums to one), so the second term cancels nothing.
template <typename T, int kVec, bool kRowsOfU>
REATTN_FN void head_dot_sums_items(const HeadAffineParams& p) {
  using A = typename Storage<T>::acc;
  A* staged = reinterpret_cast<A*>(dev::shared_memory() + head_dot_sums_warp_bytes<T>());
  if constexpr (!kRowsOfU) stage_u_row<A, kVec>(p, staged);
  const HeadRows rows = head_rows(p);
  const T* g = block_start(static_cast<const T*>(p.grad), p.grad_st, rows);
  const T* r = block_start(static_cast<const T*>(p.r), p.r_st, rows);
  UColumns<A, kVec, kRowsOfU> u{kRowsOfU ? block_start(static_cast<const A*>(p.u), p.u_st, rows) : staged, p.u_st.n,
                                {}};
  A sum_r = 0, sum_u = 0;
  for_each_item<kVec>(p, rows, [&](unsigned d) { u.columns(d); }, [&](unsigned, unsigned i, unsigned d) {
    A x[kVec], y[kVec];
    load_columns_as_acc<T, kVec>(g + static_cast<int64_t>(i) * p.grad_st.n + d, x);
    load_columns_as_acc<T, kVec>(r + static_cast<int64_t>(i) * p.r_st.n + d, y);
    u.row(i, d);
    for (int k = 0; k < kVec; ++k) {
      sum_r += x[k] * y[k];
      sum_u += x[k] * u.y[k];
    }
  });
  write_dot_sums<T>(p, rows, sum_r, sum_u);
}

template <typename T, int kVec>
REATTN_FN void head_dot_sums_items(const HeadAffineParams& p) {
  if (p.u_st.n != 0) return head_dot_sums_items<T, kVec, true>(p);
  head_dot_sums_items<T, kVec, false>(p);
}

// head_dot_sums by the flat walk (for_each_group) where U is one staged row and dO's and R's rows of a head are
// D apart, their groups aligned alike: the same sums as head_dot_sums_items, each thread's over its own elements.
template <typename T>
REATTN_FN bool head_dot_sums_flat_rows(const HeadAffineParams& p) {
  if (p.vector || p.u_st.n != 0 || p.r_st.n != p.D || p.grad_st.n != p.D) return false;
  const HeadRows rows = head_rows(p);
  return groups_align<vector_columns<T>()>(p.grad, block_offset(p.grad_st, rows), p.r, block_offset(p.r_st, rows));
}

template <typename T>
REATTN_FN void head_dot_sums_flat(const HeadAffineParams& p) {
  using A = typename Storage<T>::acc;
  constexpr int kG = vector_columns<T>();
  A* staged = reinterpret_cast<A*>(dev::shared_memory() + head_dot_sums_warp_bytes<T>());
  stage_u_row<A, 1, kG - 1>(p, staged);
  const HeadRows rows = head_rows(p);
  const int64_t grad_offset = block_offset(p.grad_st, rows);
  const T* g = static_cast<const T*>(p.grad) + grad_offset;
  const T* r = block_start(static_cast<const T*>(p.r), p.r_st, rows);
  const unsigned span = static_cast<unsigned>(rows.end - rows.begin) * static_cast<unsigned>(p.D);
  A sum_r = 0, sum_u = 0;
  for_each_group<kG>(span, group_lead<kG>(grad_offset, span), static_cast<unsigned>(p.D), g, r,
                     [&](auto columns, const T* at_g, const T* at_r, unsigned d) {
                       constexpr int kN = decltype(columns)::value;
                       A x[kN], y[kN];
                       load_columns_as_acc<T, kN>(at_g, x);
                       load_columns_as_acc<T, kN>(at_r, y);
                       for (int k = 0; k < kN; ++k) {
                         sum_r += x[k] * y[k];
                         sum_u += x[k] * staged[d + k];
                       }
                     });
  write_dot_sums<T>(p, rows, sum_r, sum_u);
}

template <typename T>
REATTN_FN void head_dot_sums_program(const HeadAffineParams& p) {
  if constexpr (kFlatWalk<T>) {
    if (head_dot_sums_flat_rows<T>(p)) return head_dot_sums_flat<T>(p);
  }
  if constexpr (vector_columns<T>() > 1) {
    if (p.vector) return head_dot_sums_items<T, vector_columns<T>()>(p);
  }
  head_dot_sums_items<T, 1>(p);
}

}  // namespace cuda
}  // namespace reattn
