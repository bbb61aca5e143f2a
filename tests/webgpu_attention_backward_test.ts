// The attention backward kernels (naive: kernels/attention_backward.wgsl, tiled:
// kernels/attention_backward_tiled.wgsl) against the CPU reference's dq, dk and dv:
// odd head_dims (rows padded to whole vec4s per lane; 8 lanes past 128), GQA 6/2 (blocks
// of 32 (query, head) rows start mid-group), qLen < kvLen, qLen 1, sliding windows
// (including keys no query sees), batches, key and query counts that are not a multiple
// of a tile or a block, chunked 4 KiB bindings, the auto choice; and, for the tiled
// kernel, long sequences.
//
// The naive kernel's shapes stay under llvmpipe's loop cap (Mesa ends a shader
// invocation's loops after 65,535 iterations, LP_MAX_TGSI_LOOP_ITERATIONS): its query
// pass runs about 5 * keys * head_dim of them. The long shapes are where it is wrong on
// llvmpipe and the tiled kernel must not be (see docs/webgpu.md).

import assert from "node:assert";
import type { AttentionShape } from "../lib/backend/backend.ts";
import { CpuBackend } from "../lib/backend/cpu.ts";
import {
  ATTENTION_KERNELS,
  attentionBackwardTiling,
  ATTN_TILED_MAX_HEAD_DIM,
  type WebGpuBackend,
} from "../lib/backend/webgpu/mod.ts";
import { relError, seededInputs, webgpuForTests } from "./webgpu_helper.ts";

const gpu = await webgpuForTests();
const ignore = gpu === null;
const cpu = new CpuBackend({ reference: true }); // the oracle: plain loops, no BLAS
const SMALL_BINDING = 4096;
// As webgpu_backward_test.ts: f32 sums against the CPU's (partly double) sums. Observed:
// up to about 6e-7, 2.3e-6 on the long shapes.
const SUM_TOL = 1e-5;

const maxErrors = new Map<string, number>();
const { randn } = seededInputs(0xba5e);

const shape = (
  batch: number,
  qLen: number,
  kvLen: number,
  heads: number,
  kvHeads: number,
  headDim: number,
  window: number | null = null,
): AttentionShape => ({ batch, qLen, kvLen, heads, kvHeads, headDim, window });

/**
 * `saved`: the forward first (attentionSaving), its logsumexp and output passed to the
 * backward, as training does; the tiled kernel then skips its statistics walk.
 */
async function checkBackward(
  be: WebGpuBackend,
  label: string,
  s: AttentionShape,
  saved = false,
) {
  const qShape = [s.batch * s.qLen, s.heads * s.headDim];
  const kvShape = [s.batch * s.kvLen, s.kvHeads * s.headDim];
  const shapes = [qShape, kvShape, kvShape, qShape];
  // q and k scaled up so the softmax is far from uniform.
  const data = [
    randn(qShape[0] * qShape[1], 2),
    randn(kvShape[0] * kvShape[1], 2),
    randn(kvShape[0] * kvShape[1]),
    randn(qShape[0] * qShape[1]),
  ];
  const [q, k, v, dOut] = data.map((d, i) => be.tensor(d, shapes[i]));
  const [cq, ck, cv, cdOut] = data.map((d, i) => cpu.tensor(d, shapes[i]));
  const forward = saved ? be.attentionSaving(q, k, v, s) : undefined;
  if (forward && be.attentionKernelFor(s) === "naive") {
    assert.equal(forward.stats, null, `${label}: the naive kernel saves nothing`);
  }
  if (forward && be.attentionKernelFor(s) === "tiled") {
    assert.notEqual(forward.stats, null, `${label}: the tiled forward saves lse`);
  }
  const got = be.attentionBackward(q, k, v, dOut, s, forward);
  const want = cpu.attentionBackward(cq, ck, cv, cdOut, s);
  for (const name of ["dq", "dk", "dv"] as const) {
    assert.deepEqual([...got[name].shape], [...want[name].shape], `${label} ${name}: shape`);
    const err = relError(
      maxErrors,
      `${label} ${name}`,
      await be.read(got[name]),
      await cpu.read(want[name]),
    );
    assert(err <= SUM_TOL, `${label} ${name} ${JSON.stringify(s)}: relative error ${err}`);
  }
  for (const x of [q, k, v, dOut, got.dq, got.dk, got.dv]) be.free(x);
  if (forward) be.free(forward.out), forward.stats && be.free(forward.stats);
}

// Few distinct head_dims: each is a pipeline to compile (seconds on llvmpipe).
const SHAPES: AttentionShape[] = [
  shape(1, 1, 1, 1, 1, 16),
  // odd head_dims; GQA 6/2: 37 queries are 111 rows of a kv head, in blocks of 32
  shape(2, 37, 37, 6, 2, 5),
  shape(1, 9, 70, 6, 2, 24),
  // qLen 1 (3 rows of a block of 32 used), batches
  shape(3, 1, 50, 6, 2, 72),
  // sliding windows: tiles below a block's window are skipped; window 1 makes dq = dk = 0
  shape(2, 40, 100, 4, 2, 96, 9),
  shape(1, 17, 17, 4, 2, 16, 4),
  shape(1, 3, 40, 2, 2, 64, 1),
  // keys 0-56 are seen by no query (window 3 over the last 4 of 64): dk = dv = 0 there
  shape(1, 4, 64, 2, 1, 16, 3),
  // real head_dims, kvLen not a multiple of a tile or of 32
  shape(1, 33, 45, 2, 1, 128),
  shape(2, 20, 20, 4, 4, 64),
  // past 128: 8 lanes a row (200 pads to 256), tiles of 8 keys and 5 query rows
  shape(1, 30, 40, 2, 2, 200),
  shape(1, 23, 40, 2, 1, 256),
];

for (const kernel of ATTENTION_KERNELS) {
  Deno.test({
    name: `webgpu attentionBackward "${kernel}" matches cpu: odd head_dim, GQA, qLen 1, window`,
    ignore,
    async fn() {
      const be = gpu!.withOptions({ attentionKernel: kernel });
      for (const s of SHAPES) await checkBackward(be, `attentionBackward ${kernel}`, s);
    },
  });

  Deno.test({
    name: `webgpu attentionBackward "${kernel}" after attentionSaving matches cpu, chunked too`,
    ignore,
    async fn() {
      const be = gpu!.withOptions({ attentionKernel: kernel });
      for (const s of SHAPES) await checkBackward(be, `attentionBackward ${kernel} saved`, s, true);
      // The saved statistics bound from unaligned offsets, a sequence a chunk.
      const chunked = gpu!.withOptions({ attentionKernel: kernel, maxBindingBytes: SMALL_BINDING });
      const label = `attentionBackward ${kernel} saved chunked`;
      await checkBackward(chunked, label, shape(5, 8, 24, 6, 2, 16), true);
      await checkBackward(chunked, label, shape(3, 7, 7, 4, 2, 24, 5), true);
      // A forward that would run split (flash-decoding saves nothing) runs unsplit to save.
      const split = gpu!.withOptions({ attentionKernel: kernel, attentionSplit: "always" });
      await checkBackward(
        split,
        `attentionBackward ${kernel} saved split`,
        shape(2, 3, 3, 4, 1, 16),
        true,
      );
    },
  });

  Deno.test({
    name: `webgpu attentionBackward "${kernel}" with 4 KiB bindings (whole sequences) matches cpu`,
    ignore,
    async fn() {
      const be = gpu!.withOptions({ attentionKernel: kernel, maxBindingBytes: SMALL_BINDING });
      // 3,072-byte q, k, v and dO blocks per sequence: 1 sequence a chunk, bound from
      // unaligned starts, 2 dispatches each.
      const before = be.dispatches;
      await checkBackward(be, `attentionBackward ${kernel} chunked`, shape(5, 8, 24, 6, 2, 16));
      assert.equal(be.dispatches - before, 10);
      // 1,792-byte k and v blocks: 2 sequences a chunk of 13 (the last one alone).
      const decode = shape(13, 1, 14, 4, 2, 16, 6);
      await checkBackward(be, `attentionBackward ${kernel} chunked`, decode);
    },
  });
}

Deno.test({
  name: "webgpu attentionBackward tiled is right on long sequences (past llvmpipe's loop cap " +
    "for naive)",
  ignore,
  async fn() {
    const be = gpu!.withOptions({ attentionKernel: "tiled" });
    for (
      const s of [
        shape(1, 512, 512, 2, 1, 64),
        shape(1, 1024, 1024, 1, 1, 64),
        shape(1, 512, 512, 1, 1, 128),
        // 256 tiles of 8 keys a walk at head_dim 256
        shape(1, 32, 2048, 1, 1, 256),
      ]
    ) {
      await checkBackward(be, "attentionBackward tiled long", s);
      // after the tiled forward (attentionSaving): the query pass walks once
      await checkBackward(be, "attentionBackward tiled long saved", s, true);
    }
  },
});

Deno.test({
  name: "webgpu attentionBackward auto: tiled up to head_dim 256, naive above",
  ignore,
  async fn() {
    const auto = gpu as WebGpuBackend;
    assert.equal(auto.attentionKernelFor(shape(1, 9, 9, 2, 2, ATTN_TILED_MAX_HEAD_DIM)), "tiled");
    assert.equal(auto.attentionKernelFor(shape(1, 9, 9, 2, 2, 264)), "naive");
    await checkBackward(auto, "attentionBackward auto", shape(1, 5, 20, 2, 1, 264));
    const tiled = auto.withOptions({ attentionKernel: "tiled" });
    const s = shape(1, 2, 2, 1, 1, 264);
    const x = tiled.tensor(new Float32Array(2 * 264), [2, 264]);
    assert.throws(
      () => tiled.attentionBackward(x, x, x, x, s),
      /tiled kernel takes head_dim up to 256/,
    );
    tiled.free(x);
  },
});

Deno.test("attentionBackwardTiling keeps the tiled backward within 16 KiB and its registers", () => {
  for (let headDim = 1; headDim <= ATTN_TILED_MAX_HEAD_DIM; headDim++) {
    for (const [qLen, kvLen, heads, kvHeads] of [[1, 9, 1, 1], [37, 37, 6, 2], [64, 300, 8, 2]]) {
      const s = shape(1, qLen, kvLen, heads, kvHeads, headDim);
      const { lanes, keys, queryRows, queryBlocks, keyBlocks } = attentionBackwardTiling(s);
      assert(lanes === 4 || lanes === 8);
      assert(Math.ceil(headDim / (4 * lanes)) <= 8, `head_dim ${headDim}: MAX_VEC4S is 8`);
      const rowFloats = Math.ceil(headDim / (4 * lanes)) * 4 * lanes; // whole vec4s per lane
      const partials = 2 * 64 * 2; // (q . k, dO . v) per thread and row, per tile row
      assert(keys >= 1 && keys <= 16, `head_dim ${headDim}: ${keys} keys a tile`);
      assert(queryRows >= 1 && queryRows <= 16, `head_dim ${headDim}: ${queryRows} rows`);
      assert((keys * (2 * rowFloats + partials)) * 4 <= 16384, `head_dim ${headDim}: query pass`);
      assert(
        (queryRows * (2 * rowFloats + 2 + partials)) * 4 <= 16384,
        `head_dim ${headDim}: key pass`,
      );
      const rowsPerBlock = (64 / lanes) * 2;
      assert.equal(queryBlocks, Math.ceil((qLen * heads / kvHeads) / rowsPerBlock));
      assert.equal(keyBlocks, Math.ceil(kvLen / rowsPerBlock));
    }
  }
  assert.equal(attentionBackwardTiling(shape(1, 1, 9, 1, 1, 128)).lanes, 4);
  assert.equal(attentionBackwardTiling(shape(1, 1, 9, 1, 1, 129)).lanes, 8);
});

Deno.test({
  name: "webgpu attention backward kernels worst errors (report)",
  ignore,
  fn() {
    for (const [op, err] of [...maxErrors].sort()) console.log(`  ${op}: ${err.toExponential(2)}`);
  },
});
