/* Dequantization kernels for the CPU: the eager weight-only path of quanto, NNCF and GGUF layers there.

   Each function reads a layer's packed weight once and writes the dense weight once, repeating its
   reference's arithmetic exactly (backends/quanto.py, backends/nncf_ops.py, backends/gguf/dequant.py, and
   the Triton kernels of kernels.py, which do the same on CUDA): the same operations in the same order, each
   rounded to the dtype the reference rounds it to. Built by cpu_kernels.py with the machine's C compiler
   (-O3 -march=native: the loops vectorize) and called through ctypes.

   Dtype kinds: 0 bfloat16, 1 float16, 2 float32. bfloat16 rounds to nearest even as c10::BFloat16 does;
   float16 through _Float16 (IEEE round to nearest even). */

#include <stdint.h>
#include <string.h>

enum { BF16 = 0, F16 = 1, F32 = 2 };

#define INLINE static inline __attribute__((always_inline))

INLINE float from_bits(uint32_t u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}

INLINE uint32_t to_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
}

/* float -> bfloat16 bits: round to nearest even; NaN -> 0x7fc0 */
INLINE uint16_t bf16_bits(float f) {
  uint32_t u = to_bits(f);
  uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return (uint16_t)((u & 0x7fffffffu) > 0x7f800000u ? 0x7fc0u : r);
}

INLINE float half_to_float(uint16_t h) {
  _Float16 v;
  memcpy(&v, &h, 2);
  return (float)v;
}

INLINE uint16_t half_bits(float f) {
  _Float16 v = (_Float16)f;
  uint16_t h;
  memcpy(&h, &v, 2);
  return h;
}

/* x rounded to the kind's precision, as a float */
INLINE float rnd(const int kind, float x) {
  if (kind == BF16) return from_bits((uint32_t)bf16_bits(x) << 16);
  if (kind == F16) return (float)(_Float16)x;
  return x;
}

INLINE float load(const int kind, const void* p, int64_t i) {
  if (kind == BF16) return from_bits((uint32_t)((const uint16_t*)p)[i] << 16);
  if (kind == F16) return half_to_float(((const uint16_t*)p)[i]);
  return ((const float*)p)[i];
}

INLINE void store(const int kind, void* p, int64_t i, float x) {
  if (kind == BF16)
    ((uint16_t*)p)[i] = bf16_bits(x);
  else if (kind == F16)
    ((uint16_t*)p)[i] = half_bits(x);
  else
    ((float*)p)[i] = x;
}

/* float8 e4m3fn code -> float, exact (subnormal codes too): sign and the 7 other bits placed at the top of
   a float32 pattern, whose exponent bias then differs by 120. NaN codes (never written) read as 480. */
INLINE float e4m3(uint8_t code) {
  uint32_t u = code;
  return from_bits(((u & 0x80u) << 24) | ((u & 0x7fu) << 20)) * 0x1p120f;
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)

/* ---- 16 lanes of AVX-512 ---------------------------------------------------------------------------- */

#include <immintrin.h>

#define W 16
typedef __m512 vf;
typedef __m512i vi;

int dq_available(void) { return 1; }

static const int32_t LANE_INDEX[16] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
static const int32_t NIBBLE_SHIFT[16] = {0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4};

INLINE vi v_u8i(const uint8_t* p) { return _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p)); }
INLINE vi v_s8i(const uint8_t* p) { return _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)); }
INLINE vf v_float(vi x) { return _mm512_cvtepi32_ps(x); }
INLINE vi v_set(int32_t x) { return _mm512_set1_epi32(x); }
INLINE vi v_and(vi a, int32_t m) { return _mm512_and_si512(a, v_set(m)); }

/* bit field (p[l] >> at) & mask of 16 bytes */
INLINE vf v_field(const uint8_t* p, int at, int mask) {
  return v_float(v_and(_mm512_srli_epi32(v_u8i(p), (unsigned)at), mask));
}

/* float8 e4m3fn codes, exact: normal ones rebuilt as float32 bits (exponent bias 7 -> 127), subnormal ones
   (exponent 0) as mantissa * 2**-9; no float32 subnormal is touched (those cost the CPU microcode assists) */
INLINE vf v_e4m3(const uint8_t* p) {
  vi u = v_u8i(p);
  vi normal = _mm512_add_epi32(_mm512_slli_epi32(v_and(u, 0x7f), 20), v_set(120 << 23));
  vf tiny = _mm512_mul_ps(v_float(v_and(u, 7)), _mm512_set1_ps(0x1p-9f));
  __mmask16 sub = _mm512_cmpeq_epi32_mask(v_and(u, 0x78), _mm512_setzero_si512());
  vi mag = _mm512_mask_mov_epi32(normal, sub, _mm512_castps_si512(tiny));
  return _mm512_castsi512_ps(_mm512_or_si512(mag, _mm512_slli_epi32(v_and(u, 0x80), 24)));
}

/* bfloat16 bits (in the low half of each lane) of x, rounded as bf16_bits does */
INLINE vi v_bf16_bits(vf x) {
  vi u = _mm512_castps_si512(x);
  vi bias = _mm512_add_epi32(v_and(_mm512_srli_epi32(u, 16), 1), v_set(0x7fff));
  vi r = _mm512_srli_epi32(_mm512_add_epi32(u, bias), 16);
  return _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), v_set(0x7fc0));
}

/* x as 16 bfloat16s. With AVX512-BF16 one instruction rounds (to nearest even, as bf16_bits), except that
   it flushes subnormals and keeps a NaN's sign: vectors holding either take the integer route. */
INLINE __m256i v_bf16(vf x) {
#ifdef __AVX512BF16__
  if (!_mm512_fpclass_ps_mask(x, 0x01 | 0x20 | 0x80)) return (__m256i)_mm512_cvtneps_pbh(x);
#endif
  return _mm512_cvtepi32_epi16(v_bf16_bits(x));
}

INLINE vf v_rnd(const int kind, vf x) {
  if (kind == BF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v_bf16(x)), 16));
  if (kind == F16) return _mm512_cvtph_ps(_mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  return x;
}

INLINE void v_store(const int kind, void* p, int64_t i, vf x) {
  if (kind == BF16)
    _mm256_storeu_si256((__m256i*)((uint16_t*)p + i), v_bf16(x));
  else if (kind == F16)
    _mm256_storeu_si256((__m256i*)((uint16_t*)p + i),
                        _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  else
    _mm512_storeu_ps((float*)p + i, x);
}

#define SPLAT(x) _mm512_set1_ps(x)
#define MUL(a, b) _mm512_mul_ps(a, b)
#define ADD(a, b) _mm512_add_ps(a, b)
#define SUB(a, b) _mm512_sub_ps(a, b)

/* 16 nibbles from 8 bytes, element 2k in the low nibble of byte k */
INLINE vf v_nibbles(const uint8_t* p) {
  __m128i b = _mm_loadl_epi64((const __m128i*)p);
  vi pairs = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(b, b));
  return v_float(v_and(_mm512_srlv_epi32(pairs, _mm512_loadu_si512(NIBBLE_SHIFT)), 15));
}

/* Calls `call(kind)` with a literal kind, so every loop is compiled for one dtype. */
#define BY_KIND(kind, call)       \
  switch (kind) {                 \
    case BF16: call(BF16); break; \
    case F16: call(F16); break;   \
    default: call(F32); break;    \
  }

/* ---- quanto: 8-bit rows, w = round(scale * q) in the scale's dtype ---------------------------------- */

INLINE void quanto_bytes_k(const int kind, const void* data, int fp8, const void* scale, void* out,
                           int64_t rows, int64_t cols) {
  for (int64_t r = 0; r < rows; r++) {
    const float s = load(kind, scale, r);
    const int64_t base = r * cols;
    const uint8_t* q = (const uint8_t*)data + base;
    int64_t c = 0;
    if (fp8) {
      for (; c + W <= cols; c += W) v_store(kind, out, base + c, MUL(SPLAT(s), v_e4m3(q + c)));
      for (; c < cols; c++) store(kind, out, base + c, s * e4m3(q[c]));
    } else {
      for (; c + W <= cols; c += W) v_store(kind, out, base + c, MUL(SPLAT(s), v_float(v_s8i(q + c))));
      for (; c < cols; c++) store(kind, out, base + c, s * (float)(int8_t)q[c]);
    }
  }
}

void dq_quanto_bytes(const void* data, int fp8, const void* scale, void* out, int64_t rows, int64_t cols,
                     int kind) {
#define CALL(k) quanto_bytes_k(k, data, fp8, scale, out, rows, cols)
  BY_KIND(kind, CALL)
#undef CALL
}

/* ---- bitsandbytes: int8 rows, w = round(q * (SCB * (1 / 127))) in the output's dtype ----------------
   As bitsandbytes' MatMul8bitFp dequantizes: the float32 row absmax times the float32 1/127, then the product
   with the code, rounded once. */

INLINE void bnb_int8_k(const int kind, const uint8_t* data, const float* scb, void* out, int64_t rows,
                       int64_t cols) {
  const float step = (float)(1.0 / 127.0);
  for (int64_t r = 0; r < rows; r++) {
    const float s = scb[r] * step;
    const int64_t base = r * cols;
    const uint8_t* q = data + base;
    int64_t c = 0;
    for (; c + W <= cols; c += W) v_store(kind, out, base + c, MUL(v_float(v_s8i(q + c)), SPLAT(s)));
    for (; c < cols; c++) store(kind, out, base + c, (float)(int8_t)q[c] * s);
  }
}

void dq_bnb_int8(const uint8_t* data, const float* scb, void* out, int64_t rows, int64_t cols, int kind) {
#define CALL(k) bnb_int8_k(k, data, scb, out, rows, cols)
  BY_KIND(kind, CALL)
#undef CALL
}

/* ---- quanto: packed 2/4-bit groups ---------------------------------------------------------------------
   The weight viewed as [group_rows, group]; bit field f of packed row p is grouped row p + f * packed_rows.
   w = round(round(scale * q) - shift) (float shift) or round(scale * (q - shift)) (integer shift, int8). */

INLINE void quanto_bits_k(const int kind, const uint8_t* packed, const void* scale, const void* shift,
                          int int_shift, int bits, int64_t packed_rows, int64_t group_rows, int64_t group,
                          void* out) {
  const int per_byte = 8 / bits;
  const int mask = (1 << bits) - 1;
  for (int f = 0; f < per_byte; f++) {
    const int at = bits * f;
    for (int64_t p = 0; p < packed_rows; p++) {
      const int64_t r = p + f * packed_rows;
      if (r >= group_rows) break;
      const float s = load(kind, scale, r);
      const uint8_t* src = packed + p * group;
      const int64_t base = r * group;
      const float sh = int_shift ? 0.0f : load(kind, shift, r);
      int64_t c = 0;
      if (int_shift) { /* q - shift in int8, wrapping as the reference's int8 subtraction does */
        const int32_t ish = ((const int8_t*)shift)[r];
        for (; c + W <= group; c += W) {
          vi q = v_and(_mm512_srli_epi32(v_u8i(src + c), (unsigned)at), mask);
          vi d = _mm512_sub_epi32(v_and(_mm512_add_epi32(_mm512_sub_epi32(q, v_set(ish)), v_set(128)), 255), v_set(128));
          v_store(kind, out, base + c, MUL(SPLAT(s), v_float(d)));
        }
        for (; c < group; c++) store(kind, out, base + c, s * (float)(((((src[c] >> at) & mask) - ish + 128) & 255) - 128));
      } else {
        for (; c + W <= group; c += W)
          v_store(kind, out, base + c, SUB(v_rnd(kind, MUL(SPLAT(s), v_field(src + c, at, mask))), SPLAT(sh)));
        for (; c < group; c++) store(kind, out, base + c, rnd(kind, s * (float)((src[c] >> at) & mask)) - sh);
      }
    }
  }
}

void dq_quanto_bits(const uint8_t* packed, const void* scale, const void* shift, int int_shift, int bits,
                    int64_t packed_rows, int64_t group_rows, int64_t group, void* out, int kind) {
#define CALL(k) quanto_bits_k(k, packed, scale, shift, int_shift, bits, packed_rows, group_rows, group, out)
  BY_KIND(kind, CALL)
#undef CALL
}

/* ---- NNCF: w = round_f16((q - zero) * scale) per row and group, then the output dtype ------------------
   q: int8 rows (signed, symmetric), uint8 rows (asymmetric, one zero a row) or nibbles over the flattened
   weight (element 2k in the low nibble; symmetric ones stored offset by 8, asymmetric zeros packed the
   same way one a group). scale: float16 bits [rows, groups]. (q - zero) is a small integer and its product
   with a float16 scale fits float32's significand, so rounding it to float16 once is the float16 multiply. */

INLINE void nncf_k(const int kind, const void* weight, const uint16_t* scale, const uint8_t* zero, int bits,
                   int is_signed, int64_t rows, int64_t cols, int64_t groups, void* out) {
  const int64_t width = cols / groups;
  for (int64_t r = 0; r < rows; r++) {
    for (int64_t g = 0; g < groups; g++) {
      const float s = half_to_float(scale[r * groups + g]);
      const int64_t first = r * cols + g * width;
      float z;
      if (bits == 8) {
        z = zero ? (float)zero[r] : 0.0f;
      } else if (zero) {
        const int64_t zi = r * groups + g;
        z = (float)((zero[zi >> 1] >> ((zi & 1) * 4)) & 15);
      } else {
        z = 8.0f;
      }
      const vf vs = SPLAT(s), vz = SPLAT(z);
      int64_t c = 0;
      if (bits == 8) {
        const uint8_t* q = (const uint8_t*)weight + first;
        if (is_signed) {
          for (; c + W <= width; c += W)
            v_store(kind, out, first + c, v_rnd(F16, MUL(SUB(v_float(v_s8i(q + c)), vz), vs)));
          for (; c < width; c++) store(kind, out, first + c, rnd(F16, ((float)(int8_t)q[c] - z) * s));
        } else {
          for (; c + W <= width; c += W)
            v_store(kind, out, first + c, v_rnd(F16, MUL(SUB(v_float(v_u8i(q + c)), vz), vs)));
          for (; c < width; c++) store(kind, out, first + c, rnd(F16, ((float)q[c] - z) * s));
        }
        continue;
      }
      const uint8_t* q = (const uint8_t*)weight;
      if (!(first & 1)) /* the group starts on a whole byte */
        for (; c + W <= width; c += W)
          v_store(kind, out, first + c, v_rnd(F16, MUL(SUB(v_nibbles(q + ((first + c) >> 1)), vz), vs)));
      for (; c < width; c++) {
        const int64_t i = first + c;
        store(kind, out, i, rnd(F16, ((float)((q[i >> 1] >> ((i & 1) * 4)) & 15) - z) * s));
      }
    }
  }
}

void dq_nncf(const void* weight, const uint16_t* scale, const uint8_t* zero, int bits, int is_signed,
             int64_t rows, int64_t cols, int64_t groups, void* out, int kind) {
#define CALL(k) nncf_k(k, weight, scale, zero, bits, is_signed, rows, cols, groups, out)
  BY_KIND(kind, CALL)
#undef CALL
}

/* ---- GGUF: ggml blocks in the output dtype, as the forward's reference decodes them --------------------
   The float16 scales cast to the dtype, then one rounding per operation (kernels.ggml_blocks / k_blocks).
   type: 0 Q8_0, 1 Q4_0, 2 Q4_1, 3 Q5_0, 4 Q5_1 (32 elements a block), 10 Q4_K, 11 Q5_K, 12 Q6_K (256). */

INLINE uint16_t u16(const uint8_t* p) {
  uint16_t v;
  memcpy(&v, p, 2);
  return v;
}

INLINE void ggml32_k(const int kind, const int type, const uint8_t* b, int64_t n, int64_t size, void* out) {
  const vi lanes = _mm512_loadu_si512(LANE_INDEX);
  for (int64_t k = 0; k < n; k++) {
    const uint8_t* blk = b + k * size;
    const int64_t o = k * 32;
    const vf d = SPLAT(rnd(kind, half_to_float(u16(blk))));
    if (type == 0) {
      v_store(kind, out, o, MUL(v_float(v_s8i(blk + 2)), d));
      v_store(kind, out, o + W, MUL(v_float(v_s8i(blk + 2 + W)), d));
      continue;
    }
    /* byte e of the nibbles holds element e (low nibble) and e + 16 (high); 5-bit types keep the fifth
       bits in the little-endian uint32 before the nibbles */
    const int start = type == 1 ? 2 : type == 2 ? 4 : type == 3 ? 6 : 8;
    vi bytes = v_u8i(blk + start);
    vi lo = v_and(bytes, 15), hi = _mm512_srli_epi32(bytes, 4);
    if (type >= 3) {
      uint32_t high;
      memcpy(&high, blk + start - 4, 4);
      vi h = v_set((int32_t)high);
      lo = _mm512_or_si512(lo, _mm512_slli_epi32(v_and(_mm512_srlv_epi32(h, lanes), 1), 4));
      hi = _mm512_or_si512(hi, _mm512_slli_epi32(v_and(_mm512_srlv_epi32(h, _mm512_add_epi32(lanes, v_set(16))), 1), 4));
    }
    vf q_lo = v_float(lo), q_hi = v_float(hi);
    if (type == 1 || type == 3) {
      const vf off = SPLAT(type == 1 ? 8.0f : 16.0f);
      v_store(kind, out, o, MUL(d, SUB(q_lo, off)));
      v_store(kind, out, o + W, MUL(d, SUB(q_hi, off)));
    } else {
      const vf m = SPLAT(rnd(kind, half_to_float(u16(blk + 2))));
      v_store(kind, out, o, ADD(v_rnd(kind, MUL(d, q_lo)), m));
      v_store(kind, out, o + W, ADD(v_rnd(kind, MUL(d, q_hi)), m));
    }
  }
}

INLINE void k_quant_k(const int kind, const int type, const uint8_t* b, int64_t n, int64_t size, void* out) {
  for (int64_t k = 0; k < n; k++) {
    const uint8_t* blk = b + k * size;
    const int64_t o = k * 256;
    if (type == 12) {
      /* Q6_K: 128 bytes of low nibbles, 64 of 2-bit pairs, 16 int8 scales (one per 16), then d. Half n of
         the super-block (128 elements): byte n * 64 + 32 * odd + lane of the low nibbles holds element
         n * 128 + 32 * odd + lane (low nibble) and that + 64 (high); the pairs of byte n * 32 + lane */
      const int8_t* sc = (const int8_t*)(blk + 192);
      const float d = rnd(kind, half_to_float(u16(blk + 208)));
      for (int i = 0; i < 4; i++) {
        const int half = i >> 1, odd = i & 1;
        const int64_t e0 = half * 128 + odd * 32;
        for (int part = 0; part < 32; part += W) {
          const int64_t e = e0 + part;
          vi low = v_u8i(blk + half * 64 + odd * 32 + part);
          vi high = v_u8i(blk + 128 + half * 32 + part);
          vi q_lo = _mm512_or_si512(v_and(low, 15), _mm512_slli_epi32(v_and(_mm512_srli_epi32(high, odd * 2), 3), 4));
          vi q_hi = _mm512_or_si512(_mm512_srli_epi32(low, 4),
                                    _mm512_slli_epi32(v_and(_mm512_srli_epi32(high, odd * 2 + 4), 3), 4));
          const float d_lo = rnd(kind, d * (float)sc[e >> 4]), d_hi = rnd(kind, d * (float)sc[(e + 64) >> 4]);
          v_store(kind, out, o + e, MUL(SPLAT(d_lo), v_float(_mm512_sub_epi32(q_lo, v_set(32)))));
          v_store(kind, out, o + e + 64, MUL(SPLAT(d_hi), v_float(_mm512_sub_epi32(q_hi, v_set(32)))));
        }
      }
      continue;
    }
    /* Q4_K / Q5_K: d, dmin, 12 bytes of 6-bit scales and mins, (Q5_K: 32 bytes of fifth bits), 128 bytes
       of nibbles: byte 32 * (j / 2) + lane holds element lane of sub-block j (low nibble for even j) */
    const float d = rnd(kind, half_to_float(u16(blk)));
    const float dmin = rnd(kind, half_to_float(u16(blk + 2)));
    const uint8_t* s = blk + 4;
    const uint8_t* qs = blk + (type == 10 ? 16 : 48);
    for (int j = 0; j < 8; j++) {
      int sc, mn;
      if (j < 4) {
        sc = s[j] & 63;
        mn = s[j + 4] & 63;
      } else {
        sc = (s[j + 4] & 15) | ((s[j - 4] >> 6) << 4);
        mn = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
      }
      const vf dl = SPLAT(rnd(kind, d * (float)sc)), ml = SPLAT(rnd(kind, dmin * (float)mn));
      const int at = 4 * (j & 1);
      for (int part = 0; part < 32; part += W) {
        vi v = v_and(_mm512_srli_epi32(v_u8i(qs + (j >> 1) * 32 + part), at), 15);
        if (type == 11) v = _mm512_or_si512(v, _mm512_slli_epi32(v_and(_mm512_srli_epi32(v_u8i(blk + 16 + part), j), 1), 4));
        v_store(kind, out, o + j * 32 + part, SUB(v_rnd(kind, MUL(dl, v_float(v))), ml));
      }
    }
  }
}

void dq_ggml(int type, const uint8_t* blocks, int64_t n_blocks, int64_t type_size, void* out, int kind) {
#define T32(t, k) ggml32_k(k, t, blocks, n_blocks, type_size, out)
#define TK(t, k) k_quant_k(k, t, blocks, n_blocks, type_size, out)
#define Q80(k) T32(0, k)
#define Q40(k) T32(1, k)
#define Q41(k) T32(2, k)
#define Q50(k) T32(3, k)
#define Q51(k) T32(4, k)
#define Q4K(k) TK(10, k)
#define Q5K(k) TK(11, k)
#define Q6K(k) TK(12, k)
  switch (type) {
    case 0: BY_KIND(kind, Q80) break;
    case 1: BY_KIND(kind, Q40) break;
    case 2: BY_KIND(kind, Q41) break;
    case 3: BY_KIND(kind, Q50) break;
    case 4: BY_KIND(kind, Q51) break;
    case 10: BY_KIND(kind, Q4K) break;
    case 11: BY_KIND(kind, Q5K) break;
    case 12: BY_KIND(kind, Q6K) break;
    default: break;
  }
}

#else /* no AVX-512 here: the callers keep their torch decode */

int dq_available(void) { return 0; }

#endif
