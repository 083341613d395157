// bf16 training kernels for x86 CPUs with AVX512-BF16: scaled dot-product attention (causal or full, forward
// and backward), the QK-norm + RoPE prologue, RMSNorm of the fp32 residual stream, the SwiGLU gate, the LM's
// cross-entropy, the knocks and KHA-Linear's fold. Every matrix product goes through tile_gemm: on the AMX
// tiles where the CPU has them (Intel Sapphire Rapids and later) and the OS grants them, else as AVX512-BF16 dot
// products (dot_gemm: AMD Zen 4 and later, Intel Cooper Lake), with the same operand layouts.
//
// Attention. torch's CPU flash attention runs its block products through the generic bf16 GEMM; its backward
// takes about six times its forward. Here every product runs through tile_gemm (below) on 64 x 64
// blocks, the softmax in AVX-512, per (batch, KV head), so that a group's query heads share packed K and V and
// dK, dV sum in place (GQA). Forward: per query block m, S = Q_m K^T over the keys it sees, the exact softmax
// of each row, O_m = P V; it returns O and the rows' log-sum-exp (lse). Backward, per query head, per key
// block n, against every query block m that sees it:
//     S^T = K_n Q_m^T, dP^T = V_n dO_m^T              (keys x queries, fp32)
//     P^T = exp(scale S^T - lse), dS^T = P^T (dP^T - rowsum(dO o O))
//     dV_n += P^T dO, dK_n += dS^T Q   (one product over all those queries), and every 8 key blocks
//     dQ_m^T += K^T dS^T over them.
// Working in the transposed (key-major) orientation makes every left operand a plain row-major block, so
// no block is ever transposed; right operands are repacked into the VNNI layout (pairs of rows
// interleaved) that bf16 AMX needs. Per-thread buffers of L columns have rows L + 32 values apart: rows
// 1 or 2 KB apart would all map to a few L1 sets.
//
// Document mask (optional, with causal): per query i a first key starts[i] (non-decreasing along the sequence),
// so query i sees keys starts[i] .. i. Key blocks before a query block's first start are skipped (forward: S
// is computed from that block on; backward: a key block meets only the query blocks whose first start is not
// past it), and partial blocks are masked row by row.
//
// Preconditions (check_inputs; kha.cpu_kernels.attention_applies tests them first): bf16, as many queries as
// keys, a multiple of 64 of them, head_dim a multiple of 16, n_heads % n_kv_heads == 0; a CPU with AVX512-BF16
// (kha.cpu_kernels.cpu_supports, before the extension is built).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>
#include <immintrin.h>
#include <atomic>
#include <cmath>
#include <cstring>
#include <vector>

namespace {

using at::BFloat16;
namespace blas = at::native::cpublas;

constexpr int64_t BLK = 64;  // rows of a query block and of a key block

// exp(x) as 2^n e^r, |r| <= ln2/2, with a degree-6 Taylor polynomial for e^r: within 4.6e-7 relative (about 4
// fp32 ulps) of exp over [-87.33, 88.72] (measured against double on a 1e-5 grid), 5.4e-7 in the subnormal
// results down to -88. Inputs below -88 (-inf too) are clamped to it and give exp(-88) = 6.1e-39, not 0; from
// ln(FLT_MAX) = 88.723 up (+inf too) the result is inf; NaN stays NaN.
inline __m512 exp_ps(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-88.f), x);  // max(a, b) returns b where either is NaN: NaN stays NaN
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693147180559945309f), x);
  __m512 p = _mm512_set1_ps(1.f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// 16-bit lanes (0, 16, 1, 17, ...): interleaves the two 256-bit halves of a register
inline __m512i interleave_idx() {
  return _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                          23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
}

// lanes [0, left) of a vector of 16 (all 16 from left = 16 on)
inline __mmask16 tail(int64_t left) { return left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1); }

// lanes l of a vector of 16 whose column c + l lies in [lo, hi)
inline __mmask16 window(int64_t c, int64_t lo, int64_t hi) {
  const __mmask16 below = c < hi ? tail(hi - c) : __mmask16(0);
  const __mmask16 above = lo <= c ? __mmask16(0xFFFF) : lo >= c + 16 ? __mmask16(0) : __mmask16(0xFFFF << (lo - c));
  return below & above;
}

// 16 bf16 (the lanes of m; the others 0) -> floats
inline __m512 load_bf16(const BFloat16* src, __mmask16 m = 0xFFFF) {
  const __m256i x = _mm256_maskz_loadu_epi16(m, src);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(x), 16));
}

// the lanes of m as floats, from bf16 or from fp32 (for code written once for both)
inline __m512 load_floats(const BFloat16* src, __mmask16 m) { return load_bf16(src, m); }
inline __m512 load_floats(const float* src, __mmask16 m) { return _mm512_maskz_loadu_ps(m, src); }

// Per-thread buffers kept across calls (a fresh vector of 100 KB or more would be mapped and page-faulted
// on every call); slot numbers keep one kernel's buffers apart. They live as long as the thread: about
// 26 L D + 1,900 L bytes per thread for the attention backward (1.8 MB at L = 512, D = 64).
template <typename T>
T* scratch(int slot, int64_t n) {
  thread_local std::vector<T> buffers[10];
  std::vector<T>& buffer = buffers[slot];
  if (static_cast<int64_t>(buffer.size()) < n) buffer.resize(n);
  return buffer.data();
}

// the lanes of m of 16 floats -> bf16, rounded to nearest even
inline void store_bf16(BFloat16* dst, __m512 x, __mmask16 m = 0xFFFF) {
  _mm256_mask_storeu_epi16(dst, m, (__m256i)_mm512_cvtneps_pbh(x));
}

// n floats -> bf16, n a multiple of 16
inline void to_bf16(const float* src, BFloat16* dst, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) store_bf16(dst + i, _mm512_loadu_ps(src + i));
}

// One block's softmax gradient, from S^T and dP^T (fp32 rows of ld_in values, row j = key j, BLK queries):
// P^T = exp(scale S^T - lse) and dS^T = P^T (dP^T - dsum), both in bf16 (rows of ld_out values), and dS^T
// again in VNNI layout (rows j, j + 1 interleaved; rows of 2 BLK values) as the right operand of
// dQ^T = K^T dS^T. On a causal diagonal block, key j is seen by queries i >= j only; with the queries' document
// starts (null when every query sees every key of the block), key key0 + j only by queries with start <= it.
inline void softmax_grad_block(const float* s, const float* dp, int64_t ld_in, const float* lse, const float* dsum,
                               float scale, bool diagonal, const int32_t* starts, int64_t key0, BFloat16* p_t,
                               BFloat16* ds_t, int64_t ld_out, BFloat16* ds_vnni) {
  const __m512 scale_v = _mm512_set1_ps(scale);
  const __m512i pairs = interleave_idx();
  for (int64_t j = 0; j < BLK; j += 2) {
    for (int64_t i = 0; i < BLK; i += 16) {
      const __m512 lse_i = _mm512_loadu_ps(lse + i), dsum_i = _mm512_loadu_ps(dsum + i);
      __m512 ds[2];
      for (int64_t r = 0; r < 2; ++r) {
        const int64_t in = (j + r) * ld_in + i, out = (j + r) * ld_out + i, first = diagonal ? j + r : 0;
        __mmask16 seen = window(i, first, BLK);
        if (starts != nullptr)
          seen &= _mm512_cmple_epi32_mask(_mm512_loadu_si512(starts + i),
                                          _mm512_set1_epi32(static_cast<int>(key0 + j + r)));
        const __m512 p = _mm512_maskz_mov_ps(seen, exp_ps(_mm512_fmsub_ps(_mm512_loadu_ps(s + in), scale_v, lse_i)));
        ds[r] = _mm512_mul_ps(p, _mm512_sub_ps(_mm512_loadu_ps(dp + in), dsum_i));
        store_bf16(p_t + out, p);
        store_bf16(ds_t + out, ds[r]);
      }
      const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(ds[1], ds[0]);  // lanes 0-15 key j, 16-31 key j + 1
      _mm512_storeu_si512(ds_vnni + j * BLK + 2 * i, _mm512_permutexvar_epi16(pairs, both));
    }
  }
}

// VNNI layout of a [k x n] right-hand operand (k even): element (r, c) at (r/2)*2n + 2c + r%2, i.e. rows of
// 2n values, each the pairs (r, r + 1) of one column; n a multiple of 16.
void pack_rows(const BFloat16* src, int64_t ld, int64_t k, int64_t n, BFloat16* dst) {
  const __m512i pairs = interleave_idx();
  for (int64_t r = 0; r < k; r += 2) {
    const BFloat16* a = src + r * ld;
    const BFloat16* b = a + ld;
    BFloat16* out = dst + r * n;
    for (int64_t c = 0; c < n; c += 16) {
      const __m512i ab = _mm512_inserti64x4(
          _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + c))),
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + c)), 1);
      _mm512_storeu_si512(out + 2 * c, _mm512_permutexvar_epi16(pairs, ab));
    }
  }
}

// VNNI layout of the transpose of a [rows x cols] matrix (cols even), B = src^T with k = cols, n = rows: the
// 32-bit words (pairs) of src transposed, zero rows of B up to k_padded; B's rows hold ldb >= 2 rows values.
// (Rows of B far apart in memory, e.g. 2 KB, would map to few L1 sets: used on 64-row blocks.) The pairs move
// through memcpy (one 32-bit move once compiled): reading bf16 storage through a uint32_t pointer would break
// strict aliasing.
void pack_transposed(const BFloat16* src, int64_t ld, int64_t rows, int64_t cols, int64_t k_padded, BFloat16* dst,
                     int64_t ldb) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; c += 2) std::memcpy(dst + c / 2 * ldb + 2 * r, src + r * ld + c, 2 * sizeof(BFloat16));
  for (int64_t c = cols; c < k_padded; c += 2) std::fill(dst + c / 2 * ldb, dst + c / 2 * ldb + 2 * rows, BFloat16(0.f));
}

// rows x cols (cols % 16 == 0) copied to a dense [rows x cols_padded] buffer, zeros after column cols
void copy_padded(const BFloat16* src, int64_t ld, int64_t rows, int64_t cols, int64_t cols_padded, BFloat16* dst) {
  for (int64_t r = 0; r < rows; ++r) {
    std::copy(src + r * ld, src + r * ld + cols, dst + r * cols_padded);
    std::fill(dst + r * cols_padded + cols, dst + (r + 1) * cols_padded, BFloat16(0.f));
  }
}

// ---- the AMX micro-kernel: every tile 16 rows x 64 bytes (C: 16 x 16 fp32; A: 16 x 32 bf16; B: 16 pairs
// of rows x 16 columns). Tiles 0-3 hold a 32 x 32 block of C (block (i, j) in tile 2i + j), 4-5 A, 6-7 B.
struct alignas(64) TileConfig {
  uint8_t palette_id = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Which micro-kernel tile_gemm runs: the AMX tiles, or AVX512-BF16 dot products on CPUs without AMX (AMD Zen 4,
// Intel Cooper Lake) or where the OS does not grant the tiles. Set by kha.cpu_kernels after loading (set_tiles;
// the tests switch it between calls), never while a kernel runs: configure_tiles, tile_gemm and release_tiles
// each read it. The products are the same, summed in another order.
std::atomic<bool> tiles{false};

// Once per thread before tile_gemm. torch's own micro-kernel wrapper (at::native::cpublas::brgemm) caches
// which tile configuration is loaded, so release_tiles also tells it that its configuration is gone.
inline void configure_tiles() {
  if (!tiles) return;
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  _tile_loadconfig(&cfg);
}

inline void release_tiles() {
  if (!tiles) return;
  _tile_release();
  blas::brgemm_release(true);
}

// C[16 MI x 16 NJ] (+)= A[16 MI x k] B[k x 16 NJ]
template <int MI, int NJ>
inline void tile_block(int64_t k, const BFloat16* a, int64_t lda, const BFloat16* b, int64_t ldb, float* c,
                       int64_t ldc, bool accumulate) {
  const int64_t c_stride = ldc * 4, a_stride = lda * 2, b_stride = ldb * 2;
  if (accumulate) {
    _tile_loadd(0, c, c_stride);
    if constexpr (NJ > 1) _tile_loadd(1, c + 16, c_stride);
    if constexpr (MI > 1) _tile_loadd(2, c + 16 * ldc, c_stride);
    if constexpr (MI > 1 && NJ > 1) _tile_loadd(3, c + 16 * ldc + 16, c_stride);
  } else {
    _tile_zero(0);
    if constexpr (NJ > 1) _tile_zero(1);
    if constexpr (MI > 1) _tile_zero(2);
    if constexpr (MI > 1 && NJ > 1) _tile_zero(3);
  }
  for (int64_t kk = 0; kk < k; kk += 32) {
    _tile_loadd(4, a + kk, a_stride);
    if constexpr (MI > 1) _tile_loadd(5, a + 16 * lda + kk, a_stride);
    _tile_loadd(6, b + kk / 2 * ldb, b_stride);
    if constexpr (NJ > 1) _tile_loadd(7, b + kk / 2 * ldb + 32, b_stride);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (NJ > 1) _tile_dpbf16ps(1, 4, 7);
    if constexpr (MI > 1) _tile_dpbf16ps(2, 5, 6);
    if constexpr (MI > 1 && NJ > 1) _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, c, c_stride);
  if constexpr (NJ > 1) _tile_stored(1, c + 16, c_stride);
  if constexpr (MI > 1) _tile_stored(2, c + 16 * ldc, c_stride);
  if constexpr (MI > 1 && NJ > 1) _tile_stored(3, c + 16 * ldc + 16, c_stride);
}

// C[4 x 16 NV] (+)= A[4 x k] B[k x 16 NV] with AVX512-BF16: one accumulator per row and 16 columns, each step
// one pair of A's columns (a 32-bit word, broadcast) against one pair-row of B (VNNI: 16 columns' pairs).
template <int NV>
inline void dot_block(int64_t k, const BFloat16* a, int64_t lda, const BFloat16* b, int64_t ldb, float* c,
                      int64_t ldc, bool accumulate) {
  constexpr int MR = 4;
  __m512 acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = accumulate ? _mm512_loadu_ps(c + r * ldc + 16 * v) : _mm512_setzero_ps();
  for (int64_t p = 0; p < k / 2; ++p) {
    __m512bh bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = (__m512bh)_mm512_loadu_si512(b + p * ldb + 32 * v);
    for (int r = 0; r < MR; ++r) {
      uint32_t pair;
      std::memcpy(&pair, a + r * lda + 2 * p, sizeof(pair));
      const __m512bh av = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair));
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], av, bv[v]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(c + r * ldc + 16 * v, acc[r][v]);
}

// tile_gemm without the tiles: 64-column panels of B (k x 64 bf16: 8 KB at k = 64, in L1; the attention
// backward's longer k streams from L2) against every 4 rows of A in turn
void dot_gemm(int64_t m, int64_t n, int64_t k, const BFloat16* a, int64_t lda, const BFloat16* b, int64_t ldb,
              float* c, int64_t ldc, bool accumulate) {
  TORCH_CHECK(m % 4 == 0 && n % 16 == 0 && k % 2 == 0, "dot_gemm: m ", m, " n ", n, " k ", k);
  for (int64_t j = 0; j < n; j += 64) {
    const BFloat16* bj = b + 2 * j;
    const int64_t vectors = std::min<int64_t>(4, (n - j) / 16);
    for (int64_t i = 0; i < m; i += 4) {
      const BFloat16* ai = a + i * lda;
      float* cij = c + i * ldc + j;
      switch (vectors) {
        case 4: dot_block<4>(k, ai, lda, bj, ldb, cij, ldc, accumulate); break;
        case 3: dot_block<3>(k, ai, lda, bj, ldb, cij, ldc, accumulate); break;
        case 2: dot_block<2>(k, ai, lda, bj, ldb, cij, ldc, accumulate); break;
        default: dot_block<1>(k, ai, lda, bj, ldb, cij, ldc, accumulate);
      }
    }
  }
}

// C[m x n] (+)= A[m x k] B[k x n] on the tiles (dot_gemm where they are off): m, n multiples of 16, k of 32;
// A row-major (lda), B in the VNNI layout of pack_rows with rows of ldb values (ldb = 2 x B's width).
void tile_gemm(int64_t m, int64_t n, int64_t k, const BFloat16* a, int64_t lda, const BFloat16* b, int64_t ldb,
               float* c, int64_t ldc, bool accumulate) {
  if (!tiles) return dot_gemm(m, n, k, a, lda, b, ldb, c, ldc, accumulate);
  for (int64_t i = 0; i < m; i += 32)
    for (int64_t j = 0; j < n; j += 32) {
      const BFloat16* ai = a + i * lda;
      const BFloat16* bj = b + 2 * j;
      float* cij = c + i * ldc + j;
      const bool two_rows = m - i >= 32, two_cols = n - j >= 32;
      if (two_rows && two_cols) tile_block<2, 2>(k, ai, lda, bj, ldb, cij, ldc, accumulate);
      else if (two_rows) tile_block<2, 1>(k, ai, lda, bj, ldb, cij, ldc, accumulate);
      else if (two_cols) tile_block<1, 2>(k, ai, lda, bj, ldb, cij, ldc, accumulate);
      else tile_block<1, 1>(k, ai, lda, bj, ldb, cij, ldc, accumulate);
    }
}

// Rows are read as pairs of bf16 (32-bit words) when packed: unit stride along head_dim, even strides and a
// 4-byte aligned start; anything else is copied first.
at::Tensor unit_stride(const at::Tensor& x) {
  const bool ok = x.dim() == 4 && x.stride(3) == 1 && x.stride(2) % 2 == 0 && x.stride(1) % 2 == 0 &&
                  x.stride(0) % 2 == 0 && reinterpret_cast<uintptr_t>(x.const_data_ptr()) % 4 == 0;
  return ok ? x : x.contiguous();
}

// Outputs are new (B, L, H, D) tensors, written through their (B, H, L, D) view: the layout the layers
// around attention use, so that neither its output nor the gradients it returns need a transposing copy.
at::Tensor heads_view(const at::Tensor& token_major) { return token_major.permute({0, 2, 1, 3}); }

// Element (b, h, i, d) of a [B, H, L, D] tensor with unit stride in d.
template <typename T>
struct RowsOf {
  T* data;
  int64_t sb, sh, sl;
  explicit RowsOf(T* data_, const at::Tensor& x) : data(data_), sb(x.stride(0)), sh(x.stride(1)), sl(x.stride(2)) {}
  T* head(int64_t b, int64_t h) const { return data + b * sb + h * sh; }
};

struct Rows : RowsOf<const BFloat16> {
  explicit Rows(const at::Tensor& x) : RowsOf(x.const_data_ptr<BFloat16>(), x) {}
};

struct OutRows : RowsOf<BFloat16> {
  explicit OutRows(const at::Tensor& token_major)
      : RowsOf(token_major.data_ptr<BFloat16>(), heads_view(token_major)) {}
};

// The kernels' preconditions (kha.cpu_kernels.attention_applies checks them before calling).
void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 &&
                  v.scalar_type() == at::kBFloat16,
              "kha_cpu attention: q, k, v must be bf16");
  TORCH_CHECK(q.dim() == 4 && k.sizes() == v.sizes() && k.dim() == 4 && k.size(0) == q.size(0) &&
                  k.size(3) == q.size(3),
              "kha_cpu attention: q (B, H, L, D), k and v (B, KV, L, D) expected");
  const int64_t H = q.size(1), L = q.size(2), D = q.size(3), KV = k.size(1);
  TORCH_CHECK(k.size(2) == L && L > 0 && L % BLK == 0, "kha_cpu attention: sequence length ", L,
              " must equal the keys' and be a multiple of ", BLK);
  TORCH_CHECK(KV > 0 && H % KV == 0, "kha_cpu attention: ", H, " query heads not a multiple of ", KV);
  TORCH_CHECK(D > 0 && D % 16 == 0, "kha_cpu attention: head_dim ", D, " must be a multiple of 16");
}

// The document mask's first key per query, (B, L) int32, or null without one; checked (a start past its query
// or below the one before it would read scores never computed).
const int32_t* document_starts(const std::optional<at::Tensor>& starts, const at::Tensor& q, bool is_causal) {
  if (!starts.has_value()) return nullptr;
  const int64_t B = q.size(0), L = q.size(2);
  TORCH_CHECK(is_causal && starts->scalar_type() == at::kInt && starts->is_contiguous() &&
                  starts->sizes() == at::IntArrayRef({B, L}),
              "kha_cpu attention: document starts must be a contiguous (B, L) int32 tensor, with is_causal");
  const int32_t* st = starts->const_data_ptr<int32_t>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < L; ++i) {
      const int32_t x = st[b * L + i];
      TORCH_CHECK(x >= 0 && x <= i && (i == 0 || x >= st[b * L + i - 1]),
                  "kha_cpu attention: document starts must satisfy 0 <= starts[i] <= i, non-decreasing in i");
    }
  return st;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& logsumexp, double scale_d, bool is_causal,
    const std::optional<at::Tensor>& starts_in) {
  auto q = unit_stride(q_in), k = unit_stride(k_in), v = unit_stride(v_in);
  auto out = unit_stride(out_in), grad_out = unit_stride(grad_out_in);
  check_inputs(q, k, v);
  const int32_t* starts = document_starts(starts_in, q, is_causal);
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), D = q.size(3), KV = k.size(1), G = H / KV;
  TORCH_CHECK(grad_out.scalar_type() == at::kBFloat16 && out.scalar_type() == at::kBFloat16 &&
                  logsumexp.scalar_type() == at::kFloat && grad_out.sizes() == q.sizes() &&
                  out.sizes() == q.sizes() && logsumexp.sizes() == at::IntArrayRef({B, H, L}),
              "kha_cpu::attention_backward: out, grad_out (B, H, L, D) in bf16 and logsumexp (B, H, L) in fp32 "
              "expected");
  const int64_t Dp = (D + 31) / 32 * 32;  // head_dim as the tiles' reduction length: zeros after D
  const int64_t NB = L / BLK;
  const float scale = static_cast<float>(scale_d);
  const Rows qr(q), kr(k), vr(v), outr(out), dor(grad_out);
  auto lse = logsumexp.contiguous();
  const float* lsed = lse.const_data_ptr<float>();
  auto dq = at::empty({B, L, H, D}, q.options());
  auto dk = at::empty({B, L, KV, D}, q.options());
  auto dv = at::empty({B, L, KV, D}, q.options());
  const OutRows dqr(dq), dkr(dk), dvr(dv);

  // dQ^T sums over key blocks; it is taken every CHUNK key blocks, from the chunk's dS^T kept in VNNI layout
  constexpr int64_t CHUNK = 8;
  const int64_t Ls = L + 32;  // row stride of the per-thread [x L] buffers (see the top of this file)
  at::parallel_for(0, B * KV, 1, [&](int64_t begin, int64_t end) {
    BFloat16 *kt = scratch<BFloat16>(0, D * Ls), *qt_packed = scratch<BFloat16>(1, L * Dp),
             *dot_packed = scratch<BFloat16>(2, L * Dp), *q_packed = scratch<BFloat16>(3, L * D),
             *do_packed = scratch<BFloat16>(4, L * D), *p_t = scratch<BFloat16>(5, BLK * Ls),
             *ds_t = scratch<BFloat16>(6, BLK * Ls), *ds_vnni = scratch<BFloat16>(7, NB * CHUNK * BLK * BLK),
             *k_rows = scratch<BFloat16>(8, L * Dp), *v_rows = scratch<BFloat16>(9, L * Dp);
    float *s = scratch<float>(0, BLK * Ls), *dp = scratch<float>(1, BLK * Ls), *dqt = scratch<float>(2, D * Ls),
          *dk_acc = scratch<float>(3, L * D), *dv_acc = scratch<float>(4, L * D), *dsum = scratch<float>(5, L);
    configure_tiles();
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / KV, kv = t % KV;
      const int32_t* st = starts != nullptr ? starts + b * L : nullptr;
      // the first key block query block m sees (0 without a document mask)
      const auto first_block = [&](int64_t m) -> int64_t { return st != nullptr ? st[m * BLK] / BLK : 0; };
      const BFloat16* k_bk = kr.head(b, kv);
      copy_padded(k_bk, kr.sl, L, D, Dp, k_rows);
      copy_padded(vr.head(b, kv), vr.sl, L, D, Dp, v_rows);
      for (int64_t i = 0; i < L; ++i)
        for (int64_t d = 0; d < D; ++d) kt[d * Ls + i] = k_bk[i * kr.sl + d];
      std::fill(dk_acc, dk_acc + L * D, 0.f);
      std::fill(dv_acc, dv_acc + L * D, 0.f);
      for (int64_t h = kv * G; h < (kv + 1) * G; ++h) {
        const BFloat16* q_h = qr.head(b, h);
        const BFloat16* do_h = dor.head(b, h);
        const BFloat16* o_h = outr.head(b, h);
        const float* lse_h = lsed + (b * H + h) * L;
        for (int64_t m = 0; m < NB; ++m) {  // Q^T, dO^T per query block: Dp/2 rows of 2 BLK values
          pack_transposed(q_h + m * BLK * qr.sl, qr.sl, BLK, D, Dp, qt_packed + m * BLK * Dp, 2 * BLK);
          pack_transposed(do_h + m * BLK * dor.sl, dor.sl, BLK, D, Dp, dot_packed + m * BLK * Dp, 2 * BLK);
        }
        pack_rows(q_h, qr.sl, L, D, q_packed);
        pack_rows(do_h, dor.sl, L, D, do_packed);
        for (int64_t i = 0; i < L; ++i) {  // rowsum(dO o O)
          __m512 acc = _mm512_setzero_ps();
          for (int64_t d = 0; d < D; d += 16)
            acc = _mm512_fmadd_ps(load_bf16(o_h + i * outr.sl + d), load_bf16(do_h + i * dor.sl + d), acc);
          dsum[i] = _mm512_reduce_add_ps(acc);
        }
        for (int64_t n0 = 0; n0 < NB; n0 += CHUNK) {
          const int64_t n1 = std::min(NB, n0 + CHUNK);
          for (int64_t n = n0; n < n1; ++n) {
            // key block n against every query that sees it (query blocks q0 / BLK to m_end): S^T, dP^T
            // [64 keys x Lq queries]
            const int64_t q0 = is_causal ? n * BLK : 0;
            int64_t m_end = q0 / BLK;
            while (m_end < NB && first_block(m_end) <= n) ++m_end;
            const int64_t Lq = m_end * BLK - q0;
            for (int64_t m = q0 / BLK; m < m_end; ++m) {
              const int64_t c = m * BLK - q0;  // the query block's first column
              // the block's document starts, where some query in it starts after key block n's first key
              const int32_t* partial = st != nullptr && st[m * BLK + BLK - 1] > n * BLK ? st + m * BLK : nullptr;
              tile_gemm(BLK, BLK, Dp, k_rows + n * BLK * Dp, Dp, qt_packed + m * BLK * Dp, 2 * BLK, s + c, Ls, false);
              tile_gemm(BLK, BLK, Dp, v_rows + n * BLK * Dp, Dp, dot_packed + m * BLK * Dp, 2 * BLK, dp + c, Ls, false);
              softmax_grad_block(s + c, dp + c, Ls, lse_h + m * BLK, dsum + m * BLK, scale, is_causal && m == n,
                                 partial, n * BLK, p_t + c, ds_t + c, Ls, ds_vnni + (m * CHUNK + n - n0) * BLK * BLK);
            }
            // dV_n += P^T dO, dK_n += dS^T Q over those queries
            tile_gemm(BLK, D, Lq, p_t, Ls, do_packed + q0 * D, 2 * D, dv_acc + n * BLK * D, D, true);
            tile_gemm(BLK, D, Lq, ds_t, Ls, q_packed + q0 * D, 2 * D, dk_acc + n * BLK * D, D, true);
          }
          // dQ_m^T += K^T dS^T over the chunk's key blocks that query block m sees (from its first one on;
          // the first product for m sets dQ_m^T)
          for (int64_t m = is_causal ? n0 : 0; m < NB; ++m) {
            const int64_t from = std::max(n0, first_block(m));
            const int64_t blocks = (is_causal ? std::min(n1, m + 1) : n1) - from;
            if (blocks <= 0) continue;
            tile_gemm(D, BLK, blocks * BLK, kt + from * BLK, Ls, ds_vnni + (m * CHUNK + from - n0) * BLK * BLK,
                      2 * BLK, dqt + m * BLK, Ls, from > first_block(m));
          }
        }
        BFloat16* dq_h = dqr.head(b, h);
        const __m512i column = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                                  _mm512_set1_epi32(static_cast<int>(Ls)));
        const __m512 scale_v = _mm512_set1_ps(scale);
        for (int64_t i = 0; i < L; ++i)
          for (int64_t d = 0; d < D; d += 16) {
            const __m512 x = _mm512_i32gather_ps(column, dqt + d * Ls + i, 4);
            store_bf16(dq_h + i * dqr.sl + d, _mm512_mul_ps(x, scale_v));
          }
      }
      for (int64_t i = 0; i < L * D; ++i) dk_acc[i] *= scale;
      for (int64_t i = 0; i < L; ++i) {
        to_bf16(dk_acc + i * D, dkr.head(b, kv) + i * dkr.sl, D);
        to_bf16(dv_acc + i * D, dvr.head(b, kv) + i * dvr.sl, D);
      }
    }
    release_tiles();
  });
  return {dq, dk, dv};
}

// Forward: per (batch, KV head), K^T and V packed once for the group's query heads; per query head and
// query block m, the block's scores against every key it sees, S = Q_m K^T (64 x up to L, fp32, in cache),
// then the exact softmax of each row and O_m = P V in one product; it returns O and the rows' log-sum-exp
// (lse), what the backward needs.
std::tuple<at::Tensor, at::Tensor> attention_forward(const at::Tensor& q_in, const at::Tensor& k_in,
                                                     const at::Tensor& v_in, double scale_d, bool is_causal,
                                                     const std::optional<at::Tensor>& starts_in) {
  auto q = unit_stride(q_in), k = unit_stride(k_in), v = unit_stride(v_in);
  check_inputs(q, k, v);
  const int32_t* starts = document_starts(starts_in, q, is_causal);
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), D = q.size(3), KV = k.size(1), G = H / KV;
  const int64_t Dp = (D + 31) / 32 * 32, NB = L / BLK, Ls = L + 32;
  const float scale = static_cast<float>(scale_d);
  const Rows qr(q), kr(k), vr(v);
  auto out = at::empty({B, L, H, D}, q.options());
  const OutRows outr(out);
  auto lse = at::empty({B, H, L}, q.options().dtype(at::kFloat));

  at::parallel_for(0, B * KV, 1, [&](int64_t begin, int64_t end) {
    BFloat16 *kt_packed = scratch<BFloat16>(0, L * Dp), *v_packed = scratch<BFloat16>(1, L * D),
             *p = scratch<BFloat16>(2, BLK * Ls), *q_rows = scratch<BFloat16>(3, L * Dp);
    float *s = scratch<float>(0, BLK * Ls), *o = scratch<float>(1, BLK * D), *row_sum = scratch<float>(2, BLK);
    const __m512 scale_v = _mm512_set1_ps(scale);
    configure_tiles();
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / KV, kv = t % KV;
      for (int64_t n = 0; n < NB; ++n)
        pack_transposed(kr.head(b, kv) + n * BLK * kr.sl, kr.sl, BLK, D, Dp, kt_packed + n * BLK * Dp, 2 * BLK);
      pack_rows(vr.head(b, kv), vr.sl, L, D, v_packed);
      for (int64_t h = kv * G; h < (kv + 1) * G; ++h) {
        copy_padded(qr.head(b, h), qr.sl, L, D, Dp, q_rows);
        for (int64_t m = 0; m < NB; ++m) {
          const int64_t keys = is_causal ? (m + 1) * BLK : L;
          // the rows' document starts (null without a document mask) and the first key column computed
          const int32_t* st = starts != nullptr ? starts + b * L + m * BLK : nullptr;
          const int64_t first = st != nullptr ? st[0] / BLK * BLK : 0;
          for (int64_t n = first / BLK; n < keys / BLK; ++n)
            tile_gemm(BLK, BLK, Dp, q_rows + m * BLK * Dp, Dp, kt_packed + n * BLK * Dp, 2 * BLK, s + n * BLK, Ls,
                      false);
          BFloat16* out_m = outr.head(b, h) + m * BLK * outr.sl;
          float* lse_m = lse.data_ptr<float>() + (b * H + h) * L + m * BLK;
          for (int64_t r = 0; r < BLK; ++r) {
            const float* s_r = s + r * Ls;
            const int64_t lo = st != nullptr ? st[r] : 0;  // keys lo <= c < seen
            const int64_t seen = is_causal ? m * BLK + r + 1 : L;
            __m512 max_v = _mm512_set1_ps(-INFINITY);
            for (int64_t c = lo / 16 * 16; c < seen; c += 16)
              max_v = _mm512_mask_max_ps(max_v, window(c, lo, seen), max_v, _mm512_loadu_ps(s_r + c));
            const __m512 row_max = _mm512_set1_ps(_mm512_reduce_max_ps(max_v));
            __m512 sum = _mm512_setzero_ps();
            for (int64_t c = first; c < keys; c += 16) {
              const __mmask16 in = window(c, lo, seen);
              const __m512 pc = _mm512_maskz_mov_ps(
                  in, exp_ps(_mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(s_r + c), row_max), scale_v)));
              sum = _mm512_add_ps(sum, pc);
              store_bf16(p + r * Ls + c, pc);
            }
            row_sum[r] = _mm512_reduce_add_ps(sum);
            lse_m[r] = _mm512_cvtss_f32(row_max) * scale + std::log(row_sum[r]);
          }
          tile_gemm(BLK, D, keys - first, p + first, Ls, v_packed + first * D, 2 * D, o, D, false);
          for (int64_t r = 0; r < BLK; ++r) {
            const __m512 inv = _mm512_set1_ps(1.f / row_sum[r]);
            for (int64_t d = 0; d < D; d += 16)
              store_bf16(out_m + r * outr.sl + d, _mm512_mul_ps(_mm512_loadu_ps(o + r * D + d), inv));
          }
        }
      }
    }
    release_tiles();
  });
  return {out, lse};
}

// ---------------------------------------------------------------- QK-norm + RoPE
//
// The prologue of every Qwen3-style attention layer, per head of Q or K: an RMSNorm over head_dim in fp32,
// rounded back to the input's bf16, times the norm's fp32 weight, then RoPE in the rotate-half layout
// (feature j pairs with j + D/2). torch runs it as about a dozen elementwise kernels forward and as many
// backward over the (B, T, heads, D) tensor; here one pass each way, output in bf16 (what the attention
// kernels read). Forward per row x: r = 1 / sqrt(mean(x^2) + eps), n = bf16(x r), y = w n,
//   out_lo = y_lo cos - y_hi sin, out_hi = y_hi cos + y_lo sin   (lo/hi: the two halves of the row).
// Backward from dout: g = RoPE^-1(dout), dw += g n, dn = g w, dx = r (dn - (x r) mean(dn x r)).

namespace {

// x rounded to bf16 and back (nearest even), as torch's .to(bfloat16) rounds
inline __m512 round_bf16(__m512 x) {
  const __m256i h = (__m256i)_mm512_cvtneps_pbh(x);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// 1 / sqrt(mean(x^2) + eps) of a row of d values (bf16 or fp32), in fp32
template <typename T>
inline float inv_rms(const T* x, int64_t d, float eps) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t j = 0; j < d; j += 16) {
    const __m512 v = load_floats(x + j, tail(d - j));
    acc = _mm512_fmadd_ps(v, v, acc);
  }
  return 1.f / std::sqrt(_mm512_reduce_add_ps(acc) / static_cast<float>(d) + eps);
}

// Adds blocks partial sums of d floats each (consecutive in partial) pairwise in a fixed tree (0 + 1, 2 + 3, ...,
// then pairs of pairs) into the first: the bits do not depend on the thread count.
void sum_in_tree(float* partial, int64_t blocks, int64_t d) {
  for (int64_t stride = 1; stride < blocks; stride *= 2) {
    const int64_t pairs = (blocks - stride + 2 * stride - 1) / (2 * stride);  // left partials i with i + stride < blocks
    at::parallel_for(0, pairs, 16, [&](int64_t begin, int64_t end) {
      for (int64_t pair = begin; pair < end; ++pair) {
        float* left = partial + pair * 2 * stride * d;
        const float* right = left + stride * d;
        for (int64_t j = 0; j < d; j += 16) {
          const __mmask16 m = tail(d - j);
          _mm512_mask_storeu_ps(left + j, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, left + j),
                                                           _mm512_maskz_loadu_ps(m, right + j)));
        }
      }
    });
  }
}

// f(row, dw) for rows [0, rows) in blocks of block_rows rows (blocks in parallel), each block summing its rows'
// weight gradient in row order into its own d partial sums, then the partials summed by sum_in_tree: the
// rounding error grows with block_rows + log2(blocks) additions, not with the row count.
template <typename F>
at::Tensor rows_summing_weight_grad(int64_t rows, int64_t block_rows, int64_t d, const at::TensorOptions& options,
                                    const F& f) {
  const int64_t blocks = std::max<int64_t>(1, (rows + block_rows - 1) / block_rows);
  auto parts = at::zeros({blocks, d}, options);
  float* partial = parts.data_ptr<float>();
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block)
      for (int64_t row = block * block_rows; row < std::min(rows, (block + 1) * block_rows); ++row)
        f(row, partial + block * d);
  });
  sum_in_tree(partial, blocks, d);
  return parts[0].clone();
}

// rows of head_dim (or d_model) values per block of the weight-gradient sums above
constexpr int64_t WEIGHT_GRAD_ROWS = 64;

void check_norm_rope(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 4 && x.is_contiguous(),
              "kha_cpu norm_rope: x must be a contiguous bf16 (B, T, heads, head_dim) tensor");
  const int64_t B = x.size(0), T = x.size(1), D = x.size(3);
  TORCH_CHECK(D % 2 == 0 && weight.scalar_type() == at::kFloat && weight.is_contiguous() &&
                  weight.sizes() == at::IntArrayRef({D}),
              "kha_cpu norm_rope: an even head_dim and an fp32 weight of head_dim values expected");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && cos.sizes() == sin.sizes() && cos.dim() == 3 &&
                  (cos.size(0) == 1 || cos.size(0) == B) && cos.size(1) == T && cos.size(2) == D / 2 &&
                  cos.is_contiguous() && sin.is_contiguous(),
              "kha_cpu norm_rope: cos and sin must be contiguous fp32 (1 or B, T, head_dim / 2)");
}

}  // namespace

at::Tensor norm_rope_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& cos,
                             const at::Tensor& sin, double eps_d) {
  check_norm_rope(x, weight, cos, sin);
  const int64_t B = x.size(0), T = x.size(1), H = x.size(2), D = x.size(3), half = D / 2;
  const bool per_batch = cos.size(0) == B && B > 1;
  const float eps = static_cast<float>(eps_d);
  auto out = at::empty_like(x);
  const BFloat16* xd = x.const_data_ptr<BFloat16>();
  BFloat16* od = out.data_ptr<BFloat16>();
  const float *w = weight.const_data_ptr<float>(), *cd = cos.const_data_ptr<float>(), *sd = sin.const_data_ptr<float>();
  at::parallel_for(0, B * T, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bt = begin; bt < end; ++bt) {
      const int64_t angle = (per_batch ? bt : bt % T) * half;
      for (int64_t h = 0; h < H; ++h) {
        const BFloat16* xr = xd + (bt * H + h) * D;
        BFloat16* outr = od + (bt * H + h) * D;
        const __m512 r = _mm512_set1_ps(inv_rms(xr, D, eps));
        for (int64_t j = 0; j < half; j += 16) {
          const __mmask16 m = tail(half - j);
          const __m512 c = _mm512_maskz_loadu_ps(m, cd + angle + j), s = _mm512_maskz_loadu_ps(m, sd + angle + j);
          const __m512 lo = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, w + j), round_bf16(_mm512_mul_ps(load_bf16(xr + j, m), r)));
          const __m512 hi = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, w + half + j),
                                          round_bf16(_mm512_mul_ps(load_bf16(xr + half + j, m), r)));
          store_bf16(outr + j, _mm512_fmsub_ps(lo, c, _mm512_mul_ps(hi, s)), m);
          store_bf16(outr + half + j, _mm512_fmadd_ps(hi, c, _mm512_mul_ps(lo, s)), m);
        }
      }
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> norm_rope_backward(const at::Tensor& grad_out_in, const at::Tensor& x,
                                                      const at::Tensor& weight, const at::Tensor& cos,
                                                      const at::Tensor& sin, double eps_d) {
  check_norm_rope(x, weight, cos, sin);
  auto grad_out = grad_out_in.to(at::kBFloat16).contiguous();
  TORCH_CHECK(grad_out.sizes() == x.sizes(), "kha_cpu norm_rope_backward: grad_out must have x's shape");
  const int64_t B = x.size(0), T = x.size(1), H = x.size(2), D = x.size(3), half = D / 2;
  const bool per_batch = cos.size(0) == B && B > 1;
  const float eps = static_cast<float>(eps_d);
  auto dx = at::empty_like(x);
  const BFloat16 *xd = x.const_data_ptr<BFloat16>(), *gd = grad_out.const_data_ptr<BFloat16>();
  BFloat16* dxd = dx.data_ptr<BFloat16>();
  const float *w = weight.const_data_ptr<float>(), *cd = cos.const_data_ptr<float>(), *sd = sin.const_data_ptr<float>();
  const int64_t block_rows = std::max<int64_t>(1, WEIGHT_GRAD_ROWS / H);  // of B * T rows of H heads
  auto dw_total = rows_summing_weight_grad(B * T, block_rows, D, weight.options(), [&](int64_t bt, float* dw) {
    float* dn = scratch<float>(0, D);
    const int64_t angle = (per_batch ? bt : bt % T) * half;
    for (int64_t h = 0; h < H; ++h) {
      const BFloat16* xr = xd + (bt * H + h) * D;
      const BFloat16* gr = gd + (bt * H + h) * D;
      const float rs = inv_rms(xr, D, eps);
      const __m512 r = _mm512_set1_ps(rs);
      __m512 dot = _mm512_setzero_ps();  // sum of dn * x r
      for (int64_t j = 0; j < half; j += 16) {
        const __mmask16 m = tail(half - j);
        const __m512 c = _mm512_maskz_loadu_ps(m, cd + angle + j), s = _mm512_maskz_loadu_ps(m, sd + angle + j);
        const __m512 go_lo = load_bf16(gr + j, m), go_hi = load_bf16(gr + half + j, m);
        const __m512 g_lo = _mm512_fmadd_ps(go_lo, c, _mm512_mul_ps(go_hi, s));
        const __m512 g_hi = _mm512_fmsub_ps(go_hi, c, _mm512_mul_ps(go_lo, s));
        const __m512 n_lo = _mm512_mul_ps(load_bf16(xr + j, m), r), n_hi = _mm512_mul_ps(load_bf16(xr + half + j, m), r);
        _mm512_mask_storeu_ps(dw + j, m, _mm512_fmadd_ps(g_lo, round_bf16(n_lo), _mm512_maskz_loadu_ps(m, dw + j)));
        _mm512_mask_storeu_ps(dw + half + j, m,
                              _mm512_fmadd_ps(g_hi, round_bf16(n_hi), _mm512_maskz_loadu_ps(m, dw + half + j)));
        const __m512 dn_lo = _mm512_mul_ps(g_lo, _mm512_maskz_loadu_ps(m, w + j));
        const __m512 dn_hi = _mm512_mul_ps(g_hi, _mm512_maskz_loadu_ps(m, w + half + j));
        dot = _mm512_fmadd_ps(dn_lo, n_lo, _mm512_fmadd_ps(dn_hi, n_hi, dot));
        _mm512_mask_storeu_ps(dn + j, m, dn_lo);
        _mm512_mask_storeu_ps(dn + half + j, m, dn_hi);
      }
      const __m512 mean = _mm512_set1_ps(_mm512_reduce_add_ps(dot) / static_cast<float>(D));
      BFloat16* dxr = dxd + (bt * H + h) * D;
      for (int64_t j = 0; j < D; j += 16) {
        const __mmask16 m = tail(D - j);
        const __m512 n = _mm512_mul_ps(load_bf16(xr + j, m), r);
        store_bf16(dxr + j, _mm512_mul_ps(r, _mm512_fnmadd_ps(n, mean, _mm512_maskz_loadu_ps(m, dn + j))), m);
      }
    }
  });
  return {dx, dw_total};
}

// ---------------------------------------------------------------- RMSNorm of the fp32 residual stream
//
// y = w (x r), r = 1 / sqrt(mean(x^2) + eps), per row, fp32 in and out (under autocast the residual stream
// stays fp32); torch runs it as about six kernels forward and ten backward. Backward from dy:
// dw = sum over rows of dy (x r), dx = r (dn - (x r) mean(dn x r)) with dn = dy w.

namespace {

void check_rms_norm(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() >= 1 &&
                  weight.scalar_type() == at::kFloat && weight.is_contiguous() && weight.dim() == 1 &&
                  weight.size(0) == x.size(-1),
              "kha_cpu rms_norm: a contiguous fp32 x and an fp32 weight of its last dimension expected");
}

}  // namespace

at::Tensor rms_norm_forward(const at::Tensor& x, const at::Tensor& weight, double eps_d) {
  check_rms_norm(x, weight);
  const int64_t d = x.size(-1), rows = x.numel() / std::max<int64_t>(d, 1);
  const float eps = static_cast<float>(eps_d);
  auto out = at::empty_like(x);
  const float *xd = x.const_data_ptr<float>(), *w = weight.const_data_ptr<float>();
  float* od = out.data_ptr<float>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* xr = xd + i * d;
      const __m512 r = _mm512_set1_ps(inv_rms(xr, d, eps));
      for (int64_t j = 0; j < d; j += 16) {
        const __mmask16 m = tail(d - j);
        const __m512 n = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, xr + j), r);
        _mm512_mask_storeu_ps(od + i * d + j, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, w + j), n));
      }
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward(const at::Tensor& grad_out_in, const at::Tensor& x,
                                                     const at::Tensor& weight, double eps_d) {
  check_rms_norm(x, weight);
  auto grad_out = grad_out_in.to(at::kFloat).contiguous();
  TORCH_CHECK(grad_out.sizes() == x.sizes(), "kha_cpu rms_norm_backward: grad_out must have x's shape");
  const int64_t d = x.size(-1), rows = x.numel() / std::max<int64_t>(d, 1);
  const float eps = static_cast<float>(eps_d);
  auto dx = at::empty_like(x);
  const float *xd = x.const_data_ptr<float>(), *gd = grad_out.const_data_ptr<float>(),
              *w = weight.const_data_ptr<float>();
  float* dxd = dx.data_ptr<float>();
  auto dw_total = rows_summing_weight_grad(rows, WEIGHT_GRAD_ROWS, d, weight.options(), [&](int64_t i, float* dw) {
    const float *xr = xd + i * d, *gr = gd + i * d;
    const __m512 r = _mm512_set1_ps(inv_rms(xr, d, eps));
    __m512 dot = _mm512_setzero_ps();  // sum of dn * x r
    for (int64_t j = 0; j < d; j += 16) {
      const __mmask16 m = tail(d - j);
      const __m512 n = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, xr + j), r), g = _mm512_maskz_loadu_ps(m, gr + j);
      _mm512_mask_storeu_ps(dw + j, m, _mm512_fmadd_ps(g, n, _mm512_maskz_loadu_ps(m, dw + j)));
      dot = _mm512_fmadd_ps(_mm512_mul_ps(g, _mm512_maskz_loadu_ps(m, w + j)), n, dot);
    }
    const __m512 mean = _mm512_set1_ps(_mm512_reduce_add_ps(dot) / static_cast<float>(d));
    for (int64_t j = 0; j < d; j += 16) {
      const __mmask16 m = tail(d - j);
      const __m512 n = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, xr + j), r);
      const __m512 dn = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, gr + j), _mm512_maskz_loadu_ps(m, w + j));
      _mm512_mask_storeu_ps(dxd + i * d + j, m, _mm512_mul_ps(r, _mm512_fnmadd_ps(n, mean, dn)));
    }
  });
  return {dx, dw_total};
}

// ---------------------------------------------------------------- SwiGLU gate and cross-entropy
//
// silu(a) * b (the SwiGLU gate) and the LM loss, each one pass forward and one backward in fp32 from bf16
// inputs, where torch runs several kernels with a bf16 or fp32 copy between each.

namespace {

inline __m512 sigmoid_ps(__m512 x) {
  return _mm512_div_ps(_mm512_set1_ps(1.f), _mm512_add_ps(_mm512_set1_ps(1.f), exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), x))));
}

// f(offset, count, mask) over [0, n) in vectors of 16, split across threads
template <typename F>
void for_each_vector(int64_t n, const F& f) {
  constexpr int64_t grain = 16 * 2048;
  at::parallel_for(0, (n + grain - 1) / grain, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin * grain; i < std::min(n, end * grain); i += 16) f(i, tail(n - i));
  });
}

void check_same_bf16(const at::Tensor& a, const at::Tensor& b, const char* what) {
  TORCH_CHECK(a.scalar_type() == at::kBFloat16 && b.scalar_type() == at::kBFloat16 && a.sizes() == b.sizes() &&
                  a.is_contiguous() && b.is_contiguous(),
              "kha_cpu ", what, ": contiguous bf16 tensors of one shape expected");
}

}  // namespace

at::Tensor silu_mul_forward(const at::Tensor& a, const at::Tensor& b) {
  check_same_bf16(a, b, "silu_mul");
  auto out = at::empty_like(a);
  const BFloat16 *ad = a.const_data_ptr<BFloat16>(), *bd = b.const_data_ptr<BFloat16>();
  BFloat16* od = out.data_ptr<BFloat16>();
  for_each_vector(a.numel(), [&](int64_t i, __mmask16 m) {
    const __m512 x = load_bf16(ad + i, m);
    store_bf16(od + i, _mm512_mul_ps(_mm512_mul_ps(x, sigmoid_ps(x)), load_bf16(bd + i, m)), m);
  });
  return out;
}

// d/da silu(a) b = b sig(a) (1 + a (1 - sig(a))), d/db = silu(a)
std::tuple<at::Tensor, at::Tensor> silu_mul_backward(const at::Tensor& grad_out_in, const at::Tensor& a,
                                                     const at::Tensor& b) {
  check_same_bf16(a, b, "silu_mul_backward");
  auto grad_out = grad_out_in.to(at::kBFloat16).contiguous();
  check_same_bf16(grad_out, a, "silu_mul_backward");
  auto da = at::empty_like(a), db = at::empty_like(b);
  const BFloat16 *ad = a.const_data_ptr<BFloat16>(), *bd = b.const_data_ptr<BFloat16>(),
                 *gd = grad_out.const_data_ptr<BFloat16>();
  BFloat16 *dad = da.data_ptr<BFloat16>(), *dbd = db.data_ptr<BFloat16>();
  const __m512 one = _mm512_set1_ps(1.f);
  for_each_vector(a.numel(), [&](int64_t i, __mmask16 m) {
    const __m512 x = load_bf16(ad + i, m), g = load_bf16(gd + i, m), sig = sigmoid_ps(x);
    store_bf16(dbd + i, _mm512_mul_ps(g, _mm512_mul_ps(x, sig)), m);
    const __m512 dsilu = _mm512_mul_ps(sig, _mm512_fmadd_ps(x, _mm512_sub_ps(one, sig), one));
    store_bf16(dad + i, _mm512_mul_ps(_mm512_mul_ps(g, load_bf16(bd + i, m)), dsilu), m);
  });
  return {da, db};
}

namespace {

// Rows of logits with a target that counts (not ignore_index); raises on a target outside [0, V).
int64_t counted_rows(const at::Tensor& logits, const at::Tensor& targets, int64_t ignore_index) {
  TORCH_CHECK(logits.scalar_type() == at::kBFloat16 && logits.dim() == 2 && logits.is_contiguous() &&
                  targets.scalar_type() == at::kLong && targets.dim() == 1 && targets.size(0) == logits.size(0),
              "kha_cpu cross_entropy: contiguous bf16 logits (N, V) and int64 targets (N) expected");
  const int64_t V = logits.size(1);
  auto t = targets.contiguous();
  const int64_t* td = t.const_data_ptr<int64_t>();
  int64_t count = 0;
  for (int64_t i = 0; i < t.numel(); ++i) {
    if (td[i] == ignore_index) continue;
    TORCH_CHECK(td[i] >= 0 && td[i] < V, "cross_entropy: target ", td[i], " is out of bounds for ", V,
                " classes (valid: 0 to ", V - 1, ", or ignore_index ", ignore_index, ")");
    ++count;
  }
  return count;
}

}  // namespace

// Mean over counted rows of lse - logit[target] = (max - logit[target]) + log(sum exp(logit - max)), fp32 inside
// (a sum in double, in row order); also each row's log-sum-exp for the backward.
std::tuple<at::Tensor, at::Tensor> cross_entropy_forward(const at::Tensor& logits, const at::Tensor& targets_in,
                                                         int64_t ignore_index) {
  const int64_t count = counted_rows(logits, targets_in, ignore_index);
  const int64_t N = logits.size(0), V = logits.size(1);
  auto targets = targets_in.contiguous();
  auto lse = at::empty({N}, logits.options().dtype(at::kFloat));
  std::vector<float> row_loss(N, 0.f);
  const BFloat16* xd = logits.const_data_ptr<BFloat16>();
  const int64_t* td = targets.const_data_ptr<int64_t>();
  float* lsed = lse.data_ptr<float>();
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const BFloat16* x = xd + i * V;
      __m512 max_v = _mm512_set1_ps(-INFINITY);
      for (int64_t j = 0; j < V; j += 16) max_v = _mm512_mask_max_ps(max_v, tail(V - j), max_v, load_bf16(x + j, tail(V - j)));
      const float row_max = _mm512_reduce_max_ps(max_v);
      const __m512 max_b = _mm512_set1_ps(row_max);
      __m512 sum = _mm512_setzero_ps();
      for (int64_t j = 0; j < V; j += 16) {
        const __mmask16 m = tail(V - j);
        sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(m, exp_ps(_mm512_sub_ps(load_bf16(x + j, m), max_b))));
      }
      const float log_sum = std::log(_mm512_reduce_add_ps(sum));
      lsed[i] = row_max + log_sum;
      // lse - x[target] without rounding lse first: at logits of 1e4 lse's fp32 spacing is 1e-3
      if (td[i] != ignore_index) row_loss[i] = (row_max - static_cast<float>(x[td[i]])) + log_sum;
    }
  });
  double total = 0;
  for (float l : row_loss) total += l;
  return {at::full({}, static_cast<float>(total / static_cast<double>(count)), lse.options()), lse};
}

// d loss / d logit[i, j] = grad (softmax_ij - [j == target_i]) / count, rows with ignore_index zero
at::Tensor cross_entropy_backward(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& targets_in,
                                  const at::Tensor& lse, int64_t ignore_index) {
  const int64_t count = counted_rows(logits, targets_in, ignore_index);
  const int64_t N = logits.size(0), V = logits.size(1);
  auto targets = targets_in.contiguous();
  auto lse_c = lse.contiguous();
  auto dx = at::empty_like(logits);
  const float scale = grad.item<float>() / static_cast<float>(count);
  const BFloat16* xd = logits.const_data_ptr<BFloat16>();
  BFloat16* dxd = dx.data_ptr<BFloat16>();
  const int64_t* td = targets.const_data_ptr<int64_t>();
  const float* lsed = lse_c.const_data_ptr<float>();
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const BFloat16* x = xd + i * V;
      BFloat16* dxr = dxd + i * V;
      const bool counted = td[i] != ignore_index;
      const __m512 lse_b = _mm512_set1_ps(lsed[i]), scale_b = _mm512_set1_ps(counted ? scale : 0.f);
      for (int64_t j = 0; j < V; j += 16) {
        const __mmask16 m = tail(V - j);
        __m512 p = _mm512_mul_ps(exp_ps(_mm512_sub_ps(load_bf16(x + j, m), lse_b)), scale_b);
        const int64_t hit = td[i] - j;
        if (counted && hit >= 0 && hit < 16)
          p = _mm512_mask_sub_ps(p, __mmask16(1u << hit), p, _mm512_set1_ps(scale));
        store_bf16(dxr + j, p, m);
      }
    }
  });
  return dx;
}

// ---------------------------------------------------------------- Knocks
//
// kha.knock's fused forms on rows of head_dim features (the (..., heads, D) output of a head projection), one
// pass each way where torch runs a chain of small products and elementwise kernels, each costing more than its
// FLOPs at these shapes (docs/benchmarks.md, section j). One kernel for every knock type: with U = W_up - I,
// G = W_gate / 2 and N = W_down - I, each present or not (KHA-Linear: U = T - I alone; the gate knock: G alone;
// KHA-MLP: all three),
//   [c_u | c_g] = y [U | G],  u = y + c_u,  t = tanh(c_g),  h = u + u t,  out = h + bf16(h) N,
// the products through tile_gemm (bf16 operands, fp32 sums), u, t and h in fp32, the output rounded once.
// Backward from dout, the forward recomputed per block of 64 rows:
//   dN += bf16(h)^T dout,  dh = dout + dout N^T,  du = dh (1 + t),  dc_g = dh u (1 - t^2),
//   dy = du + [du | dc_g] [U | G]^T,  d[U | G] += y^T [du | dc_g]   (and dW_gate = dG / 2).
// The weight gradients are summed per chunk of blocks (the chunks set by the row count alone), then the
// chunks by sum_in_tree: the bits do not depend on the thread count.

namespace {

constexpr int64_t KNOCK_CHUNKS = 8;  // partial sums of the weight gradients (at most; fewer below 8 blocks of rows)

// tanh(x) = 1 - 2 / (exp(2x) + 1): within about 2e-7 of tanh near 0, where a knock's gates sit (far below the
// bf16 step of the values they scale). x is clamped to [-9, 9] first, where tanh is +-1 in fp32: beyond that
// exp(2x) would overflow to inf, and the Newton step below would turn inf * 0 into NaN. NaN stays NaN (max and
// min return their second operand when either is NaN).
inline __m512 tanh_ps(__m512 x) {
  const __m512 one = _mm512_set1_ps(1.f), two = _mm512_set1_ps(2.f);
  x = _mm512_min_ps(_mm512_set1_ps(9.f), _mm512_max_ps(_mm512_set1_ps(-9.f), x));
  const __m512 d = _mm512_add_ps(exp_ps(_mm512_add_ps(x, x)), one);
  __m512 r = _mm512_rcp14_ps(d);                                  // 1 / d within 2^-14, then one Newton step
  r = _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, two));              // r (2 - d r): within about 2^-23
  return _mm512_fnmadd_ps(two, r, one);
}

// dst (cols x rows) = src (rows x cols, rows ld apart)^T, row-major bf16, rows a multiple of 8 and cols of 32: per 8 rows x 32
// columns, the 8 x 8 transposes of the four 128-bit lanes at once (unpacking 16-, 32-, then 64-bit elements);
// v[k]'s lane l is then column 8 l + k over the 8 rows.
void transpose_bf16(const BFloat16* src, int64_t ld, int64_t rows, int64_t cols, BFloat16* dst) {
  for (int64_t r = 0; r < rows; r += 8)
    for (int64_t c = 0; c < cols; c += 32) {
      __m512i a[8], t[8], u[8], v[8];
      for (int i = 0; i < 8; ++i) a[i] = _mm512_loadu_si512(src + (r + i) * ld + c);
      for (int i = 0; i < 4; ++i) {
        t[2 * i] = _mm512_unpacklo_epi16(a[2 * i], a[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi16(a[2 * i], a[2 * i + 1]);
      }
      for (int h = 0; h < 2; ++h)
        for (int i = 0; i < 2; ++i) {
          u[4 * h + 2 * i] = _mm512_unpacklo_epi32(t[4 * h + i], t[4 * h + i + 2]);
          u[4 * h + 2 * i + 1] = _mm512_unpackhi_epi32(t[4 * h + i], t[4 * h + i + 2]);
        }
      for (int i = 0; i < 4; ++i) {
        v[2 * i] = _mm512_unpacklo_epi64(u[i], u[i + 4]);
        v[2 * i + 1] = _mm512_unpackhi_epi64(u[i], u[i + 4]);
      }
      for (int k = 0; k < 8; ++k) {
        BFloat16* out = dst + (c + k) * rows + r;
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm512_extracti32x4_epi32(v[k], 0));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 8 * rows), _mm512_extracti32x4_epi32(v[k], 1));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 16 * rows), _mm512_extracti32x4_epi32(v[k], 2));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 24 * rows), _mm512_extracti32x4_epi32(v[k], 3));
      }
    }
}

// A block of up to BLK rows of d values: the rows themselves when there are BLK of them, else a copy padded with
// zero rows (which add nothing to a weight gradient).
const BFloat16* block_rows(const BFloat16* src, int64_t n, int64_t d, BFloat16* pad) {
  if (n == BLK) return src;
  std::copy(src, src + n * d, pad);
  std::fill(pad + n * d, pad + BLK * d, BFloat16(0.f));
  return pad;
}

// The knock's matrices as the products read them (VNNI layout): F = [U | G] (D x n1) and F^T, N and N^T.
struct KnockMatrices {
  int64_t D = 0, n1 = 0, gate_col = 0;  // n1: columns of F; gate_col: G's first column in F
  bool up = false, gate = false, down = false;
  std::vector<BFloat16> f, f_t, n, n_t;
};

// m (rows x cols, row-major) in the VNNI layout of a right operand, and m^T likewise
void pack_both(const std::vector<BFloat16>& m, int64_t rows, int64_t cols, std::vector<BFloat16>& out,
               std::vector<BFloat16>& out_t) {
  out.resize(rows * cols);
  out_t.resize(rows * cols);
  pack_rows(m.data(), cols, rows, cols, out.data());
  pack_transposed(m.data(), cols, rows, cols, cols, out_t.data(), 2 * rows);
}

// The D x D matrix (w - I) * scale (w * scale without the identity), or its transpose, as bf16 rows ld apart: each
// entry formed in fp32 and rounded once, so a matrix near I keeps its small deviation (kha.knock's fused forms).
void offset_bf16(const at::Tensor& w_in, bool identity, float scale, bool transposed, BFloat16* dst, int64_t ld) {
  const auto w = w_in.to(at::kFloat).contiguous();
  const int64_t D = w.size(0);
  const float* wd = w.const_data_ptr<float>();
  for (int64_t i = 0; i < D; ++i)
    for (int64_t j = 0; j < D; ++j)
      dst[i * ld + j] = BFloat16(((transposed ? wd[j * D + i] : wd[i * D + j]) - (identity && i == j)) * scale);
}

KnockMatrices knock_matrices(const std::optional<at::Tensor>& w_up, const std::optional<at::Tensor>& w_gate,
                             const std::optional<at::Tensor>& w_down, int64_t D) {
  KnockMatrices k;
  k.D = D;
  k.up = w_up.has_value(), k.gate = w_gate.has_value(), k.down = w_down.has_value();
  k.gate_col = k.up ? D : 0;
  k.n1 = k.gate_col + (k.gate ? D : 0);
  if (k.n1 > 0) {
    std::vector<BFloat16> f(D * k.n1);
    if (k.up) offset_bf16(*w_up, true, 1.f, false, f.data(), k.n1);
    if (k.gate) offset_bf16(*w_gate, false, 0.5f, false, f.data() + k.gate_col, k.n1);
    pack_both(f, D, k.n1, k.f, k.f_t);
  }
  if (k.down) {
    std::vector<BFloat16> n(D * D);
    offset_bf16(*w_down, true, 1.f, false, n.data(), D);
    pack_both(n, D, D, k.n, k.n_t);
  }
  return k;
}

void check_knock(const at::Tensor& y, const std::optional<at::Tensor>& w_up, const std::optional<at::Tensor>& w_gate,
                 const std::optional<at::Tensor>& w_down) {
  TORCH_CHECK(y.scalar_type() == at::kBFloat16 && y.dim() >= 1 && y.is_contiguous(),
              "kha_cpu knock: y must be a contiguous bf16 tensor of rows of head_dim values");
  const int64_t D = y.size(-1);
  TORCH_CHECK(D > 0 && D % 32 == 0, "kha_cpu knock: head_dim ", D, " must be a positive multiple of 32");
  TORCH_CHECK(w_up.has_value() || w_gate.has_value() || w_down.has_value(), "kha_cpu knock: no matrix given");
  for (const auto* w : {&w_up, &w_gate, &w_down})
    TORCH_CHECK(!w->has_value() || ((*w)->is_floating_point() && (*w)->sizes() == at::IntArrayRef({D, D})),
                "kha_cpu knock: every matrix must be a floating-point head_dim x head_dim (", D, " x ", D, ") tensor");
}

// The forward of one block of BLK rows y: c = y F (BLK x n1), then h (fp32), with N hb = bf16(h), and with a gate
// u and t (fp32) where the backward asks for them (not null).
void knock_block_forward(const KnockMatrices& k, const BFloat16* y, float* c, float* u, float* t, float* h,
                         BFloat16* hb) {
  const int64_t D = k.D, n1 = k.n1;
  if (n1 > 0) tile_gemm(BLK, n1, D, y, D, k.f.data(), 2 * n1, c, n1, false);
  for (int64_t r = 0; r < BLK; ++r)
    for (int64_t j = 0; j < D; j += 16) {
      __m512 uv = load_bf16(y + r * D + j);
      if (k.up) uv = _mm512_add_ps(uv, _mm512_loadu_ps(c + r * n1 + j));
      __m512 hv = uv;
      if (k.gate) {
        const __m512 tv = tanh_ps(_mm512_loadu_ps(c + r * n1 + k.gate_col + j));
        hv = _mm512_fmadd_ps(uv, tv, uv);
        if (u != nullptr) {
          _mm512_storeu_ps(u + r * D + j, uv);
          _mm512_storeu_ps(t + r * D + j, tv);
        }
      }
      _mm512_storeu_ps(h + r * D + j, hv);
      if (k.down) store_bf16(hb + r * D + j, hv);
    }
}

}  // namespace

at::Tensor knock_forward(const at::Tensor& y, const std::optional<at::Tensor>& w_up,
                         const std::optional<at::Tensor>& w_gate, const std::optional<at::Tensor>& w_down) {
  check_knock(y, w_up, w_gate, w_down);
  const int64_t D = y.size(-1), rows = y.numel() / D, blocks = (rows + BLK - 1) / BLK;
  const KnockMatrices k = knock_matrices(w_up, w_gate, w_down, D);
  auto out = at::empty_like(y);
  const BFloat16* yd = y.const_data_ptr<BFloat16>();
  BFloat16* od = out.data_ptr<BFloat16>();
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    BFloat16 *pad = scratch<BFloat16>(0, BLK * D), *hb = scratch<BFloat16>(1, BLK * D);
    float *c = scratch<float>(0, BLK * std::max(k.n1, D)), *h = scratch<float>(1, BLK * D);
    configure_tiles();
    for (int64_t block = begin; block < end; ++block) {
      const int64_t r0 = block * BLK, n = std::min(BLK, rows - r0);
      knock_block_forward(k, block_rows(yd + r0 * D, n, D, pad), c, nullptr, nullptr, h, hb);
      if (k.down) tile_gemm(BLK, D, D, hb, D, k.n.data(), 2 * D, c, D, false);
      for (int64_t r = 0; r < n; ++r)
        for (int64_t j = 0; j < D; j += 16) {
          const __m512 hv = _mm512_loadu_ps(h + r * D + j);
          store_bf16(od + (r0 + r) * D + j, k.down ? _mm512_add_ps(hv, _mm512_loadu_ps(c + r * D + j)) : hv);
        }
    }
    release_tiles();
  });
  return out;
}

// dy (bf16, y's shape) and the matrices' gradients as one fp32 (m, D, D) tensor, m the matrices given, in the
// order up, gate, down.
std::tuple<at::Tensor, at::Tensor> knock_backward(const at::Tensor& grad_out_in, const at::Tensor& y,
                                                  const std::optional<at::Tensor>& w_up,
                                                  const std::optional<at::Tensor>& w_gate,
                                                  const std::optional<at::Tensor>& w_down) {
  check_knock(y, w_up, w_gate, w_down);
  auto grad_out = grad_out_in.to(at::kBFloat16).contiguous();
  TORCH_CHECK(grad_out.sizes() == y.sizes(), "kha_cpu knock_backward: grad_out must have y's shape");
  const int64_t D = y.size(-1), rows = y.numel() / D, blocks = (rows + BLK - 1) / BLK;
  const KnockMatrices k = knock_matrices(w_up, w_gate, w_down, D);
  const int64_t n1 = k.n1, f_size = D * n1, size = f_size + (k.down ? D * D : 0);
  const int64_t chunk_blocks = std::max<int64_t>(1, (blocks + KNOCK_CHUNKS - 1) / KNOCK_CHUNKS);
  const int64_t chunks = std::max<int64_t>(1, (blocks + chunk_blocks - 1) / chunk_blocks);
  auto parts = at::zeros({chunks, size}, y.options().dtype(at::kFloat));
  auto dy = at::empty_like(y);
  const BFloat16 *yd = y.const_data_ptr<BFloat16>(), *gd = grad_out.const_data_ptr<BFloat16>();
  BFloat16* dyd = dy.data_ptr<BFloat16>();
  float* partial = parts.data_ptr<float>();
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    BFloat16 *y_pad = scratch<BFloat16>(0, BLK * D), *g_pad = scratch<BFloat16>(1, BLK * D),
             *hb = scratch<BFloat16>(2, BLK * D), *rows_t = scratch<BFloat16>(3, BLK * D),
             *packed = scratch<BFloat16>(4, BLK * std::max(n1, D)), *g1 = scratch<BFloat16>(5, BLK * n1);
    float *c = scratch<float>(0, BLK * std::max(n1, D)), *u = scratch<float>(1, BLK * D),
          *t = scratch<float>(2, BLK * D), *h = scratch<float>(3, BLK * D), *du = scratch<float>(4, BLK * D);
    configure_tiles();
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      float* part = partial + chunk * size;
      for (int64_t block = chunk * chunk_blocks; block < std::min(blocks, (chunk + 1) * chunk_blocks); ++block) {
        const int64_t r0 = block * BLK, n = std::min(BLK, rows - r0);
        const BFloat16 *yb = block_rows(yd + r0 * D, n, D, y_pad), *gb = block_rows(gd + r0 * D, n, D, g_pad);
        knock_block_forward(k, yb, c, u, t, h, hb);
        if (k.down) {  // dN += hb^T dout, then dh = dout + dout N^T (into du)
          transpose_bf16(hb, D, BLK, D, rows_t);
          pack_rows(gb, D, BLK, D, packed);
          tile_gemm(D, D, BLK, rows_t, BLK, packed, 2 * D, part + f_size, D, true);
          tile_gemm(BLK, D, D, gb, D, k.n_t.data(), 2 * D, c, D, false);
        }
        for (int64_t r = 0; r < BLK; ++r)
          for (int64_t j = 0; j < D; j += 16) {
            const int64_t i = r * D + j;
            __m512 dh = load_bf16(gb + i);
            if (k.down) dh = _mm512_add_ps(dh, _mm512_loadu_ps(c + i));
            __m512 duv = dh;
            if (k.gate) {
              const __m512 tv = _mm512_loadu_ps(t + i);
              duv = _mm512_fmadd_ps(dh, tv, dh);
              const __m512 dc = _mm512_mul_ps(_mm512_mul_ps(dh, _mm512_loadu_ps(u + i)),
                                              _mm512_fnmadd_ps(tv, tv, _mm512_set1_ps(1.f)));
              store_bf16(g1 + r * n1 + k.gate_col + j, dc);
            }
            if (k.up) store_bf16(g1 + r * n1 + j, duv);
            _mm512_storeu_ps(du + i, duv);
          }
        if (n1 > 0) {  // dy = du + [du | dc_g] F^T, d F += y^T [du | dc_g]
          tile_gemm(BLK, D, n1, g1, n1, k.f_t.data(), 2 * D, c, D, false);
          transpose_bf16(yb, D, BLK, D, rows_t);
          pack_rows(g1, n1, BLK, n1, packed);
          tile_gemm(D, n1, BLK, rows_t, BLK, packed, 2 * n1, part, n1, true);
        }
        for (int64_t r = 0; r < n; ++r)
          for (int64_t j = 0; j < D; j += 16) {
            const int64_t i = r * D + j;
            const __m512 dyv = _mm512_loadu_ps(du + i);
            store_bf16(dyd + r0 * D + i, n1 > 0 ? _mm512_add_ps(dyv, _mm512_loadu_ps(c + i)) : dyv);
          }
      }
    }
    release_tiles();
  });
  sum_in_tree(partial, chunks, size);
  const int64_t m = k.up + k.gate + k.down;
  auto grads = at::empty({m, D, D}, parts.options());
  float* gw = grads.data_ptr<float>();
  int64_t slot = 0;
  auto take = [&](const float* src, int64_t ld, float scale) {  // a D x D block of the sums, rows ld apart
    for (int64_t i = 0; i < D; ++i)
      for (int64_t j = 0; j < D; ++j) gw[(slot * D + i) * D + j] = src[i * ld + j] * scale;
    ++slot;
  };
  if (k.up) take(partial, n1, 1.f);
  if (k.gate) take(partial + k.gate_col, n1, 0.5f);
  if (k.down) take(partial + f_size, D, 1.f);
  return {dy, grads};
}

// ---------------------------------------------------------------- KHA-Linear folded into its projection
//
// Training folds T into the head projection (eq. 8): with the projection's fp32 weight W (heads x D rows of d_in
// values; head i's rows W_i) and Delta = (T - I)^T, the bf16 weight F.linear reads under autocast is
//   W'_i = bf16(W_i + Delta bf16(W_i)),
// made in one pass over W (the pass autocast's cast to bf16 would make anyway), the product through tile_gemm.
// Backward from dW' (bf16, what F.linear's backward gives under autocast):
//   dW_i = dW'_i + Delta^T dW'_i (fp32, the master weight's gradient),  dT = sum_i bf16(W_i) dW'_i^T,
// a head per unit of parallel work, its rows read in order (packed, converted), then its products in blocks
// of FOLD_COLS columns (the head's rows, now in L2); dT's per-head partial sums added by sum_in_tree.

namespace {

constexpr int64_t FOLD_COLS = 64;  // columns of W per product

// rows x cols values of fp32 src (rows even, cols a multiple of 16, rows ld apart) as bf16 in the VNNI layout of
// a right operand
void pack_rows_f32(const float* src, int64_t ld, int64_t rows, int64_t cols, BFloat16* dst) {
  const __m512i pairs = interleave_idx();
  for (int64_t r = 0; r < rows; r += 2)
    for (int64_t c = 0; c < cols; c += 16) {
      const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + (r + 1) * ld + c),
                                                         _mm512_loadu_ps(src + r * ld + c));
      _mm512_storeu_si512(dst + r * cols + 2 * c, _mm512_permutexvar_epi16(pairs, both));
    }
}

// (T - I)^T (or T - I when transposed is false) as row-major bf16, each entry formed in fp32 and rounded once
std::vector<BFloat16> minus_identity(const at::Tensor& t, bool transposed) {
  std::vector<BFloat16> out(t.size(0) * t.size(0));
  offset_bf16(t, true, 1.f, transposed, out.data(), t.size(0));
  return out;
}

void check_fold(const at::Tensor& w, const at::Tensor& t) {
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.dim() == 2 && w.is_contiguous(),
              "kha_cpu fold: the projection's weight must be a contiguous fp32 (heads x head_dim, d_in) tensor");
  const int64_t D = t.size(0);
  TORCH_CHECK(t.is_floating_point() && t.dim() == 2 && t.size(1) == D && D > 0 && D % 32 == 0,
              "kha_cpu fold: T must be a square floating-point matrix of a multiple of 32 rows, got ", t.sizes());
  TORCH_CHECK(w.size(0) % D == 0 && w.size(1) > 0 && w.size(1) % FOLD_COLS == 0, "kha_cpu fold: the weight's ",
              w.size(0), " rows must be whole heads of ", D, " and its ", w.size(1), " columns a multiple of ",
              FOLD_COLS);
}

}  // namespace

at::Tensor fold_forward(const at::Tensor& w, const at::Tensor& t) {
  check_fold(w, t);
  const int64_t D = t.size(0), heads = w.size(0) / D, d_in = w.size(1);
  const std::vector<BFloat16> delta = minus_identity(t, true);
  auto out = at::empty(w.sizes(), w.options().dtype(at::kBFloat16));
  const float* wd = w.const_data_ptr<float>();
  BFloat16* od = out.data_ptr<BFloat16>();
  at::parallel_for(0, heads, 1, [&](int64_t begin, int64_t end) {
    BFloat16* packed = scratch<BFloat16>(0, D * d_in);
    float* c = scratch<float>(0, D * FOLD_COLS);
    configure_tiles();
    for (int64_t head = begin; head < end; ++head) {
      const float* wi = wd + head * D * d_in;
      BFloat16* oi = od + head * D * d_in;
      pack_rows_f32(wi, d_in, D, d_in, packed);
      for (int64_t c0 = 0; c0 < d_in; c0 += FOLD_COLS) {
        tile_gemm(D, FOLD_COLS, D, delta.data(), D, packed + 2 * c0, 2 * d_in, c, FOLD_COLS, false);
        for (int64_t r = 0; r < D; ++r)
          for (int64_t j = 0; j < FOLD_COLS; j += 16) {
            const int64_t i = r * d_in + c0 + j;
            store_bf16(oi + i, _mm512_add_ps(_mm512_loadu_ps(wi + i), _mm512_loadu_ps(c + r * FOLD_COLS + j)));
          }
      }
    }
    release_tiles();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> fold_backward(const at::Tensor& grad_in, const at::Tensor& w, const at::Tensor& t) {
  check_fold(w, t);
  auto grad = grad_in.to(at::kBFloat16).contiguous();
  TORCH_CHECK(grad.sizes() == w.sizes(), "kha_cpu fold_backward: the gradient must have the weight's shape");
  const int64_t D = t.size(0), heads = w.size(0) / D, d_in = w.size(1);
  const std::vector<BFloat16> delta_t = minus_identity(t, false);
  auto dw = at::empty_like(w);
  auto parts = at::zeros({heads, D * D}, w.options());
  const float* wd = w.const_data_ptr<float>();
  const BFloat16* gd = grad.const_data_ptr<BFloat16>();
  float *dwd = dw.data_ptr<float>(), *partial = parts.data_ptr<float>();
  at::parallel_for(0, heads, 1, [&](int64_t begin, int64_t end) {
    BFloat16 *packed = scratch<BFloat16>(0, D * d_in), *w_rows = scratch<BFloat16>(1, D * d_in),
             *g_t = scratch<BFloat16>(2, D * FOLD_COLS), *packed_t = scratch<BFloat16>(3, D * FOLD_COLS);
    float* c = scratch<float>(0, D * FOLD_COLS);
    configure_tiles();
    for (int64_t head = begin; head < end; ++head) {
      const float* wi = wd + head * D * d_in;
      const BFloat16* gi = gd + head * D * d_in;
      float* dwi = dwd + head * D * d_in;
      pack_rows(gi, d_in, D, d_in, packed);  // the head's rows read in order: dW'_i packed, bf16(W_i)
      for (int64_t i = 0; i < D * d_in; i += 16) store_bf16(w_rows + i, _mm512_loadu_ps(wi + i));
      for (int64_t c0 = 0; c0 < d_in; c0 += FOLD_COLS) {
        tile_gemm(D, FOLD_COLS, D, delta_t.data(), D, packed + 2 * c0, 2 * d_in, c, FOLD_COLS, false);
        for (int64_t r = 0; r < D; ++r)  // dW_i = dW'_i + (T - I) dW'_i
          for (int64_t j = 0; j < FOLD_COLS; j += 16) {
            const int64_t i = r * d_in + c0 + j;
            _mm512_storeu_ps(dwi + i, _mm512_add_ps(load_bf16(gi + i), _mm512_loadu_ps(c + r * FOLD_COLS + j)));
          }
        // dT += bf16(W_i) dW'_i^T; dW'_i^T packed as pack_transposed would, through the vectorised transpose (this
        // runs per block, pack_transposed moves one pair at a time)
        transpose_bf16(gi + c0, d_in, D, FOLD_COLS, g_t);
        pack_rows(g_t, D, FOLD_COLS, D, packed_t);
        tile_gemm(D, D, FOLD_COLS, w_rows + c0, d_in, packed_t, 2 * D, partial + head * D * D, D, true);
      }
    }
    release_tiles();
  });
  sum_in_tree(partial, heads, D * D);
  return {dw, parts[0].view({D, D}).clone()};
}

TORCH_LIBRARY(kha_cpu, m) {
  m.def("attention_forward(Tensor q, Tensor k, Tensor v, float scale, bool is_causal, Tensor? starts=None) -> "
        "(Tensor, Tensor)");
  m.def("attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor logsumexp, "
        "float scale, bool is_causal, Tensor? starts=None) -> (Tensor, Tensor, Tensor)");
  m.def("norm_rope_forward(Tensor x, Tensor weight, Tensor cos, Tensor sin, float eps) -> Tensor");
  m.def("norm_rope_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor cos, Tensor sin, float eps) "
        "-> (Tensor, Tensor)");
  m.def("rms_norm_forward(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("rms_norm_backward(Tensor grad_out, Tensor x, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("silu_mul_forward(Tensor a, Tensor b) -> Tensor");
  m.def("silu_mul_backward(Tensor grad_out, Tensor a, Tensor b) -> (Tensor, Tensor)");
  m.def("cross_entropy_forward(Tensor logits, Tensor targets, int ignore_index) -> (Tensor, Tensor)");
  m.def("cross_entropy_backward(Tensor grad, Tensor logits, Tensor targets, Tensor lse, int ignore_index) -> Tensor");
  m.def("knock_forward(Tensor y, Tensor? w_up, Tensor? w_gate, Tensor? w_down) -> Tensor");
  m.def("knock_backward(Tensor grad_out, Tensor y, Tensor? w_up, Tensor? w_gate, Tensor? w_down) -> (Tensor, Tensor)");
  m.def("fold_forward(Tensor weight, Tensor t) -> Tensor");
  m.def("fold_backward(Tensor grad, Tensor weight, Tensor t) -> (Tensor, Tensor)");
  m.def("set_tiles(bool enabled) -> ()");
}
TORCH_LIBRARY_IMPL(kha_cpu, CPU, m) {
  m.impl("attention_forward", &attention_forward);
  m.impl("attention_backward", &attention_backward);
  m.impl("norm_rope_forward", &norm_rope_forward);
  m.impl("norm_rope_backward", &norm_rope_backward);
  m.impl("rms_norm_forward", &rms_norm_forward);
  m.impl("rms_norm_backward", &rms_norm_backward);
  m.impl("silu_mul_forward", &silu_mul_forward);
  m.impl("silu_mul_backward", &silu_mul_backward);
  m.impl("cross_entropy_forward", &cross_entropy_forward);
  m.impl("cross_entropy_backward", &cross_entropy_backward);
  m.impl("knock_forward", &knock_forward);
  m.impl("knock_backward", &knock_backward);
  m.impl("fold_forward", &fold_forward);
  m.impl("fold_backward", &fold_backward);
}
TORCH_LIBRARY_IMPL(kha_cpu, CompositeExplicitAutograd, m) {
  m.impl("set_tiles", [](bool enabled) { tiles = enabled; });
}
