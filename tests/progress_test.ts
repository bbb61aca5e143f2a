// Progress lines' rate: per second when fast, seconds per item when slower than one a second.
import assert from "node:assert";
import { rateText } from "../lib/methods/cli.ts";

Deno.test("progress rate: items/s, or s/item for work slower than one a second", () => {
  assert.equal(rateText(250, 2, "tokens"), "125.0 tokens/s");
  assert.equal(rateText(3, 3, "candidates"), "1.0 candidates/s");
  assert.equal(rateText(2, 25, "candidates"), "12.5 s/candidate");
  assert.equal(rateText(0, 4, "candidates"), "? candidates/s");
});
