// JSON text as Python's json.dumps(value, indent=2, ensure_ascii=False) writes it, for files
// that the harness's users read with Python. JavaScript has one number type, so the caller
// says which numbers are Python floats: those print 1.0 where JSON.stringify prints 1, and
// use Python's repr (1e-05, 1e+16) for very small and very large values.

/** Path of keys (and list indices) from the root to a value. */
export type JsonPath = readonly (string | number)[];

/** Python's repr() of a float. */
export function pyFloatRepr(x: number): string {
  if (Number.isNaN(x)) return "NaN";
  if (!Number.isFinite(x)) return x > 0 ? "Infinity" : "-Infinity";
  if (x === 0) return Object.is(x, -0) ? "-0.0" : "0.0";
  // toExponential() gives the shortest round-tripping digits, as repr does.
  const [mant, expText] = x.toExponential().split("e");
  const exp = Number(expText);
  const sign = mant.startsWith("-") ? "-" : "";
  const digits = mant.replace("-", "").replace(".", "");
  if (exp < -4 || exp >= 16) {
    const m = digits.length > 1 ? `${digits[0]}.${digits.slice(1)}` : digits;
    const e = Math.abs(exp) < 10 ? `0${Math.abs(exp)}` : String(Math.abs(exp));
    return `${sign}${m}e${exp < 0 ? "-" : "+"}${e}`;
  }
  if (exp < 0) return `${sign}0.${"0".repeat(-exp - 1)}${digits}`;
  const whole = digits.slice(0, exp + 1).padEnd(exp + 1, "0");
  const frac = digits.slice(exp + 1);
  return `${sign}${whole}.${frac || "0"}`;
}

/** json.dumps(value, indent=2, ensure_ascii=False); numbers where isFloat(path) are floats. */
export function pyJsonDumps(value: unknown, isFloat: (path: JsonPath) => boolean): string {
  const write = (v: unknown, path: (string | number)[], pad: string): string => {
    if (v === null || v === undefined) return "null";
    if (typeof v === "boolean") return v ? "true" : "false";
    if (typeof v === "number") {
      return Number.isInteger(v) && !isFloat(path) ? String(v) : pyFloatRepr(v);
    }
    // Python escapes the same characters as JSON.stringify when ensure_ascii is off.
    if (typeof v === "string") return JSON.stringify(v);
    const inner = pad + "  ";
    if (Array.isArray(v)) {
      if (v.length === 0) return "[]";
      const items = v.map((x, i) => inner + write(x, [...path, i], inner));
      return `[\n${items.join(",\n")}\n${pad}]`;
    }
    const entries = Object.entries(v as Record<string, unknown>).filter(([, x]) => x !== undefined);
    if (entries.length === 0) return "{}";
    const items = entries.map(([k, x]) =>
      `${inner}${JSON.stringify(k)}: ${write(x, [...path, k], inner)}`
    );
    return `{\n${items.join(",\n")}\n${pad}}`;
  };
  return write(value, [], "");
}
