// The grouped expert path: groupedMatmul (every expert of a layer in one call) and
// combineRows (each token sums its k expert outputs) against per-expert plain loops, on
// CPU and WebGPU, with empty experts, ragged sizes, every dtype and 4 KiB bindings (one
// expert's matrix spread over several chunks); matmulSwiglu (one MLP's fused gate/up);
// bad inputs; stacks (experts', shared experts') have the layout and follow putTensor.

import assert from "node:assert";
import {
  type Backend,
  GATE_UP_RUN,
  type RouteSpec,
  type Tensor,
  type TrainingBackend,
  type WeightDType,
} from "../lib/backend/backend.ts";
import { CpuBackend, type CpuWeight } from "../lib/backend/cpu.ts";
import { WebGpuBackend } from "../lib/backend/webgpu/mod.ts";
import { toFloat32 } from "../lib/io/safetensors.ts";
import { expertName, mlpNames, sharedName } from "../lib/model/config.ts";
import { Model } from "../lib/model/model.ts";
import { writeSyntheticDeepseek } from "../lib/model/synthetic.ts";
import { DEFAULT_MODEL } from "./golden.ts";
import {
  MATMUL_TOL,
  rawWeight,
  relError as sharedRelError,
  seededInputs,
  webgpuForTests,
} from "./webgpu_helper.ts";

const gpu = await webgpuForTests();
const reference = new CpuBackend({ reference: true });
const fast = new CpuBackend();
const backends: [string, TrainingBackend][] = [["cpu", fast], ["cpu-reference", reference]];
if (gpu) backends.push(["webgpu", gpu], ["webgpu 4 KiB", gpu.withMaxBindingBytes(4096)]);
const { randn, random } = seededInputs(0x51ed);
const worst = new Map<string, number>();

/** Per-expert plain loops: the oracle for groupedMatmul. */
function groupedReference(
  x: Float32Array,
  stack: Float32Array,
  groupRows: number[],
  k: number,
  m: number,
): Float32Array {
  const out = new Float32Array(x.length / k * m);
  let r = 0;
  groupRows.forEach((n, g) => {
    for (let i = 0; i < n; i++, r++) {
      for (let c = 0; c < m; c++) {
        let s = 0;
        for (let j = 0; j < k; j++) s += x[r * k + j] * stack[(g * m + c) * k + j];
        out[r * m + c] = s;
      }
    }
  });
  return out;
}

async function readBack(be: Backend, x: Tensor) {
  return new Float32Array(await be.read(x));
}

// Cases: [rows per expert, K, M]; few rows take the GEMV tiles, many the blocked ones.
const CASES: [number[], number, number][] = [
  [[3, 0, 1, 5], 33, 17], // odd K and M, an empty expert
  [[1, 1, 1], 64, 40], // decode-like: one row each
  [[0, 150, 7, 0, 140], 64, 24], // prefill-like, blocked tiles past 128 rows
  [[20, 9], 130, 67], // K even but not a multiple of 4
  [[40, 0, 33], 33, 17], // blocked tiles with odd K and M
];

for (const [name, be] of backends) {
  Deno.test({
    name: `${name} groupedMatmul matches per-expert loops (every dtype, empty experts, ragged)`,
    async fn() {
      for (const dtype of ["F32", "BF16", "F16"] as WeightDType[]) {
        for (const [groupRows, k, m] of CASES) {
          const rows = groupRows.reduce((a, b) => a + b, 0), g = groupRows.length;
          const raw = rawWeight("stack", [g, m, k], randn(g * m * k), dtype);
          const xs = randn(rows * k);
          const stackValues = (reference.uploadWeight(raw) as CpuWeight).data;
          const want = groupedReference(xs, stackValues, groupRows, k, m);
          const x = be.tensor(xs, [rows, k]), stack = be.uploadWeight(raw);
          const y = be.groupedMatmul(x, stack, Int32Array.from(groupRows));
          assert.deepEqual([...y.shape], [rows, m]);
          const err = sharedRelError(worst, `groupedMatmul ${dtype}`, await readBack(be, y), want);
          assert(err <= MATMUL_TOL, `${name} ${dtype} ${groupRows} ${k}x${m}: error ${err}`);
          be.free(x), be.free(y), be.freeWeight(stack);
        }
      }
    },
  });

  Deno.test({
    name: `${name} combineRows sums each token's k expert outputs in order`,
    async fn() {
      for (const [tokens, k, h, yRows] of [[5, 2, 7, 10], [37, 6, 33, 222], [1, 1, 64, 3]]) {
        const base = randn(tokens * h), ys = randn(yRows * h, 2);
        const sources = Int32Array.from({ length: tokens * k }, () => Math.floor(random() * yRows));
        const scales = randn(tokens * k);
        const want = base.slice();
        for (let t = 0; t < tokens; t++) {
          for (let j = 0; j < k; j++) {
            const s = sources[t * k + j];
            for (let c = 0; c < h; c++) want[t * h + c] += scales[t * k + j] * ys[s * h + c];
          }
        }
        const out = be.tensor(base.slice(), [tokens, h]), y = be.tensor(ys, [yRows, h]);
        be.combineRows(out, y, sources, scales, k);
        const err = sharedRelError(worst, "combineRows", await readBack(be, out), want);
        assert(err <= 1e-6, `${name} combineRows ${tokens}x${k}x${h}: error ${err}`);
        be.free(out), be.free(y);
      }
    },
  });

  Deno.test({
    name: `${name} groupedMatmulBackward: each group's dy times its matrix (every dtype, ragged)`,
    async fn() {
      for (const dtype of ["F32", "BF16", "F16"] as WeightDType[]) {
        for (const [groupRows, k, m] of CASES) {
          const rows = groupRows.reduce((a, b) => a + b, 0), g = groupRows.length;
          const raw = rawWeight("stack", [g, m, k], randn(g * m * k), dtype);
          const dys = randn(rows * m);
          const stackValues = (reference.uploadWeight(raw) as CpuWeight).data;
          // dx = dy_g @ stack[g]: the forward oracle over each matrix transposed
          const transposed = new Float32Array(stackValues.length);
          for (let e = 0; e < g; e++) {
            for (let c = 0; c < m; c++) {
              for (let i = 0; i < k; i++) {
                transposed[(e * k + i) * m + c] = stackValues[(e * m + c) * k + i];
              }
            }
          }
          const want = groupedReference(dys, transposed, groupRows, m, k);
          const dy = be.tensor(dys, [rows, m]), stack = be.uploadWeight(raw);
          const dx = be.groupedMatmulBackward(dy, stack, Int32Array.from(groupRows));
          assert.deepEqual([...dx.shape], [rows, k]);
          const err = sharedRelError(
            worst,
            `groupedMatmulBackward ${dtype}`,
            await readBack(be, dx),
            want,
          );
          assert(err <= MATMUL_TOL, `${name} ${dtype} ${groupRows} ${k}x${m}: error ${err}`);
          be.free(dy), be.free(dx), be.freeWeight(stack);
        }
      }
    },
  });

  Deno.test({
    name: `${name} swigluGateUp and its backward match swiglu on the de-interleaved runs`,
    async fn() {
      for (const [rows, width] of [[1, 8], [7, 24], [65, 136]]) {
        const gu = randn(rows * 2 * width, 3), dys = randn(rows * width);
        // gate and up apart: run j of a row holds gate columns 4j.., then the up ones
        const gate = new Float32Array(rows * width), up = new Float32Array(rows * width);
        for (let i = 0; i < rows * width; i++) {
          const at = 2 * i - (i % GATE_UP_RUN);
          gate[i] = gu[at], up[i] = gu[at + GATE_UP_RUN];
        }
        const [g, u, d] = [gate, up, dys].map((v) => reference.tensor(v, [rows, width]));
        const wantY = await reference.read(reference.swiglu(g, u));
        const { dGate, dUp } = reference.swigluBackward(g, u, d);
        const [wantDGate, wantDUp] = await reference.readAll([dGate, dUp]);
        const x = be.tensor(gu, [rows, 2 * width]), dy = be.tensor(dys, [rows, width]);
        const y = be.swigluGateUp(x), dx = be.swigluGateUpBackward(x, dy);
        assert.deepEqual([...y.shape], [rows, width]);
        assert.deepEqual([...dx.shape], [rows, 2 * width]);
        const got = await readBack(be, dx);
        const gotDGate = new Float32Array(rows * width), gotDUp = new Float32Array(rows * width);
        for (let i = 0; i < rows * width; i++) {
          const at = 2 * i - (i % GATE_UP_RUN);
          gotDGate[i] = got[at], gotDUp[i] = got[at + GATE_UP_RUN];
        }
        const checks: [string, Float32Array, Float32Array][] = [
          ["swigluGateUp", await readBack(be, y), wantY],
          ["swigluGateUpBackward dGate", gotDGate, wantDGate],
          ["swigluGateUpBackward dUp", gotDUp, wantDUp],
        ];
        for (const [op, gotValues, want] of checks) {
          const err = sharedRelError(worst, op, gotValues, want);
          assert(err <= 1e-6, `${name} ${op} ${rows}x${width}: error ${err}`);
        }
        be.free(x), be.free(dy), be.free(y), be.free(dx);
      }
    },
  });

  Deno.test({
    name: `${name} groupedMatmul and combineRows reject inconsistent inputs`,
    fn() {
      const stack = be.uploadWeight(rawWeight("s", [2, 3, 4], randn(24), "F32"));
      const x = be.tensor(randn(5 * 4), [5, 4]);
      assert.throws(() => be.groupedMatmul(x, stack, Int32Array.of(2, 2)), /2 groups of 4 rows/);
      assert.throws(() => be.groupedMatmul(x, stack, Int32Array.of(5)), /1 groups of 5 rows/);
      assert.throws(() => be.groupedMatmul(x, stack, Int32Array.of(6, -1)), /negative/);
      const flat = be.uploadWeight(rawWeight("w", [3, 4], randn(12), "F32"));
      assert.throws(() => be.groupedMatmul(x, flat, Int32Array.of(5)), /"w" is \[3,4\]/);
      assert.throws(
        () => be.groupedMatmulBackward(x, stack, Int32Array.of(2, 3)),
        /groupedMatmulBackward: dy has 4 columns but "s" is \[2,3,4\]/,
      );
      const dy = be.tensor(randn(5 * 3), [5, 3]);
      assert.throws(() => be.groupedMatmulBackward(dy, stack, Int32Array.of(5)), /1 groups/);
      assert.throws(() => be.swigluGateUp(dy), /swigluGateUp: \[5,3\] is not rows of whole/);
      const gu = be.tensor(randn(2 * 8), [2, 8]);
      assert.throws(() => be.swigluGateUpBackward(gu, dy), /dy \[5,3\] != \[2, 4\]/);
      be.free(dy), be.free(gu);
      const out = be.tensor(new Float32Array(2 * 4), [2, 4]);
      assert.throws(
        () => be.combineRows(out, x, Int32Array.of(0, 5), Float32Array.of(1, 1), 1),
        /source row 5 out of \[0, 5\)/,
      );
      assert.throws(
        () => be.combineRows(out, x, Int32Array.of(0), Float32Array.of(1), 1),
        /1 sources, 1 scales for 2 rows x 1/,
      );
      be.free(x), be.free(out), be.freeWeight(stack), be.freeWeight(flat);
    },
  });
}

/**
 * The oracle for routedExperts: CPU reference routing, then for each token its experts in
 * ascending id, each a plain-loop SwiGLU MLP, added to `base` with the routing weights.
 */
async function routedReference(
  xs: Float32Array,
  logits: Float32Array,
  stacks: Float32Array[],
  dims: { n: number; e: number; h: number; width: number },
  route: RouteSpec,
  base: Float32Array,
): Promise<Float32Array> {
  const { n, e, h, width } = dims;
  const routing = await reference.routeTopK(
    reference.tensor(logits, [n, e]),
    route.k,
    route.normalize,
    route.eps,
  );
  const [gate, up, down] = stacks, out = base.slice();
  for (let t = 0; t < n; t++) {
    const picks = [...routing.indices.subarray(t * route.k, (t + 1) * route.k)]
      .map((ex, j) => ({ ex, weight: routing.weights[t * route.k + j] }))
      .sort((a, b) => a.ex - b.ex);
    for (const { ex, weight } of picks) {
      const act = new Float32Array(width);
      for (let c = 0; c < width; c++) {
        let g = 0, u = 0;
        for (let j = 0; j < h; j++) {
          g += xs[t * h + j] * gate[(ex * width + c) * h + j];
          u += xs[t * h + j] * up[(ex * width + c) * h + j];
        }
        act[c] = (g / (1 + Math.exp(-g))) * u;
      }
      for (let c = 0; c < h; c++) {
        let y = 0;
        for (let j = 0; j < width; j++) y += act[j] * down[(ex * h + c) * width + j];
        out[t * h + c] += weight * y;
      }
    }
  }
  return out;
}

/**
 * The ExpertStacks layout, built here independently of Model.expertStack: per expert,
 * gate and up rows interleaved in runs of GATE_UP_RUN, the width padded to whole runs
 * with zero rows (gateUp) and zero columns (down).
 */
function expertStackValues(
  gate: Float32Array,
  up: Float32Array,
  down: Float32Array,
  e: number,
  h: number,
  width: number,
) {
  const padded = Math.ceil(width / GATE_UP_RUN) * GATE_UP_RUN;
  const gateUp = new Float32Array(e * 2 * padded * h),
    downPadded = new Float32Array(e * h * padded);
  for (let ex = 0; ex < e; ex++) {
    for (let c = 0; c < width; c++) {
      const run = Math.floor(c / GATE_UP_RUN), j = c % GATE_UP_RUN;
      for (const [part, src] of [[0, gate], [1, up]] as const) {
        const row = ex * 2 * padded + (2 * run + part) * GATE_UP_RUN + j;
        gateUp.set(src.subarray((ex * width + c) * h, (ex * width + c + 1) * h), row * h);
      }
    }
    for (let r = 0; r < h; r++) {
      const row = down.subarray((ex * h + r) * width, (ex * h + r + 1) * width);
      downPadded.set(row, (ex * h + r) * padded);
    }
  }
  return { gateUp, down: downPadded, padded };
}

// [tokens, experts, k, hidden, width]: decode (gemv tiles), a few tokens, every expert
// taken, prefill past one 128-row blocked tile, odd sizes throughout. With 4 KiB bindings
// the last two keep x in one binding (the gate|up matmul reads it through the plan's
// order) while their grouped rows are bound in several ranges, gemv and blocked tiles.
// [tokens, experts, k, hidden, width, skew]: skew is added to the first k experts' logits,
// so every token picks them: groups of all n rows where WebGPU sizes its tiles for 2 n k / E.
const ROUTED_CASES: [number, number, number, number, number, number?][] = [
  [1, 8, 2, 32, 24],
  [5, 7, 2, 33, 17],
  [3, 3, 3, 20, 9],
  [37, 64, 6, 33, 20],
  [300, 3, 2, 16, 12],
  [12, 5, 4, 20, 28],
  [40, 6, 4, 8, 12],
  [48, 32, 2, 24, 16, 20],
  // past plan_experts' 16,384 pairs: WebGPU plans in chunks of 256 tokens (plan_count,
  // plan_scan, plan_place). Not with 4 KiB bindings, which bind a plan's row lists whole.
  [4200, 12, 4, 8, 8],
];

const routedOutputs = new Map<string, Float32Array>();
for (const [name, be] of backends) {
  Deno.test({
    name: `${name} routedExperts matches routing + per-token plain loops`,
    async fn() {
      for (const [n, e, k, h, width, skew] of ROUTED_CASES) {
        if (name === "webgpu 4 KiB" && n * k * 4 > 4096) continue;
        for (const [dtype, normalize] of [["BF16", true], ["F32", false]] as const) {
          // The same inputs on every backend, so the WebGPU variants can be compared.
          const { randn } = seededInputs(n * 1000 + e);
          const route = { k, normalize, eps: 1e-20 };
          const values = [randn(e * width * h), randn(e * width * h), randn(e * h * width)];
          const raws = [
            rawWeight("gate", [e, width, h], values[0], dtype),
            rawWeight("up", [e, width, h], values[1], dtype),
            rawWeight("down", [e, h, width], values[2], dtype),
          ];
          const xs = randn(n * h), logits = randn(n * e, 3), base = randn(n * h);
          for (let t = 0; skew && t < n; t++) for (let j = 0; j < k; j++) logits[t * e + j] += skew;
          const stackValues = raws.map((raw) => (reference.uploadWeight(raw) as CpuWeight).data);
          const layout = expertStackValues(values[0], values[1], values[2], e, h, width);
          const want = await routedReference(
            xs,
            logits,
            stackValues,
            { n, e, h, width },
            route,
            base,
          );
          const stacks = {
            gateUp: be.uploadWeight(
              rawWeight("gateUp", [e, 2 * layout.padded, h], layout.gateUp, dtype),
            ),
            down: be.uploadWeight(rawWeight("down", [e, h, layout.padded], layout.down, dtype)),
          };
          const x = be.tensor(xs, [n, h]), lg = be.tensor(logits, [n, e]);
          const out = be.tensor(base.slice(), [n, h]);
          const submits = be instanceof WebGpuBackend ? be.submits : 0;
          await be.routedExperts(x, lg, stacks, route, out);
          if (name === "webgpu") {
            // The plan on the device whatever the batch: routedExperts waited on nothing.
            assert.equal((be as WebGpuBackend).submits, submits, `${name} ${n}x${e}: a read`);
          }
          const got = await readBack(be, out);
          const label = `${n}x${e} k${k} ${h}/${width} ${dtype}`;
          const err = sharedRelError(worst, `routedExperts ${dtype}`, got, want);
          assert(err <= MATMUL_TOL, `${name} routedExperts ${label}: error ${err}`);
          // WebGPU groups on the device, or on the host where the routing is over the
          // binding limit; chunked or not, the same kernels do the same sums.
          if (name.startsWith("webgpu")) {
            const other = routedOutputs.get(label);
            if (other) {
              assert.deepEqual(got, other, `${name} ${label}: differs from the other webgpu`);
            }
            routedOutputs.set(label, got);
          }
          be.free(x), be.free(lg), be.free(out);
          Object.values(stacks).forEach((wt) => be.freeWeight(wt));
        }
      }
    },
  });

  Deno.test({
    name: `${name} matmulSwiglu over an interleaved gate/up stack equals matmul, matmul, swiglu`,
    async fn() {
      // [rows, K, width]: decode (gemv), a few rows, blocked tiles past 128 rows; widths
      // padded to whole runs (17, 9) and wider than one 128-column tile.
      const cases = [[1, 32, 24], [5, 33, 17], [300, 16, 9], [40, 20, 150]];
      for (const [n, k, width] of cases) {
        for (const dtype of ["BF16", "F32"] as const) {
          const gate = randn(width * k), up = randn(width * k), xs = randn(n * k);
          const layout = expertStackValues(gate, up, new Float32Array(k * width), 1, k, width);
          const raw = rawWeight("gateUp", [2 * layout.padded, k], layout.gateUp, dtype);
          const w = be.uploadWeight(raw), x = be.tensor(xs, [n, k]);
          const got = await readBack(be, be.matmulSwiglu(x, w));
          // The oracle: plain loops over the decoded (rounded) gate and up rows.
          const decoded = (reference.uploadWeight(raw) as CpuWeight).data;
          const want = new Float32Array(n * layout.padded);
          for (let r = 0; r < n; r++) {
            for (let c = 0; c < width; c++) {
              const run = Math.floor(c / GATE_UP_RUN), j = c % GATE_UP_RUN;
              const gateRow = 2 * run * GATE_UP_RUN + j, upRow = gateRow + GATE_UP_RUN;
              let g = 0, u = 0;
              for (let i = 0; i < k; i++) {
                g += xs[r * k + i] * decoded[gateRow * k + i];
                u += xs[r * k + i] * decoded[upRow * k + i];
              }
              want[r * layout.padded + c] = g / (1 + Math.exp(-g)) * u;
            }
          }
          const err = sharedRelError(worst, `matmulSwiglu ${dtype}`, got, want);
          assert(err <= MATMUL_TOL, `${name} matmulSwiglu ${n}x${k}x${width} ${dtype}: ${err}`);
          for (let r = 0; r < n; r++) {
            for (let c = width; c < layout.padded; c++) assert.equal(got[r * layout.padded + c], 0);
          }
          be.free(x), be.freeWeight(w);
        }
      }
      const x = be.tensor(randn(2 * 4), [2, 4]);
      const weight = (shape: number[]) =>
        be.uploadWeight(rawWeight("w", shape, randn(shape.reduce((a, b) => a * b)), "F32"));
      for (const shape of [[12, 4], [16, 5], [1, 16, 4]]) {
        assert.throws(() => be.matmulSwiglu(x, weight(shape)), /not \[2W, 4\] of whole gate\/up/);
      }
      be.free(x);
    },
  });

  Deno.test({
    name: `${name} routedExperts rejects stacks that do not fit the logits`,
    async fn() {
      const stack = (name: string, shape: number[]) =>
        be.uploadWeight(rawWeight(name, shape, randn(shape[0] * shape[1] * shape[2]), "F32"));
      const x = be.tensor(randn(2 * 4), [2, 4]), lg = be.tensor(randn(2 * 2), [2, 2]);
      const out = be.tensor(new Float32Array(2 * 4), [2, 4]);
      const good = { gateUp: stack("gateUp", [2, 8, 4]), down: stack("down", [2, 4, 4]) };
      const route = { k: 1, normalize: false, eps: 0 };
      const bad = stack("bad down", [2, 4, 5]), odd = stack("odd", [2, 6, 4]);
      await assert.rejects(
        () => be.routedExperts(x, lg, { ...good, down: bad }, route, out),
        /expert width 5 is not a multiple of 4/,
      );
      await assert.rejects(
        () => be.routedExperts(x, lg, { ...good, gateUp: odd }, route, out),
        /"odd" is \[2,6,4\], want \[2,8,4\]/,
      );
      await assert.rejects(
        () => be.routedExperts(x, lg, good, { ...route, k: 3 }, out),
        /k = 3 with 2 experts/,
      );
      const wide = be.tensor(randn(3 * 2), [3, 2]);
      await assert.rejects(() => be.routedExperts(x, wide, good, route, out), /disagree/);
      [x, lg, out, wide].forEach((tn) => be.free(tn));
      [...Object.values(good), bad, odd].forEach((wt) => be.freeWeight(wt));
    },
  });
}

Deno.test({
  name: "webgpu matmulSwiglu with a forced naive or tiled matmul kernel runs blocked",
  ignore: gpu === null,
  async fn() {
    const n = 20, k = 16, width = 8;
    const x = randn(n * k), gateUp = randn(2 * width * k);
    const raw = rawWeight("gateUp", [2 * width, k], gateUp, "F32");
    const want = await readBack(
      fast,
      fast.matmulSwiglu(fast.tensor(x, [n, k]), fast.uploadWeight(raw)),
    );
    for (const kernel of ["naive", "tiled"] as const) {
      const be = gpu!.withOptions({ matmulKernel: kernel });
      const got = await readBack(be, be.matmulSwiglu(be.tensor(x, [n, k]), be.uploadWeight(raw)));
      assert(sharedRelError(worst, "matmulSwiglu F32", got, want) <= MATMUL_TOL, kernel);
    }
  },
});

// The shipped model, and a generated one whose expert width (10) needs padding.
const oddWidthModel = await Deno.makeTempDir({ prefix: "odd-width-moe-" });
globalThis.addEventListener("unload", () => Deno.removeSync(oddWidthModel, { recursive: true }));
await writeSyntheticDeepseek(oddWidthModel, {
  vocab_size: 64,
  hidden_size: 12,
  intermediate_size: 16,
  moe_intermediate_size: 10,
  num_hidden_layers: 2,
  num_attention_heads: 2,
  num_key_value_heads: 2,
  n_routed_experts: 4,
  n_shared_experts: 1,
  num_experts_per_tok: 2,
  first_k_dense_replace: 1,
  max_position_embeddings: 64,
});
for (const [label, dir] of [["default model", DEFAULT_MODEL], ["width 10", oddWidthModel]]) {
  Deno.test(`${label}: expert stacks have the ExpertStacks layout and follow putTensor`, async () => {
    const model = await Model.load(dir, reference);
    try {
      const l = model.spec.layers.findIndex((layer) => layer.mlp.kind === "moe");
      const mlp = model.spec.layers[l].mlp;
      assert(mlp.kind === "moe");
      const e = mlp.experts, width = mlp.expertWidth, h = model.spec.hidden;
      const experts = async (part: "gate" | "up" | "down") => {
        const all = await Promise.all(
          Array.from(
            { length: e },
            (_, ex) => model.rawTensor(expertName(model.spec, l, ex, part)),
          ),
        );
        const out = new Float32Array(e * width * h);
        all.forEach((raw, ex) => out.set(toFloat32(raw), ex * width * h));
        return out;
      };
      const want = expertStackValues(
        await experts("gate"),
        await experts("up"),
        await experts("down"),
        e,
        h,
        width,
      );
      const stack = (await model.expertStack(l, "gate_up", e)) as CpuWeight;
      assert.deepEqual(stack.data, want.gateUp);
      // The CPU holds weights as f32, so its stacks are built in f32 (no 16-bit stack first).
      assert.equal(stack.dtype, "F32");
      // The shared experts as one MLP: the same layout, one matrix, 2-D.
      const shared = mlpNames((p) => sharedName(model.spec, l, p));
      const sharedRaw = await Promise.all(
        [shared.gate, shared.up, shared.down].map(async (n) => toFloat32(await model.rawTensor(n))),
      );
      const sharedWidth = mlp.sharedWidth;
      const sharedWant = expertStackValues(
        ...sharedRaw as [Float32Array, Float32Array, Float32Array],
        1,
        h,
        sharedWidth,
      );
      const sharedGateUp = (await model.mlpStack(shared, "gate_up")) as CpuWeight;
      assert.deepEqual(sharedGateUp.shape, [2 * sharedWant.padded, h]);
      assert.deepEqual(sharedGateUp.data, sharedWant.gateUp);
      const sharedDown = (await model.mlpStack(shared, "down")) as CpuWeight;
      assert.deepEqual(sharedDown.shape, [h, sharedWant.padded]);
      assert.deepEqual(sharedDown.data, sharedWant.down);
      assert.deepEqual(((await model.expertStack(l, "down", e)) as CpuWeight).data, want.down);
      // Gate and up alone (compressed experts): each expert's matrix, then zero padding rows.
      for (const part of ["gate", "up"] as const) {
        const alone = (await model.expertStack(l, part, e)) as CpuWeight;
        assert.deepEqual(alone.shape, [e, want.padded, h]);
        const members = await experts(part), padded = new Float32Array(e * want.padded * h);
        for (let ex = 0; ex < e; ex++) {
          padded.set(members.subarray(ex * width * h, (ex + 1) * width * h), ex * want.padded * h);
        }
        assert.deepEqual(alone.data, padded);
      }
      // Zero expert 1's up matrix: its up runs in the new stack are zero, the rest as before.
      const raw = await model.rawTensor(expertName(model.spec, l, 1, "up"));
      model.putTensor({ ...raw, bytes: new Uint8Array(raw.bytes.length) });
      const after = (await model.expertStack(l, "gate_up", e)) as CpuWeight;
      assert.notEqual(after, stack);
      const upRows = (row: number) => Math.floor(row / GATE_UP_RUN) % 2 === 1;
      for (let row = 0; row < e * 2 * want.padded; row++) {
        const values = after.data.subarray(row * h, (row + 1) * h);
        const expert1 = Math.floor(row / (2 * want.padded)) === 1;
        if (expert1 && upRows(row)) assert(values.every((v) => v === 0), `row ${row} is zero`);
        else assert.deepEqual(values, stack.data.subarray(row * h, (row + 1) * h));
      }
      // An expert of another shape cannot join the stack: the error names it.
      const down = expertName(model.spec, l, 2, "down");
      const rawDown = await model.rawTensor(down);
      model.putTensor({ ...rawDown, shape: [rawDown.shape[1], rawDown.shape[0]] });
      await assert.rejects(
        () => model.expertStack(l, "down", mlp.experts),
        new RegExp(
          `"${down.replaceAll(".", "\\.")}" is .* \\[${rawDown.shape[1]},${rawDown.shape[0]}\\]`,
        ),
      );
      // Nor one of another dtype, though the CPU would hold both as f32.
      const gate = expertName(model.spec, l, 2, "gate");
      const rawGate = await model.rawTensor(gate);
      const f32Gate = new Uint8Array(toFloat32(rawGate).buffer);
      model.putTensor({ ...rawGate, dtype: "F32", bytes: f32Gate });
      await assert.rejects(
        () => model.expertStack(l, "gate_up", mlp.experts),
        new RegExp(`"${gate.replaceAll(".", "\\.")}" is F32 .* unlike .* ${rawGate.dtype}`),
      );
    } finally {
      model.close();
    }
  });
}

Deno.test("grouped experts worst errors (report)", () => {
  for (const [op, err] of [...worst].sort()) console.log(`  ${op}: ${err.toExponential(2)}`);
});
