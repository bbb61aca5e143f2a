// Shared weight decoding, prepended to kernels that read weights. Weights stay in their
// checkpoint dtype: f32 as raw bits, f16 and bf16 packed two per u32 (element i in the
// low half when i is even, as the little-endian bytes lie in the file).

const DTYPE_F32: u32 = 0u;
const DTYPE_F16: u32 = 1u;
const DTYPE_BF16: u32 = 2u;

// Which u32 word holds element i.
fn word_index(i: u32, dtype: u32) -> u32 {
  if (dtype == DTYPE_F32) {
    return i;
  }
  return i >> 1u;
}

// Element i as f32, given the word that holds it.
fn decode(word: u32, i: u32, dtype: u32) -> f32 {
  if (dtype == DTYPE_F32) {
    return bitcast<f32>(word);
  }
  let bits = (word >> ((i & 1u) * 16u)) & 0xffffu;
  if (dtype == DTYPE_F16) {
    // unpack2x16float needs no shader-f16 feature.
    return unpack2x16float(bits).x;
  }
  return bitcast<f32>(bits << 16u);
}

// Both elements of one f16/bf16 word as f32 (element 2j in .x, 2j + 1 in .y): the wide
// loads of the blocked and gemv matmuls decode whole words instead of single halves.
fn decode_pair(word: u32, dtype: u32) -> vec2f {
  if (dtype == DTYPE_F16) {
    return unpack2x16float(word);
  }
  return vec2f(bitcast<f32>(word << 16u), bitcast<f32>(word & 0xffff0000u));
}
