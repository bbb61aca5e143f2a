;; WebAssembly SIMD kernels for the CPU backend's exp-heavy passes (SwiGLU, softmax), four f32
;; lanes at a time. Compiled into simd_wasm.ts by `deno task build-simd`; cpu_rows.ts copies
;; rows in and out of this module's memory.
(module
  (memory (export "memory") 1)
  ;; e^x in each lane, f32: x = n ln2 + r, |r| <= ln2/2; e^r by Taylor to r^7 (relative
  ;; remainder below 1e-8), 2^n from exponent bits. x is clamped to [-87.3, 88.3] so 2^n stays
  ;; normal. pmin/pmax and the round-by-adding-1.5*2^23 trick compile to single x86 instructions
  ;; where min/max/nearest/trunc_sat need sequences (the SwiGLU kernel went from 3.6 to 2.7 ns an
  ;; output, interleaved).
  (func $exp (param $x v128) (result v128)
    (local $k v128) (local $n v128) (local $r v128) (local $p v128)
    (local.set $x (f32x4.pmin (f32x4.pmax (local.get $x) (v128.const f32x4 -87.3 -87.3 -87.3 -87.3))
                              (v128.const f32x4 88.3 88.3 88.3 88.3)))
    ;; k = x log2e + 1.5*2^23: the sum rounds to an integer n, kept in k's low mantissa bits
    (local.set $k (f32x4.add (f32x4.mul (local.get $x) (v128.const f32x4 1.44269504 1.44269504 1.44269504 1.44269504))
                             (v128.const f32x4 12582912 12582912 12582912 12582912)))
    (local.set $n (f32x4.sub (local.get $k) (v128.const f32x4 12582912 12582912 12582912 12582912)))
    ;; ln2 = 0.693359375 - 2.12194440e-4: the first part has few bits, so n * it is exact
    (local.set $r (f32x4.sub (f32x4.sub (local.get $x)
        (f32x4.mul (local.get $n) (v128.const f32x4 0.693359375 0.693359375 0.693359375 0.693359375)))
        (f32x4.mul (local.get $n) (v128.const f32x4 -2.12194440e-4 -2.12194440e-4 -2.12194440e-4 -2.12194440e-4))))
    (local.set $p (v128.const f32x4 1.98412698e-4 1.98412698e-4 1.98412698e-4 1.98412698e-4)) ;; 1/5040
    (local.set $p (f32x4.add (f32x4.mul (local.get $p) (local.get $r)) (v128.const f32x4 1.38888889e-3 1.38888889e-3 1.38888889e-3 1.38888889e-3)))
    (local.set $p (f32x4.add (f32x4.mul (local.get $p) (local.get $r)) (v128.const f32x4 8.33333333e-3 8.33333333e-3 8.33333333e-3 8.33333333e-3)))
    (local.set $p (f32x4.add (f32x4.mul (local.get $p) (local.get $r)) (v128.const f32x4 4.16666667e-2 4.16666667e-2 4.16666667e-2 4.16666667e-2)))
    (local.set $p (f32x4.add (f32x4.mul (local.get $p) (local.get $r)) (v128.const f32x4 0.166666667 0.166666667 0.166666667 0.166666667)))
    (local.set $p (f32x4.add (f32x4.mul (local.get $p) (local.get $r)) (v128.const f32x4 0.5 0.5 0.5 0.5)))
    (local.set $p (f32x4.add (f32x4.mul (local.get $p) (local.get $r)) (v128.const f32x4 1 1 1 1)))
    (local.set $p (f32x4.add (f32x4.mul (local.get $p) (local.get $r)) (v128.const f32x4 1 1 1 1)))
    ;; 2^n: n + 127 into the exponent field (the low 9 bits of k + 127 are n + 127, in [1, 254])
    (f32x4.mul (local.get $p) (i32x4.shl (i32x4.add (local.get $k) (v128.const i32x4 127 127 127 127)) (i32.const 23))))

  ;; out[c] = silu(gate) * up over runs of 4: 4 gate then 4 up values in, 4 out. $runs runs.
  (func (export "swiglu") (param $gateUp i32) (param $out i32) (param $runs i32)
    (local $g v128)
    (block $done (loop $next
      (br_if $done (i32.eqz (local.get $runs)))
      (local.set $g (v128.load (local.get $gateUp)))
      (v128.store (local.get $out)
        (f32x4.mul
          (f32x4.div (local.get $g)
            (f32x4.add (v128.const f32x4 1 1 1 1) (call $exp (f32x4.neg (local.get $g)))))
          (v128.load offset=16 (local.get $gateUp))))
      (local.set $gateUp (i32.add (local.get $gateUp) (i32.const 32)))
      (local.set $out (i32.add (local.get $out) (i32.const 16)))
      (local.set $runs (i32.sub (local.get $runs) (i32.const 1)))
      (br $next))))

  ;; out = silu(gate) * up, gate and up apart ($vecs f32x4 each): the experts one by one.
  (func (export "swiglu_apart") (param $gate i32) (param $up i32) (param $out i32) (param $vecs i32)
    (local $g v128)
    (block $done (loop $next
      (br_if $done (i32.eqz (local.get $vecs)))
      (local.set $g (v128.load (local.get $gate)))
      (v128.store (local.get $out)
        (f32x4.mul
          (f32x4.div (local.get $g)
            (f32x4.add (v128.const f32x4 1 1 1 1) (call $exp (f32x4.neg (local.get $g)))))
          (v128.load (local.get $up))))
      (local.set $gate (i32.add (local.get $gate) (i32.const 16)))
      (local.set $up (i32.add (local.get $up) (i32.const 16)))
      (local.set $out (i32.add (local.get $out) (i32.const 16)))
      (local.set $vecs (i32.sub (local.get $vecs) (i32.const 1)))
      (br $next))))

  ;; The backward of swiglu_apart, in place: gate <- dy up sig (1 + gate (1 - sig)) and
  ;; up <- dy gate sig, sig = 1 / (1 + e^-gate).
  (func (export "swiglu_apart_backward") (param $gate i32) (param $up i32) (param $dy i32) (param $vecs i32)
    (local $g v128) (local $sig v128) (local $d v128)
    (block $done (loop $next
      (br_if $done (i32.eqz (local.get $vecs)))
      (local.set $g (v128.load (local.get $gate)))
      (local.set $d (v128.load (local.get $dy)))
      (local.set $sig (f32x4.div (v128.const f32x4 1 1 1 1)
        (f32x4.add (v128.const f32x4 1 1 1 1) (call $exp (f32x4.neg (local.get $g))))))
      (v128.store (local.get $gate)
        (f32x4.mul (f32x4.mul (f32x4.mul (local.get $d) (v128.load (local.get $up))) (local.get $sig))
          (f32x4.add (v128.const f32x4 1 1 1 1)
            (f32x4.mul (local.get $g) (f32x4.sub (v128.const f32x4 1 1 1 1) (local.get $sig))))))
      (v128.store (local.get $up) (f32x4.mul (f32x4.mul (local.get $d) (local.get $g)) (local.get $sig)))
      (local.set $gate (i32.add (local.get $gate) (i32.const 16)))
      (local.set $up (i32.add (local.get $up) (i32.const 16)))
      (local.set $dy (i32.add (local.get $dy) (i32.const 16)))
      (local.set $vecs (i32.sub (local.get $vecs) (i32.const 1)))
      (br $next))))

  ;; The causal (optionally windowed) softmax of $rows score rows of $kvLen at $p, in place:
  ;; row i sees keys lo .. pos, pos = $pos0 + i, lo = max(0, pos - $window + 1) ($window 0:
  ;; none); those become e^(x - max) / sum (the sum in f64 lanes: in f32 its rounding alone
  ;; reached 1e-6 over 256 keys), the others 0. Whole rows per call: per-row calls from JS
  ;; spent more time on views and copies than on the math.
  (func (export "softmax_causal") (param $p i32) (param $rows i32) (param $kvLen i32)
      (param $pos0 i32) (param $window i32)
    (local $row i32) (local $pos i32) (local $lo i32) (local $a i32) (local $z i32) (local $q i32)
    (local $full i32) (local $v v128) (local $m v128) (local $s v128) (local $e f32)
    (local.set $row (local.get $p))
    (local.set $pos (local.get $pos0))
    (block $rowsDone (loop $nextRow
      (br_if $rowsDone (i32.eqz (local.get $rows)))
      (local.set $lo (i32.const 0))
      (if (i32.gt_s (local.get $window) (i32.const 0)) (then
        (local.set $lo (i32.sub (i32.add (local.get $pos) (i32.const 1)) (local.get $window)))
        (if (i32.lt_s (local.get $lo) (i32.const 0)) (then (local.set $lo (i32.const 0))))))
      ;; visible bytes [a, z); whole vectors up to $full, single lanes after
      (local.set $a (i32.add (local.get $row) (i32.shl (local.get $lo) (i32.const 2))))
      (local.set $z (i32.add (local.get $row) (i32.shl (i32.add (local.get $pos) (i32.const 1)) (i32.const 2))))
      (local.set $full (i32.add (local.get $a)
        (i32.and (i32.sub (local.get $z) (local.get $a)) (i32.const -16))))
      ;; max
      (local.set $m (v128.const f32x4 -inf -inf -inf -inf))
      (local.set $q (local.get $a))
      (block $d (loop $l
        (br_if $d (i32.ge_u (local.get $q) (local.get $full)))
        (local.set $m (f32x4.max (local.get $m) (v128.load (local.get $q))))
        (local.set $q (i32.add (local.get $q) (i32.const 16)))
        (br $l)))
      (block $d (loop $l
        (br_if $d (i32.ge_u (local.get $q) (local.get $z)))
        (local.set $m (f32x4.max (local.get $m) (f32x4.splat (f32.load (local.get $q)))))
        (local.set $q (i32.add (local.get $q) (i32.const 4)))
        (br $l)))
      (local.set $m (f32x4.max (local.get $m) (i8x16.shuffle 8 9 10 11 12 13 14 15 0 1 2 3 4 5 6 7 (local.get $m) (local.get $m))))
      (local.set $m (f32x4.max (local.get $m) (i8x16.shuffle 4 5 6 7 0 1 2 3 12 13 14 15 8 9 10 11 (local.get $m) (local.get $m))))
      ;; e^(x - max) and their sum
      (local.set $s (v128.const f64x2 0 0))
      (local.set $q (local.get $a))
      (block $d (loop $l
        (br_if $d (i32.ge_u (local.get $q) (local.get $full)))
        (local.set $v (call $exp (f32x4.sub (v128.load (local.get $q)) (local.get $m))))
        (v128.store (local.get $q) (local.get $v))
        (local.set $s (f64x2.add (local.get $s) (f64x2.add (f64x2.promote_low_f32x4 (local.get $v))
          (f64x2.promote_low_f32x4 (i8x16.shuffle 8 9 10 11 12 13 14 15 0 1 2 3 4 5 6 7 (local.get $v) (local.get $v))))))
        (local.set $q (i32.add (local.get $q) (i32.const 16)))
        (br $l)))
      (block $d (loop $l
        (br_if $d (i32.ge_u (local.get $q) (local.get $z)))
        (local.set $e (f32x4.extract_lane 0
          (call $exp (f32x4.sub (f32x4.splat (f32.load (local.get $q))) (local.get $m)))))
        (f32.store (local.get $q) (local.get $e))
        (local.set $s (f64x2.add (local.get $s)
          (f64x2.replace_lane 0 (v128.const f64x2 0 0) (f64.promote_f32 (local.get $e)))))
        (local.set $q (i32.add (local.get $q) (i32.const 4)))
        (br $l)))
      (local.set $s (f32x4.splat (f32.demote_f64 (f64.add
        (f64x2.extract_lane 0 (local.get $s)) (f64x2.extract_lane 1 (local.get $s))))))
      (local.set $q (local.get $a))
      (block $d (loop $l
        (br_if $d (i32.ge_u (local.get $q) (local.get $full)))
        (v128.store (local.get $q) (f32x4.div (v128.load (local.get $q)) (local.get $s)))
        (local.set $q (i32.add (local.get $q) (i32.const 16)))
        (br $l)))
      (block $d (loop $l
        (br_if $d (i32.ge_u (local.get $q) (local.get $z)))
        (f32.store (local.get $q) (f32.div (f32.load (local.get $q)) (f32x4.extract_lane 0 (local.get $s))))
        (local.set $q (i32.add (local.get $q) (i32.const 4)))
        (br $l)))
      ;; the keys the row does not see
      (memory.fill (local.get $row) (i32.const 0) (i32.sub (local.get $a) (local.get $row)))
      (memory.fill (local.get $z) (i32.const 0)
        (i32.sub (i32.add (local.get $row) (i32.shl (local.get $kvLen) (i32.const 2))) (local.get $z)))
      (local.set $row (i32.add (local.get $row) (i32.shl (local.get $kvLen) (i32.const 2))))
      (local.set $pos (i32.add (local.get $pos) (i32.const 1)))
      (local.set $rows (i32.sub (local.get $rows) (i32.const 1)))
      (br $nextRow))))

  ;; RMSNorm of $rows rows of $width floats (a multiple of 4) at $x: the sum of squares in f64
  ;; lanes, then out = w * (x * inv) in f32, in HF's order. With $b (not 0), x = a + b is
  ;; first stored at $sum (the residual add fused with the next norm); $x is then a.
  (func (export "rms_norm") (param $x i32) (param $b i32) (param $sum i32) (param $w i32)
      (param $out i32) (param $rows i32) (param $width i32) (param $eps f64)
    (local $bytes i32) (local $i i32) (local $v v128) (local $ss v128) (local $inv v128)
    (local $row i32)
    (local.set $bytes (i32.shl (local.get $width) (i32.const 2)))
    (block $done (loop $nextRow
      (br_if $done (i32.eqz (local.get $rows)))
      (local.set $ss (v128.const f64x2 0 0))
      (local.set $row (if (result i32) (local.get $b) (then (local.get $sum)) (else (local.get $x))))
      (local.set $i (i32.const 0))
      (block $d (loop $l
        (br_if $d (i32.ge_u (local.get $i) (local.get $bytes)))
        (local.set $v (v128.load (i32.add (local.get $x) (local.get $i))))
        (if (local.get $b) (then
          (local.set $v (f32x4.add (local.get $v) (v128.load (i32.add (local.get $b) (local.get $i)))))
          (v128.store (i32.add (local.get $sum) (local.get $i)) (local.get $v))))
        (local.set $ss (f64x2.add (local.get $ss) (f64x2.add
          (f64x2.mul (f64x2.promote_low_f32x4 (local.get $v)) (f64x2.promote_low_f32x4 (local.get $v)))
          (f64x2.mul
            (f64x2.promote_low_f32x4 (i8x16.shuffle 8 9 10 11 12 13 14 15 0 1 2 3 4 5 6 7 (local.get $v) (local.get $v)))
            (f64x2.promote_low_f32x4 (i8x16.shuffle 8 9 10 11 12 13 14 15 0 1 2 3 4 5 6 7 (local.get $v) (local.get $v)))))))
        (local.set $i (i32.add (local.get $i) (i32.const 16)))
        (br $l)))
      ;; inv = 1 / sqrt(mean + eps) in f64, rounded to f32 once
      (local.set $inv (f32x4.splat (f32.demote_f64 (f64.div (f64.const 1) (f64.sqrt (f64.add
        (f64.div (f64.add (f64x2.extract_lane 0 (local.get $ss)) (f64x2.extract_lane 1 (local.get $ss)))
          (f64.convert_i32_u (local.get $width)))
        (local.get $eps)))))))
      (local.set $i (i32.const 0))
      (block $d (loop $l
        (br_if $d (i32.ge_u (local.get $i) (local.get $bytes)))
        (v128.store (i32.add (local.get $out) (local.get $i))
          (f32x4.mul (v128.load (i32.add (local.get $w) (local.get $i)))
            (f32x4.mul (v128.load (i32.add (local.get $row) (local.get $i))) (local.get $inv))))
        (local.set $i (i32.add (local.get $i) (i32.const 16)))
        (br $l)))
      (local.set $x (i32.add (local.get $x) (local.get $bytes)))
      (if (local.get $b) (then
        (local.set $b (i32.add (local.get $b) (local.get $bytes)))
        (local.set $sum (i32.add (local.get $sum) (local.get $bytes)))))
      (local.set $out (i32.add (local.get $out) (local.get $bytes)))
      (local.set $rows (i32.sub (local.get $rows) (i32.const 1)))
      (br $nextRow))))

  ;; rotate_half RoPE in place over $rows rows of $heads heads of $headDim (half a multiple of
  ;; 4) at $x; row r's cos then sin values (headDim/2 each, sin with its sign) are row r of
  ;; $cs: [p, q] -> [p cos - q sin, q cos + p sin], in f32 as HF computes it.
  (func (export "rope") (param $x i32) (param $cs i32) (param $rows i32) (param $heads i32)
      (param $headDim i32)
    (local $half i32) (local $h i32) (local $i i32) (local $p v128) (local $q v128) (local $c v128)
    (local $s v128) (local $at i32)
    (local.set $half (i32.shl (local.get $headDim) (i32.const 1))) ;; half a head, in bytes
    (block $done (loop $nextRow
      (br_if $done (i32.eqz (local.get $rows)))
      (local.set $h (local.get $heads))
      (block $d (loop $nextHead
        (br_if $d (i32.eqz (local.get $h)))
        (local.set $i (i32.const 0))
        (block $d2 (loop $l
          (br_if $d2 (i32.ge_u (local.get $i) (local.get $half)))
          (local.set $at (i32.add (local.get $x) (local.get $i)))
          (local.set $p (v128.load (local.get $at)))
          (local.set $q (v128.load (i32.add (local.get $at) (local.get $half))))
          (local.set $c (v128.load (i32.add (local.get $cs) (local.get $i))))
          (local.set $s (v128.load (i32.add (i32.add (local.get $cs) (local.get $half)) (local.get $i))))
          (v128.store (local.get $at)
            (f32x4.sub (f32x4.mul (local.get $p) (local.get $c)) (f32x4.mul (local.get $q) (local.get $s))))
          (v128.store (i32.add (local.get $at) (local.get $half))
            (f32x4.add (f32x4.mul (local.get $q) (local.get $c)) (f32x4.mul (local.get $p) (local.get $s))))
          (local.set $i (i32.add (local.get $i) (i32.const 16)))
          (br $l)))
        (local.set $x (i32.add (local.get $x) (i32.shl (local.get $half) (i32.const 1))))
        (local.set $h (i32.sub (local.get $h) (i32.const 1)))
        (br $nextHead)))
      (local.set $cs (i32.add (local.get $cs) (i32.shl (local.get $half) (i32.const 1))))
      (local.set $rows (i32.sub (local.get $rows) (i32.const 1)))
      (br $nextRow))))

  ;; out[r] += sum_j scale[r, j] * y[r, j] for $rows rows of $width floats (a multiple of 4):
  ;; the routed experts' k outputs of each token (gathered in order at $y, scales at $scale)
  ;; added in order j = 0..k-1, as the reference does.
  (func (export "combine") (param $out i32) (param $y i32) (param $scale i32) (param $rows i32)
      (param $k i32) (param $width i32)
    (local $bytes i32) (local $j i32) (local $i i32) (local $s v128)
    (local.set $bytes (i32.shl (local.get $width) (i32.const 2)))
    (block $done (loop $nextRow
      (br_if $done (i32.eqz (local.get $rows)))
      (local.set $j (local.get $k))
      (block $d (loop $nextSource
        (br_if $d (i32.eqz (local.get $j)))
        (local.set $s (v128.load32_splat (local.get $scale)))
        (local.set $i (i32.const 0))
        (block $d2 (loop $l
          (br_if $d2 (i32.ge_u (local.get $i) (local.get $bytes)))
          (v128.store (i32.add (local.get $out) (local.get $i))
            (f32x4.add (v128.load (i32.add (local.get $out) (local.get $i)))
              (f32x4.mul (local.get $s) (v128.load (i32.add (local.get $y) (local.get $i))))))
          (local.set $i (i32.add (local.get $i) (i32.const 16)))
          (br $l)))
        (local.set $y (i32.add (local.get $y) (local.get $bytes)))
        (local.set $scale (i32.add (local.get $scale) (i32.const 4)))
        (local.set $j (i32.sub (local.get $j) (i32.const 1)))
        (br $nextSource)))
      (local.set $out (i32.add (local.get $out) (local.get $bytes)))
      (local.set $rows (i32.sub (local.get $rows) (i32.const 1)))
      (br $nextRow))))

  ;; AdamW in place over $vecs f32x4 of parameters $p, gradients $g and moments $m, $v, in
  ;; cpu.ts adamwStep's order of operations, in f32 as torch.optim.AdamW on f32 tensors.
  ;; $c1 = 1 - beta1, $c2 = 1 - beta2; $bc1, $bc2 the bias corrections.
  (func (export "adamw") (param $p i32) (param $g i32) (param $m i32) (param $v i32) (param $vecs i32)
      (param $lr f32) (param $beta1 f32) (param $c1 f32) (param $beta2 f32) (param $c2 f32)
      (param $eps f32) (param $wd f32) (param $gradScale f32) (param $bc1 f32) (param $bc2 f32)
    (local $gv v128) (local $mv v128) (local $vv v128) (local $pv v128) (local $update v128)
    (block $done (loop $next
      (br_if $done (i32.eqz (local.get $vecs)))
      (local.set $gv (f32x4.mul (f32x4.splat (local.get $gradScale)) (v128.load (local.get $g))))
      (local.set $mv (f32x4.add (f32x4.mul (f32x4.splat (local.get $beta1)) (v128.load (local.get $m)))
        (f32x4.mul (f32x4.splat (local.get $c1)) (local.get $gv))))
      (local.set $vv (f32x4.add (f32x4.mul (f32x4.splat (local.get $beta2)) (v128.load (local.get $v)))
        (f32x4.mul (f32x4.mul (f32x4.splat (local.get $c2)) (local.get $gv)) (local.get $gv))))
      (v128.store (local.get $m) (local.get $mv))
      (v128.store (local.get $v) (local.get $vv))
      (local.set $update (f32x4.div (f32x4.div (local.get $mv) (f32x4.splat (local.get $bc1)))
        (f32x4.add (f32x4.sqrt (f32x4.div (local.get $vv) (f32x4.splat (local.get $bc2))))
          (f32x4.splat (local.get $eps)))))
      (local.set $pv (v128.load (local.get $p)))
      (v128.store (local.get $p) (f32x4.sub (local.get $pv) (f32x4.mul (f32x4.splat (local.get $lr))
        (f32x4.add (f32x4.mul (f32x4.splat (local.get $wd)) (local.get $pv)) (local.get $update)))))
      (local.set $p (i32.add (local.get $p) (i32.const 16)))
      (local.set $g (i32.add (local.get $g) (i32.const 16)))
      (local.set $m (i32.add (local.get $m) (i32.const 16)))
      (local.set $v (i32.add (local.get $v) (i32.const 16)))
      (local.set $vecs (i32.sub (local.get $vecs) (i32.const 1)))
      (br $next))))

  ;; ---- f64 lanes: the searches' JS divergence (lib/methods/divergence.ts) ----------------
  ;; Its sums cancel (JS is a difference of entropies near 5.5 that can be near 1e-5), so f32
  ;; would lose its digits: these stay in f64, within a few ulps of Math.exp and Math.log.

  ;; ln x in two f64 lanes, x positive and normal: x = 2^e f with f in [sqrt(1/2), sqrt(2)),
  ;; ln f = 2 atanh(u), u = (f - 1) / (f + 1), |u| < 0.172, by its series to u^21 (remainder
  ;; below 1e-18 of the result); ln2 in two parts. js_rows inlines the same steps.
  (func $log64 (param $x v128) (result v128)
    (local $e v128) (local $f v128) (local $big v128) (local $u v128) (local $u2 v128) (local $y v128)
    ;; e: the biased exponent as the low bits of 2^52 + E, minus 2^52 + 1023
    (local.set $e (f64x2.sub (v128.or (i64x2.shr_u (local.get $x) (i32.const 52))
        (v128.const i64x2 0x4330000000000000 0x4330000000000000))
      (v128.const f64x2 4503599627371519 4503599627371519)))
    (local.set $f (v128.or (v128.and (local.get $x) (v128.const i64x2 0x000FFFFFFFFFFFFF 0x000FFFFFFFFFFFFF))
      (v128.const i64x2 0x3FF0000000000000 0x3FF0000000000000)))
    (local.set $big (f64x2.gt (local.get $f) (v128.const f64x2 1.4142135623730951 1.4142135623730951)))
    (local.set $f (v128.bitselect (f64x2.mul (local.get $f) (v128.const f64x2 0.5 0.5)) (local.get $f) (local.get $big)))
    (local.set $e (f64x2.add (local.get $e) (v128.and (local.get $big) (v128.const f64x2 1 1))))
    (local.set $u (f64x2.div (f64x2.sub (local.get $f) (v128.const f64x2 1 1)) (f64x2.add (local.get $f) (v128.const f64x2 1 1))))
    (local.set $u2 (f64x2.mul (local.get $u) (local.get $u)))
    (local.set $y (v128.const f64x2 0.047619047619047616 0.047619047619047616))
    (local.set $y (f64x2.add (f64x2.mul (local.get $y) (local.get $u2)) (v128.const f64x2 0.05263157894736842 0.05263157894736842)))
    (local.set $y (f64x2.add (f64x2.mul (local.get $y) (local.get $u2)) (v128.const f64x2 0.058823529411764705 0.058823529411764705)))
    (local.set $y (f64x2.add (f64x2.mul (local.get $y) (local.get $u2)) (v128.const f64x2 0.06666666666666667 0.06666666666666667)))
    (local.set $y (f64x2.add (f64x2.mul (local.get $y) (local.get $u2)) (v128.const f64x2 0.07692307692307693 0.07692307692307693)))
    (local.set $y (f64x2.add (f64x2.mul (local.get $y) (local.get $u2)) (v128.const f64x2 0.09090909090909091 0.09090909090909091)))
    (local.set $y (f64x2.add (f64x2.mul (local.get $y) (local.get $u2)) (v128.const f64x2 0.1111111111111111 0.1111111111111111)))
    (local.set $y (f64x2.add (f64x2.mul (local.get $y) (local.get $u2)) (v128.const f64x2 0.14285714285714285 0.14285714285714285)))
    (local.set $y (f64x2.add (f64x2.mul (local.get $y) (local.get $u2)) (v128.const f64x2 0.2 0.2)))
    (local.set $y (f64x2.add (f64x2.mul (local.get $y) (local.get $u2)) (v128.const f64x2 0.3333333333333333 0.3333333333333333)))
    (local.set $y (f64x2.add (f64x2.mul (local.get $y) (local.get $u2)) (v128.const f64x2 1 1)))
    (f64x2.add (f64x2.mul (local.get $e) (v128.const f64x2 6.93147180369123816490e-01 6.93147180369123816490e-01))
      (f64x2.add (f64x2.mul (local.get $e) (v128.const f64x2 1.90821492927058770002e-10 1.90821492927058770002e-10))
        (f64x2.mul (f64x2.add (local.get $u) (local.get $u)) (local.get $y)))))

  ;; Jensen-Shannon divergence per row: divergence.ts's jsRow (cpu_rows.ts) in f64 lanes. For
  ;; $rows rows of $dim f32 values (a multiple of 4) at $cond, Q = softmax(row) + $eps against
  ;; P (f32 rows at $p; each row's sum p ln p at $plogp, f64): JS(P||Q) -> $out (f64). $e:
  ;; room for a row's e^(x - max), f64. As in jsRow, ln q comes from x where eps / s < 1e-5.
  ;; e^x and ln are written out in the loops with their constants in locals: V8 builds a
  ;; v128.const anew at each use, and calls to $log64 ran the loop at Math.log's speed.
  ;; e^x: x = n ln2 + r, |r| <= ln2/2, n ln2hi exact; e^r by Taylor to r^13 (remainder
  ;; 4e-18); 2^n from exponent bits; x = value - max <= 0, clamped at -708 (2^n normal).
  (func (export "js_rows") (param $p i32) (param $plogp i32) (param $cond i32) (param $out i32)
      (param $e i32) (param $rows i32) (param $dim i32) (param $eps f64)
    (local $bytes i32) (local $i i32) (local $mx v128) (local $max v128) (local $sum v128)
    (local $inv v128) (local $logSum v128) (local $x v128) (local $k v128) (local $n v128)
    (local $r v128) (local $y v128) (local $s v128) (local $q v128) (local $t v128)
    (local $small v128) (local $logq v128) (local $m v128) (local $f v128) (local $ex v128)
    (local $big v128) (local $u v128) (local $u2 v128) (local $qlogq v128) (local $mlogm v128)
    (local $epsv v128) (local $total f64) (local $lnOf v128) (local $lnOfQ i32)
    (local $kOne v128)
    (local $kHalf v128)
    (local $kLo v128)
    (local $kLog2e v128)
    (local $kMagic v128)
    (local $kLn2Hi v128)
    (local $kLn2Lo v128)
    (local $kBias v128)
    (local $kMantissa v128)
    (local $kOneBits v128)
    (local $kExpBits v128)
    (local $kExpBias v128)
    (local $kSqrt2 v128)
    (local $kSmall v128)
    (local $kThree v128)
    (local $e13 v128)
    (local $e12 v128)
    (local $e11 v128)
    (local $e10 v128)
    (local $e9 v128)
    (local $e8 v128)
    (local $e7 v128)
    (local $e6 v128)
    (local $e5 v128)
    (local $e4 v128)
    (local $e3 v128)
    (local $e2 v128)
    (local $l21 v128)
    (local $l19 v128)
    (local $l17 v128)
    (local $l15 v128)
    (local $l13 v128)
    (local $l11 v128)
    (local $l9 v128)
    (local $l7 v128)
    (local $l5 v128)
    (local $l3 v128)
    (local.set $kOne (v128.const f64x2 1 1))
    (local.set $kHalf (v128.const f64x2 0.5 0.5))
    (local.set $kLo (v128.const f64x2 -708 -708))
    (local.set $kLog2e (v128.const f64x2 1.4426950408889634 1.4426950408889634))
    (local.set $kMagic (v128.const f64x2 6755399441055744 6755399441055744))
    (local.set $kLn2Hi (v128.const f64x2 6.93147180369123816490e-01 6.93147180369123816490e-01))
    (local.set $kLn2Lo (v128.const f64x2 1.90821492927058770002e-10 1.90821492927058770002e-10))
    (local.set $kBias (v128.const i64x2 1023 1023))
    (local.set $kMantissa (v128.const i64x2 0x000FFFFFFFFFFFFF 0x000FFFFFFFFFFFFF))
    (local.set $kOneBits (v128.const i64x2 0x3FF0000000000000 0x3FF0000000000000))
    (local.set $kExpBits (v128.const i64x2 0x4330000000000000 0x4330000000000000))
    (local.set $kExpBias (v128.const f64x2 4503599627371519 4503599627371519))
    (local.set $kSqrt2 (v128.const f64x2 1.4142135623730951 1.4142135623730951))
    (local.set $kSmall (v128.const f64x2 1e-5 1e-5))
    (local.set $kThree (v128.const f64x2 3 3))
    (local.set $e13 (v128.const f64x2 1.6059043836821613e-10 1.6059043836821613e-10))
    (local.set $e12 (v128.const f64x2 2.08767569878681e-09 2.08767569878681e-09))
    (local.set $e11 (v128.const f64x2 2.505210838544172e-08 2.505210838544172e-08))
    (local.set $e10 (v128.const f64x2 2.755731922398589e-07 2.755731922398589e-07))
    (local.set $e9 (v128.const f64x2 2.7557319223985893e-06 2.7557319223985893e-06))
    (local.set $e8 (v128.const f64x2 2.48015873015873e-05 2.48015873015873e-05))
    (local.set $e7 (v128.const f64x2 0.0001984126984126984 0.0001984126984126984))
    (local.set $e6 (v128.const f64x2 0.001388888888888889 0.001388888888888889))
    (local.set $e5 (v128.const f64x2 0.008333333333333333 0.008333333333333333))
    (local.set $e4 (v128.const f64x2 0.041666666666666664 0.041666666666666664))
    (local.set $e3 (v128.const f64x2 0.16666666666666666 0.16666666666666666))
    (local.set $e2 (v128.const f64x2 0.5 0.5))
    (local.set $l21 (v128.const f64x2 0.047619047619047616 0.047619047619047616))
    (local.set $l19 (v128.const f64x2 0.05263157894736842 0.05263157894736842))
    (local.set $l17 (v128.const f64x2 0.058823529411764705 0.058823529411764705))
    (local.set $l15 (v128.const f64x2 0.06666666666666667 0.06666666666666667))
    (local.set $l13 (v128.const f64x2 0.07692307692307693 0.07692307692307693))
    (local.set $l11 (v128.const f64x2 0.09090909090909091 0.09090909090909091))
    (local.set $l9 (v128.const f64x2 0.1111111111111111 0.1111111111111111))
    (local.set $l7 (v128.const f64x2 0.14285714285714285 0.14285714285714285))
    (local.set $l5 (v128.const f64x2 0.2 0.2))
    (local.set $l3 (v128.const f64x2 0.3333333333333333 0.3333333333333333))
    (local.set $bytes (i32.shl (local.get $dim) (i32.const 2)))
    (local.set $epsv (f64x2.splat (local.get $eps)))
    (block $done (loop $nextRow
      (br_if $done (i32.eqz (local.get $rows)))
      ;; max in f32 lanes (exact), then as f64
      (local.set $mx (v128.const f32x4 -inf -inf -inf -inf))
      (local.set $i (i32.const 0))
      (block $d (loop $l
        (br_if $d (i32.ge_u (local.get $i) (local.get $bytes)))
        (local.set $mx (f32x4.max (local.get $mx) (v128.load (i32.add (local.get $cond) (local.get $i)))))
        (local.set $i (i32.add (local.get $i) (i32.const 16)))
        (br $l)))
      (local.set $mx (f32x4.max (local.get $mx) (i8x16.shuffle 8 9 10 11 12 13 14 15 0 1 2 3 4 5 6 7 (local.get $mx) (local.get $mx))))
      (local.set $mx (f32x4.max (local.get $mx) (i8x16.shuffle 4 5 6 7 0 1 2 3 12 13 14 15 8 9 10 11 (local.get $mx) (local.get $mx))))
      (local.set $max (f64x2.splat (f64.promote_f32 (f32x4.extract_lane 0 (local.get $mx)))))
      ;; e^(x - max), kept, and their sum
      (local.set $sum (v128.const f64x2 0 0))
      (local.set $i (i32.const 0))
      (block $d (loop $l
        (br_if $d (i32.ge_u (local.get $i) (local.get $bytes)))
        (local.set $x (f64x2.pmax (local.get $kLo) (f64x2.sub
          (f64x2.promote_low_f32x4 (v128.load64_zero (i32.add (local.get $cond) (local.get $i))))
          (local.get $max))))
        (local.set $k (f64x2.add (f64x2.mul (local.get $x) (local.get $kLog2e)) (local.get $kMagic)))
        (local.set $n (f64x2.sub (local.get $k) (local.get $kMagic)))
        (local.set $r (f64x2.sub (f64x2.sub (local.get $x) (f64x2.mul (local.get $n) (local.get $kLn2Hi)))
          (f64x2.mul (local.get $n) (local.get $kLn2Lo))))
        (local.set $y (local.get $e13))
        (local.set $y (f64x2.add (f64x2.mul (local.get $y) (local.get $r)) (local.get $e12)))
        (local.set $y (f64x2.add (f64x2.mul (local.get $y) (local.get $r)) (local.get $e11)))
        (local.set $y (f64x2.add (f64x2.mul (local.get $y) (local.get $r)) (local.get $e10)))
        (local.set $y (f64x2.add (f64x2.mul (local.get $y) (local.get $r)) (local.get $e9)))
        (local.set $y (f64x2.add (f64x2.mul (local.get $y) (local.get $r)) (local.get $e8)))
        (local.set $y (f64x2.add (f64x2.mul (local.get $y) (local.get $r)) (local.get $e7)))
        (local.set $y (f64x2.add (f64x2.mul (local.get $y) (local.get $r)) (local.get $e6)))
        (local.set $y (f64x2.add (f64x2.mul (local.get $y) (local.get $r)) (local.get $e5)))
        (local.set $y (f64x2.add (f64x2.mul (local.get $y) (local.get $r)) (local.get $e4)))
        (local.set $y (f64x2.add (f64x2.mul (local.get $y) (local.get $r)) (local.get $e3)))
        (local.set $y (f64x2.add (f64x2.mul (local.get $y) (local.get $r)) (local.get $e2)))
        (local.set $y (f64x2.add (f64x2.mul (local.get $y) (local.get $r)) (local.get $kOne)))
        (local.set $y (f64x2.add (f64x2.mul (local.get $y) (local.get $r)) (local.get $kOne)))
        ;; times 2^n: n + 1023 into the exponent field (the 2^51 of the magic shifts out)
        (local.set $y (f64x2.mul (local.get $y)
          (i64x2.shl (i64x2.add (local.get $k) (local.get $kBias)) (i32.const 52))))
        (v128.store (i32.add (local.get $e) (i32.shl (local.get $i) (i32.const 1))) (local.get $y))
        (local.set $sum (f64x2.add (local.get $sum) (local.get $y)))
        (local.set $i (i32.add (local.get $i) (i32.const 8)))
        (br $l)))
      (local.set $sum (f64x2.splat (f64.add (f64x2.extract_lane 0 (local.get $sum)) (f64x2.extract_lane 1 (local.get $sum)))))
      (local.set $inv (f64x2.div (local.get $kOne) (local.get $sum)))
      (local.set $logSum (call $log64 (local.get $sum)))
      (local.set $qlogq (v128.const f64x2 0 0))
      (local.set $mlogm (v128.const f64x2 0 0))
      (local.set $i (i32.const 0))
      (block $d (loop $l
        (br_if $d (i32.ge_u (local.get $i) (local.get $bytes)))
        (local.set $s (f64x2.mul (v128.load (i32.add (local.get $e) (i32.shl (local.get $i) (i32.const 1)))) (local.get $inv)))
        (local.set $q (f64x2.add (local.get $s) (local.get $epsv)))
        (local.set $t (f64x2.div (local.get $epsv) (local.get $s)))
        (local.set $small (f64x2.lt (local.get $t) (local.get $kSmall)))
        ;; ln q = (x - max - ln sum) + ln(1 + t) by t - t^2/2 + t^3/3, or ln q itself
        (local.set $logq (f64x2.add
          (f64x2.sub (f64x2.sub
            (f64x2.promote_low_f32x4 (v128.load64_zero (i32.add (local.get $cond) (local.get $i))))
            (local.get $max)) (local.get $logSum))
          (f64x2.mul (local.get $t) (f64x2.sub (local.get $kOne) (f64x2.mul (local.get $t)
            (f64x2.sub (local.get $kHalf) (f64x2.div (local.get $t) (local.get $kThree))))))))
        (local.set $m (f64x2.mul (local.get $kHalf) (f64x2.add
          (f64x2.promote_low_f32x4 (v128.load64_zero (i32.add (local.get $p) (local.get $i))))
          (local.get $q))))
        ;; ln m, and first ln q where a lane needs it: one pass of $log64's steps, or two
        (local.set $lnOfQ (i32.eqz (i64x2.all_true (local.get $small))))
        (local.set $lnOf (select (result v128) (local.get $q) (local.get $m) (local.get $lnOfQ)))
        (loop $ln
          (local.set $ex (f64x2.sub (v128.or (i64x2.shr_u (local.get $lnOf) (i32.const 52)) (local.get $kExpBits))
            (local.get $kExpBias)))
          (local.set $f (v128.or (v128.and (local.get $lnOf) (local.get $kMantissa)) (local.get $kOneBits)))
          (local.set $big (f64x2.gt (local.get $f) (local.get $kSqrt2)))
          (local.set $f (v128.bitselect (f64x2.mul (local.get $f) (local.get $kHalf)) (local.get $f) (local.get $big)))
          (local.set $ex (f64x2.add (local.get $ex) (v128.and (local.get $big) (local.get $kOne))))
          (local.set $u (f64x2.div (f64x2.sub (local.get $f) (local.get $kOne)) (f64x2.add (local.get $f) (local.get $kOne))))
          (local.set $u2 (f64x2.mul (local.get $u) (local.get $u)))
          (local.set $y (local.get $l21))
          (local.set $y (f64x2.add (f64x2.mul (local.get $y) (local.get $u2)) (local.get $l19)))
          (local.set $y (f64x2.add (f64x2.mul (local.get $y) (local.get $u2)) (local.get $l17)))
          (local.set $y (f64x2.add (f64x2.mul (local.get $y) (local.get $u2)) (local.get $l15)))
          (local.set $y (f64x2.add (f64x2.mul (local.get $y) (local.get $u2)) (local.get $l13)))
          (local.set $y (f64x2.add (f64x2.mul (local.get $y) (local.get $u2)) (local.get $l11)))
          (local.set $y (f64x2.add (f64x2.mul (local.get $y) (local.get $u2)) (local.get $l9)))
          (local.set $y (f64x2.add (f64x2.mul (local.get $y) (local.get $u2)) (local.get $l7)))
          (local.set $y (f64x2.add (f64x2.mul (local.get $y) (local.get $u2)) (local.get $l5)))
          (local.set $y (f64x2.add (f64x2.mul (local.get $y) (local.get $u2)) (local.get $l3)))
          (local.set $y (f64x2.add (f64x2.mul (local.get $y) (local.get $u2)) (local.get $kOne)))
          (local.set $y (f64x2.add (f64x2.mul (local.get $ex) (local.get $kLn2Hi))
            (f64x2.add (f64x2.mul (local.get $ex) (local.get $kLn2Lo))
              (f64x2.mul (f64x2.add (local.get $u) (local.get $u)) (local.get $y)))))
          (if (local.get $lnOfQ) (then
            (local.set $logq (v128.bitselect (local.get $logq) (local.get $y) (local.get $small)))
            (local.set $lnOfQ (i32.const 0))
            (local.set $lnOf (local.get $m))
            (br $ln))))
        (local.set $qlogq (f64x2.add (local.get $qlogq) (f64x2.mul (local.get $q) (local.get $logq))))
        (local.set $mlogm (f64x2.add (local.get $mlogm) (f64x2.mul (local.get $m) (local.get $y))))
        (local.set $i (i32.add (local.get $i) (i32.const 8)))
        (br $l)))
      ;; 0.5 (sum p ln p + sum q ln q) - sum m ln m, at least 0
      (local.set $total (f64.sub
        (f64.mul (f64.const 0.5) (f64.add (f64.load (local.get $plogp))
          (f64.add (f64x2.extract_lane 0 (local.get $qlogq)) (f64x2.extract_lane 1 (local.get $qlogq)))))
        (f64.add (f64x2.extract_lane 0 (local.get $mlogm)) (f64x2.extract_lane 1 (local.get $mlogm)))))
      (f64.store (local.get $out) (f64.max (f64.const 0) (local.get $total)))
      (local.set $p (i32.add (local.get $p) (local.get $bytes)))
      (local.set $cond (i32.add (local.get $cond) (local.get $bytes)))
      (local.set $plogp (i32.add (local.get $plogp) (i32.const 8)))
      (local.set $out (i32.add (local.get $out) (i32.const 8)))
      (local.set $rows (i32.sub (local.get $rows) (i32.const 1)))
      (br $nextRow))))
)
