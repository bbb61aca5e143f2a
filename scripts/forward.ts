// The stable contract for parity checks: token ids in, logits out.
//   deno task forward --model DIR --input IN.safetensors --out OUT.safetensors [--backend cpu|webgpu]
// IN holds `input_ids` (int32 [batch, seq]); OUT gets `logits` (f32 [batch, seq, vocab]),
// and with --all also `hidden_states_{i}` and `router_logits_{l}` in the golden layout.

import { createBackend, parseCli, runMain, UsageError } from "../lib/cli.ts";
import {
  f32Tensor,
  i32Tensor,
  type RawTensor,
  SafetensorsFile,
  toInt32,
  writeSafetensors,
} from "../lib/io/safetensors.ts";
import { forward } from "../lib/model/decoder.ts";
import { Model } from "../lib/model/model.ts";

const USAGE =
  `Usage: deno task forward --model DIR --input IN.safetensors --out OUT.safetensors [options]

  --model DIR        Hugging Face model folder (config.json + safetensors)
  --input FILE       safetensors with input_ids (int32 or int64, [batch, seq])
  --out FILE         where to write logits (f32 [batch, seq, vocab]); written atomically
  --backend NAME     cpu (default; BLAS when found), cpu-reference, webgpu
  --all              also write hidden_states_{i} and router_logits_{l} (golden layout)
  --layerwise        keep only one layer's weights resident at a time`;

await runMain(async () => {
  const args = parseCli(USAGE, {
    model: { type: "string" },
    input: { type: "string" },
    out: { type: "string" },
    backend: { type: "string" },
    all: { type: "boolean" },
    layerwise: { type: "boolean" },
  });
  if (!args.model || !args.input || !args.out) {
    throw new UsageError(`--model, --input and --out are required\n\n${USAGE}`);
  }
  const input = await SafetensorsFile.open(args.input);
  if (!input.tensors.has("input_ids")) throw new UsageError(`${args.input}: no tensor "input_ids"`);
  const idsRaw = await input.read("input_ids");
  input.close();
  if (idsRaw.shape.length !== 2) {
    throw new UsageError(`${args.input}: input_ids must be [batch, seq], got [${idsRaw.shape}]`);
  }
  const [batch, seqLen] = idsRaw.shape;
  const ids = toInt32(idsRaw);

  const model = await Model.load(args.model, await createBackend(args.backend));
  const { vocab } = model.spec;
  for (const id of ids) {
    if (id < 0 || id >= vocab) {
      throw new UsageError(`${args.input}: token id ${id} outside the vocabulary [0, ${vocab})`);
    }
  }
  if (seqLen > model.spec.maxPositions) {
    console.error(
      `warning: sequence length ${seqLen} exceeds max_position_embeddings ${model.spec.maxPositions}`,
    );
  }
  const t0 = performance.now();
  const r = await forward(model, ids, { batch, seqLen }, {
    collectHidden: args.all,
    collectRouter: args.all,
    layerwise: args.layerwise,
  });
  const seconds = (performance.now() - t0) / 1000;
  const out: RawTensor[] = [
    f32Tensor("logits", [batch, seqLen, vocab], r.logits),
    i32Tensor("input_ids", [batch, seqLen], ids),
  ];
  if (args.all) {
    r.hiddenStates!.forEach((h, i) =>
      out.push(f32Tensor(`hidden_states_${i}`, [batch, seqLen, model.spec.hidden], h))
    );
    for (const [l, lg] of r.routerLogits!) {
      out.push(f32Tensor(`router_logits_${l}`, [batch * seqLen, lg.length / (batch * seqLen)], lg));
    }
  }
  await writeSafetensors(args.out, out, {
    format: "pt",
    model: args.model,
    backend: model.backend.description,
  });
  console.error(
    `${batch}x${seqLen} tokens on ${model.backend.description}: ${seconds.toFixed(2)} s ` +
      `(${((batch * seqLen) / seconds).toFixed(0)} tok/s) -> ${args.out}`,
  );
  model.close();
});
