// Shared by every attention kernel, forward and backward (the host prepends it): which keys
// a query sees. Causal, and with a sliding window (p.window > 0) only the last `window`
// positions up to its own.

// First key visible from absolute position pos.
fn first_key(pos: u32) -> u32 {
  if (p.window > 0u && pos + 1u > p.window) {
    return pos + 1u - p.window;
  }
  return 0u;
}
