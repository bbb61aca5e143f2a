// The attention kernels (naive: kernels/attention.wgsl, tiled: kernels/attention_tiled.wgsl,
// and flash-decoding's split: kernels/attention_split.wgsl) against the CPU reference: odd head_dims (the tiled kernel pads rows to whole vec4s per
// lane), GQA groups that straddle the tiled kernel's blocks of query rows, qLen < kvLen
// (decode with a cache), qLen 1 (groups share a query row and are merged), sliding
// windows (tiles outside every row's window skipped), batches, key counts that are not a
// multiple of the tile and span several tiles; chunked 4 KiB bindings; the auto choice.
//
// Key counts stay small enough for the naive kernel on llvmpipe: Mesa ends any shader
// loop after 65,535 iterations per invocation (LP_MAX_TGSI_LOOP_ITERATIONS), and the
// naive kernel runs about 2 * kvLen * head_dim of them (see docs/webgpu.md).

import assert from "node:assert";
import type { AttentionShape, Backend } from "../lib/backend/backend.ts";
import { CpuBackend } from "../lib/backend/cpu.ts";
import {
  ATTENTION_KERNELS,
  attentionTiling,
  ATTN_TILED_MAX_HEAD_DIM,
  type WebGpuBackend,
} from "../lib/backend/webgpu/mod.ts";
import { relError, seededInputs, webgpuForTests } from "./webgpu_helper.ts";

const gpu = await webgpuForTests();
const ignore = gpu === null;
const cpu = new CpuBackend({ reference: true }); // the oracle: plain loops, no BLAS
const SMALL_BINDING = 4096;
// As the ops test: f32 sums of head_dim products and online-softmax rescaling against
// the CPU's double sums.
const ATTENTION_TOL = 1e-5;

const maxErrors = new Map<string, number>();
const { randn } = seededInputs(0xa77e5);

const shape = (
  batch: number,
  qLen: number,
  kvLen: number,
  heads: number,
  kvHeads: number,
  headDim: number,
  window: number | null = null,
): AttentionShape => ({ batch, qLen, kvLen, heads, kvHeads, headDim, window });

// With s.kvStride (a KV cache), k and v hold kvStride rows a sequence; the rows past
// kvLen are random, so a kernel that reads them shows. The oracle gets the kvLen rows.
async function checkAttention(be: Backend, label: string, s: AttentionShape) {
  const qw = s.heads * s.headDim, kw = s.kvHeads * s.headDim, stride = s.kvStride ?? s.kvLen;
  const qData = randn(s.batch * s.qLen * qw).map((x) => 2 * x);
  const kData = randn(s.batch * stride * kw).map((x) => 2 * x);
  const vData = randn(s.batch * stride * kw);
  const q = be.tensor(qData, [s.batch * s.qLen, qw]);
  const k = be.tensor(kData, [s.batch * stride, kw]);
  const v = be.tensor(vData, [s.batch * stride, kw]);
  const got = be.attention(q, k, v, s);
  assert.deepEqual([...got.shape], [s.batch * s.qLen, qw], `${label}: shape`);
  const used = (data: Float32Array) =>
    cpu.tensor(
      Float32Array.from({ length: s.batch * s.kvLen * kw }, (_, i) => {
        const b = Math.floor(i / (s.kvLen * kw));
        return data[b * stride * kw + i % (s.kvLen * kw)];
      }),
      [s.batch * s.kvLen, kw],
    );
  const want = cpu.attention(
    cpu.tensor(qData, [s.batch * s.qLen, qw]),
    used(kData),
    used(vData),
    { ...s, kvStride: undefined },
  );
  const err = relError(maxErrors, label, await be.read(got), await cpu.read(want));
  assert(err <= ATTENTION_TOL, `${label} ${JSON.stringify(s)}: relative error ${err}`);
  be.free(got), be.free(q), be.free(k), be.free(v);
}

const SHAPES: AttentionShape[] = [
  shape(1, 1, 1, 1, 1, 8),
  // odd head_dims, GQA 6/2 (3 heads a group: 37 queries are 111 rows, blocks of 32 rows
  // start mid-group), more keys than a tile
  shape(2, 37, 37, 6, 2, 12),
  shape(1, 37, 150, 6, 2, 20),
  shape(2, 9, 70, 6, 2, 13),
  // decode: qLen 1, so groups split the keys of a tile and are merged; 6/2 leaves 3 query
  // rows, split 4 (one idle group per query row)
  shape(3, 1, 150, 6, 2, 20),
  shape(2, 1, 97, 4, 4, 64),
  shape(2, 3, 61, 4, 1, 64),
  // sliding windows: tiles below every row's window are never loaded
  shape(2, 40, 100, 4, 2, 16, 9),
  shape(1, 17, 17, 4, 2, 16, 4),
  shape(1, 1, 120, 2, 1, 24, 7),
  shape(1, 3, 3, 2, 2, 128, 1),
  // real head_dims, kvLen not a multiple of the tile (16 keys at 128, 21 at 64)
  shape(1, 33, 100, 2, 2, 128),
  shape(1, 50, 90, 2, 1, 64),
  // the largest head_dim of the tiled kernel: tiles of 10 keys; decode tiles of 15 keys
  // split 4 ways (a tile's last keys fall past it for some groups)
  shape(1, 23, 60, 2, 1, 256),
  shape(2, 1, 60, 6, 2, 256),
  // attending a KV cache in place: kvStride rows a sequence, only the first kvLen read
  { ...shape(3, 1, 45, 6, 2, 20), kvStride: 64 },
  { ...shape(2, 5, 37, 4, 4, 64, 9), kvStride: 40 },
];

for (const kernel of ATTENTION_KERNELS) {
  Deno.test({
    name: `webgpu attention kernel "${kernel}" matches cpu: odd head_dim, GQA, decode, window`,
    ignore,
    async fn() {
      const be = gpu!.withOptions({ attentionKernel: kernel });
      for (const s of SHAPES) await checkAttention(be, `attention ${kernel}`, s);
    },
  });

  Deno.test({
    name: `webgpu attention kernel "${kernel}" with 4 KiB bindings (whole sequences) matches cpu`,
    ignore,
    async fn() {
      const be = gpu!.withOptions({ attentionKernel: kernel, maxBindingBytes: SMALL_BINDING });
      // 2,880-byte q, k and v blocks per sequence: 1 sequence a chunk, bound from
      // unaligned starts.
      const s = shape(5, 10, 30, 6, 2, 12);
      const before = be.dispatches;
      await checkAttention(be, `attention ${kernel} chunked`, s);
      assert.equal(be.dispatches - before, 5);
      // Decode: 1,792-byte k/v blocks, 2 sequences a chunk of 13 (the last one alone).
      await checkAttention(be, `attention ${kernel} chunked`, shape(13, 1, 14, 4, 2, 16, 6));
      // A cache of 30 rows a sequence (3,840-byte k/v blocks): chunks of 1 sequence.
      const cache = { ...shape(3, 1, 17, 4, 2, 16), kvStride: 30 };
      const beforeCache = be.dispatches;
      await checkAttention(be, `attention ${kernel} chunked cache`, cache);
      assert.equal(be.dispatches - beforeCache, 3);
    },
  });
}

// Flash-decoding (kernels/attention_split.wgsl): every shape above split into 256-key
// parts (one part for these), then keys spanning several parts: decode with GQA, a window,
// a cache attended in place, and several queries a sequence.
const LONG_SHAPES: AttentionShape[] = [
  shape(1, 1, 700, 4, 2, 64),
  shape(2, 1, 900, 4, 4, 32, 300),
  { ...shape(2, 1, 530, 6, 2, 20), kvStride: 600 },
  shape(1, 3, 600, 2, 1, 16),
];

Deno.test({
  name:
    "webgpu attention split (flash-decoding) matches cpu: every shape, keys over several splits",
  ignore,
  async fn() {
    const be = gpu!.withOptions({ attentionSplit: "always" });
    for (const s of [...SHAPES, ...LONG_SHAPES]) {
      const before = be.dispatches;
      await checkAttention(be, "attention split", s);
      // A partial and a merge pass; with every key in one split, the partial pass alone.
      const splits = Math.ceil(Math.min(s.kvLen, s.window ?? s.kvLen) / 256);
      assert.equal(be.dispatches - before, splits > 1 ? 2 : 1, JSON.stringify(s));
    }
  },
});

Deno.test({
  name: "webgpu attention tiled is right at head_dim 256 over 2,048 keys (8 lanes a row)",
  ignore,
  async fn() {
    // With 4 lanes (16 vec4s a thread) llvmpipe kept those loops and cut this one short.
    const tiled = gpu!.withOptions({ attentionKernel: "tiled", attentionSplit: "never" });
    await checkAttention(tiled, "attention tiled long", shape(1, 32, 2048, 1, 1, 256));
    await checkAttention(tiled, "attention tiled long", shape(1, 1, 2048, 2, 1, 200));
  },
});

Deno.test({
  name: "webgpu attention auto splits decode steps only; partials over a binding do not split",
  ignore,
  async fn() {
    // Split (2 dispatches): decode steps, and 3 queries x 2 heads a kv head (at most 8
    // rows); not split (1, as is a split of one): 80 rows a kv head (prefill).
    const auto = gpu as WebGpuBackend;
    const expected: [AttentionShape, number][] = [
      [LONG_SHAPES[0], 2],
      [LONG_SHAPES[3], 2],
      [shape(1, 40, 600, 2, 1, 16), 1],
    ];
    for (const [s, dispatches] of expected) {
      const before = auto.dispatches;
      await checkAttention(auto, "attention auto", s);
      assert.equal(auto.dispatches - before, dispatches, JSON.stringify(s));
    }
    // A forced kernel is never split.
    const tiled = auto.withOptions({ attentionKernel: "tiled" }), before = tiled.dispatches;
    await checkAttention(tiled, "attention tiled", LONG_SHAPES[0]);
    assert.equal(tiled.dispatches - before, 1);
    // 4 KiB bindings: sequences of 600 one-float keys (2,400 bytes) go one a chunk, each
    // split in 3; 100 queries x 4 heads x 3 splits x 3 floats of partials (14,400 bytes)
    // do not fit a binding, so that shape runs unsplit.
    const chunked = auto.withOptions({ attentionSplit: "always", maxBindingBytes: SMALL_BINDING });
    const b0 = chunked.dispatches;
    await checkAttention(chunked, "attention split chunked", shape(3, 1, 600, 1, 1, 1));
    assert.equal(chunked.dispatches - b0, 3 * 2);
    const b1 = chunked.dispatches;
    await checkAttention(chunked, "attention split chunked", shape(1, 100, 600, 4, 1, 1));
    assert.equal(chunked.dispatches - b1, 1);
  },
});

Deno.test({
  name: "webgpu attention auto: tiled up to head_dim 256, naive above; bad kernels are errors",
  ignore,
  async fn() {
    const auto = gpu as WebGpuBackend;
    assert.equal(auto.attentionKernel, "auto"); // the default
    assert.equal(auto.attentionKernelFor(shape(1, 1, 9, 2, 2, 64)), "tiled");
    assert.equal(auto.attentionKernelFor(shape(1, 9, 9, 2, 2, ATTN_TILED_MAX_HEAD_DIM)), "tiled");
    assert.equal(auto.attentionKernelFor(shape(1, 9, 9, 2, 2, 264)), "naive");
    await checkAttention(auto, "attention auto", shape(1, 5, 20, 2, 1, 264));
    // A forced kernel is kept by withMaxBindingBytes.
    const naive = auto.withOptions({ attentionKernel: "naive" });
    assert.equal(
      naive.withMaxBindingBytes(SMALL_BINDING).attentionKernelFor(shape(1, 1, 9, 2, 2, 64)),
      "naive",
    );
    assert.throws(
      () => auto.withOptions({ attentionKernel: "flash" as "auto" }),
      /unknown attention kernel/,
    );
    const tiled = auto.withOptions({ attentionKernel: "tiled" });
    const s = shape(1, 2, 2, 1, 1, 264);
    const x = tiled.tensor(new Float32Array(2 * 264), [2, 264]);
    assert.throws(() => tiled.attention(x, x, x, s), /tiled kernel takes head_dim up to 256/);
    tiled.free(x);
  },
});

Deno.test("attentionTiling keeps the tiled kernel's workgroup memory within 16 KiB", () => {
  for (let headDim = 1; headDim <= ATTN_TILED_MAX_HEAD_DIM; headDim++) {
    for (const [qLen, heads, kvHeads] of [[1, 1, 1], [1, 6, 2], [3, 4, 4], [64, 8, 2]]) {
      const { lanes, split, keys, blocks } = attentionTiling(
        shape(1, qLen, 64, heads, kvHeads, headDim),
      );
      // 4 lanes a row, 8 past 128: a lane holds at most 8 vec4s of it
      assert.equal(lanes, headDim > 128 ? 8 : 4);
      assert(Math.ceil(headDim / (4 * lanes)) <= 8, `head_dim ${headDim}: ${lanes} lanes`);
      const groups = 64 / lanes, blockRows = 2 * groups;
      const rowFloats = Math.ceil(headDim / (4 * lanes)) * 4 * lanes; // whole vec4s a lane
      const tile = Math.max(keys, split > 1 ? groups / 2 : 0) * rowFloats; // and merge buffer
      const partials = 64 * 2 * Math.ceil(keys / split); // threads x rows x keys per group
      assert(keys >= 1 && (tile + partials) * 4 <= 16384, `head_dim ${headDim}: ${keys} keys`);
      const rows = qLen * (heads / kvHeads);
      assert(split >= 1 && split <= groups && (split === 1 || blockRows / split >= rows));
      assert.equal(blocks, Math.ceil(rows / (blockRows / split)));
    }
  }
  // Decode (one query row): every group takes a sixteenth of each tile.
  assert.equal(attentionTiling(shape(1, 1, 1024, 16, 16, 128)).split, 16);
  assert.equal(attentionTiling(shape(1, 512, 512, 16, 16, 128)).split, 1);
});

Deno.test({
  name: "webgpu attention kernels worst errors (report)",
  ignore,
  fn() {
    for (const [op, err] of [...maxErrors].sort()) console.log(`  ${op}: ${err.toExponential(2)}`);
  },
});
