// lib/'s imports run one way: scripts -> bench -> train -> methods, eval -> model ->
// backend -> io. Every relative import in lib/ (type-only ones too: a reader follows them
// all the same) must stay within its part or go to a lower layer, and no file may reach
// itself through its imports.

import assert from "node:assert";

const LIB = new URL("../lib/", import.meta.url);

/** The parts of lib/ (a folder, or a file at its top), lowest layer first. */
const LAYERS = [
  ["io", "random.ts"],
  ["backend"],
  ["model", "cli.ts"],
  ["methods", "eval"],
  ["train"],
  ["bench"],
];

type Graph = Map<string, string[]>;

/** The specifiers a module imports: static, side-effect, re-exports and dynamic. */
function specifiersIn(text: string): string[] {
  return [
    ...text.matchAll(/^\s*(?:import|export)\b[^;]*?\bfrom\s*"([^"]+)"/gm),
    ...text.matchAll(/^\s*import\s*"([^"]+)"/gm),
    ...text.matchAll(/\bimport\(\s*"([^"]+)"\s*\)/g),
  ].map((m) => m[1]);
}

/** lib/'s .ts files and the lib/ files each imports, as paths relative to lib/. */
function libGraph(dir = "", graph: Graph = new Map()): Graph {
  for (
    const e of [...Deno.readDirSync(new URL(dir, LIB))].sort((a, b) => a.name < b.name ? -1 : 1)
  ) {
    const file = `${dir}${e.name}`;
    if (e.isDirectory) libGraph(`${file}/`, graph);
    if (!e.isFile || !e.name.endsWith(".ts")) continue;
    const url = new URL(file, LIB);
    const targets = specifiersIn(Deno.readTextFileSync(url))
      .filter((s) => s.startsWith("."))
      .map((s) => new URL(s, url).href)
      .filter((href) => href.startsWith(LIB.href))
      .map((href) => href.slice(LIB.href.length));
    graph.set(file, [...new Set(targets)]);
  }
  return graph;
}

const partOf = (file: string) => file.split("/")[0];
const layerOf = (file: string) => LAYERS.findIndex((parts) => parts.includes(partOf(file)));

/** Imports that leave their part for one not in a lower layer (or for no file at all). */
function wrongWay(graph: Graph): string[] {
  const wrong: string[] = [];
  for (const [file, targets] of graph) {
    if (layerOf(file) < 0) wrong.push(`lib/${partOf(file)} is in no layer (add it to LAYERS)`);
    for (const target of targets) {
      if (!graph.has(target)) wrong.push(`lib/${file} imports lib/${target}, which is missing`);
      else if (partOf(target) !== partOf(file) && layerOf(target) >= layerOf(file)) {
        wrong.push(`lib/${file} imports lib/${target}`);
      }
    }
  }
  return wrong;
}

/** Each import cycle found by a depth-first walk, as its files in order. */
function cycles(graph: Graph): string[] {
  const found: string[] = [];
  const state = new Map<string, "open" | "done">();
  const path: string[] = [];
  const visit = (file: string) => {
    state.set(file, "open");
    path.push(file);
    for (const target of graph.get(file) ?? []) {
      if (state.get(target) === "open") {
        found.push([...path.slice(path.indexOf(target)), target].join(" -> "));
      } else if (!state.has(target)) visit(target);
    }
    path.pop();
    state.set(file, "done");
  };
  for (const file of graph.keys()) if (!state.has(file)) visit(file);
  return found;
}

Deno.test("lib/ imports go to the same part or a lower layer", () => {
  const graph = libGraph();
  assert(graph.get("model/decoder.ts")?.includes("model/config.ts"), "the walk found imports");
  assert.deepEqual(wrongWay(graph), []);
});

Deno.test("lib/ has no import cycle", () => {
  assert.deepEqual(cycles(libGraph()), []);
});

Deno.test("the import check finds what it looks for", () => {
  // The shapes lib/ writes imports in: multi-line, type-only, re-export, dynamic.
  const text = `import {\n  a,\n  type B,\n} from "../methods/x.ts";\n` +
    `import type { C } from "./c.ts";\nexport { d } from "./y.ts";\n` +
    `const { e } = await import("../train/z.ts");\n// not code: from "./no.ts"\n`;
  assert.deepEqual(specifiersIn(text), ["../methods/x.ts", "./c.ts", "./y.ts", "../train/z.ts"]);
  const graph: Graph = new Map([
    ["model/model.ts", ["methods/ce.ts", "backend/b.ts"]],
    ["methods/ce.ts", ["model/model.ts"]],
    ["backend/b.ts", []],
    ["extra/x.ts", ["backend/gone.ts"]],
  ]);
  assert.deepEqual(wrongWay(graph), [
    "lib/model/model.ts imports lib/methods/ce.ts",
    "lib/extra is in no layer (add it to LAYERS)",
    "lib/extra/x.ts imports lib/backend/gone.ts, which is missing",
  ]);
  assert.deepEqual(cycles(graph), ["model/model.ts -> methods/ce.ts -> model/model.ts"]);
});
