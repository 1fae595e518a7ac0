// Kernels of a simulated dense layer (`ReLU(x Wᵀ + b)`) and of the direction spec of
// `firmware_protocol::direction` (its module docs are normative; every step below follows them
// operation for operation, so that a driver that rounds each f32 operation as IEEE does, such
// as lavapipe, gives the same bits as the host).
//
// The f32 constants of the spec (`F_*`) are prepended by `kernels.rs` as exact hex literals.

struct Params {
    n_in: u32,
    n_out: u32,
    batch: u32,
    // Directions of the chunk, the chunk's first flat parameter and its length.
    p_count: u32,
    chunk_start: u32,
    chunk_len: u32,
    // The chunk's part in W (flat indices [w_start, w_end)) and its rows of W.
    w_start: u32,
    w_end: u32,
    rows_start: u32,
    rows_len: u32,
    // The outputs the chunk touches, and the part of them its bias covers [bias_start, bias_end).
    out_start: u32,
    out_len: u32,
    bias_start: u32,
    bias_end: u32,
    // Columns of z0 gathered after the pairs (the host's copy of them is stale).
    cols_start: u32,
    cols_len: u32,
    eps: f32,
    scale: f32,
    // Where `gather` writes its columns in `out`.
    gather_at: u32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> prm: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<f32>;
@group(0) @binding(3) var<storage, read_write> z0: array<f32>;
@group(0) @binding(4) var<storage, read_write> dirs: array<f32>;
@group(0) @binding(5) var<storage, read_write> dz: array<f32>;
@group(0) @binding(6) var<storage, read_write> out: array<f32>;
// [seeds: 2P u32 (lo, hi)] [derivatives: P f32 bits] [inverse norms: P f32 bits] [degenerate: P]
@group(0) @binding(7) var<storage, read_write> aux: array<u32>;

const WG: u32 = 64u;

fn flat_index(gid: vec3<u32>, groups: vec3<u32>) -> u32 {
    return gid.y * groups.x * WG + gid.x;
}

// ---- 64-bit integers as (lo, hi) pairs: what SplitMix64 needs ----

fn mul_wide(a: u32, b: u32) -> vec2<u32> {
    let a0 = a & 0xFFFFu;
    let a1 = a >> 16u;
    let b0 = b & 0xFFFFu;
    let b1 = b >> 16u;
    let p00 = a0 * b0;
    let p01 = a0 * b1;
    let p10 = a1 * b0;
    let p11 = a1 * b1;
    let mid = (p00 >> 16u) + (p01 & 0xFFFFu) + (p10 & 0xFFFFu);
    let lo = (p00 & 0xFFFFu) | (mid << 16u);
    let hi = p11 + (p01 >> 16u) + (p10 >> 16u) + (mid >> 16u);
    return vec2<u32>(lo, hi);
}

fn mul64(a: vec2<u32>, b: vec2<u32>) -> vec2<u32> {
    let w = mul_wide(a.x, b.x);
    return vec2<u32>(w.x, w.y + a.x * b.y + a.y * b.x);
}

fn add64(a: vec2<u32>, b: vec2<u32>) -> vec2<u32> {
    let lo = a.x + b.x;
    let carry = select(0u, 1u, lo < a.x);
    return vec2<u32>(lo, a.y + b.y + carry);
}

// `z ^ (z >> n)` for 0 < n < 32.
fn xor_shr(z: vec2<u32>, n: u32) -> vec2<u32> {
    let lo = (z.x >> n) | (z.y << (32u - n));
    let hi = z.y >> n;
    return vec2<u32>(z.x ^ lo, z.y ^ hi);
}

// The SplitMix64 output function.
fn mix64(z0_: vec2<u32>) -> vec2<u32> {
    var z = xor_shr(z0_, 30u);
    z = mul64(z, vec2<u32>(0x1CE4E5B9u, 0xBF58476Du));
    z = xor_shr(z, 27u);
    z = mul64(z, vec2<u32>(0x133111EBu, 0x94D049BBu));
    return xor_shr(z, 31u);
}

// ---- the direction spec, steps 2 and 3 ----

fn ln_u1(k1: u32) -> f32 {
    let xf = f32(k1 + 1u);
    let bits = bitcast<u32>(xf);
    var e = i32(bits >> 23u) - 127;
    var m = bitcast<f32>((bits & 0x007FFFFFu) | 0x3F800000u);
    let big = m > F_SQRT_2;
    if big {
        m = m * 0.5;
        e = e + 1;
    }
    let t = (m - 1.0) / (m + 1.0);
    let t2 = t * t;
    let series = 1.0 + t2 * (F_THIRD + t2 * (F_FIFTH + t2 * (F_SEVENTH + t2 * F_NINTH)));
    return f32(e - 24) * F_LN_2 + 2.0 * t * series;
}

fn sincos_turn(k2: u32) -> vec2<f32> {
    let q = k2 >> 22u;
    let theta = f32(k2 & 0x003FFFFFu) * F_QUARTER_STEP;
    let t2 = theta * theta;
    let s = theta
        * (1.0
            - t2 / 6.0
                * (1.0 - t2 / 20.0 * (1.0 - t2 / 42.0 * (1.0 - t2 / 72.0 * (1.0 - t2 / 110.0)))));
    let c = 1.0
        - t2 / 2.0
            * (1.0
                - t2 / 12.0
                    * (1.0
                        - t2 / 30.0 * (1.0 - t2 / 56.0 * (1.0 - t2 / 90.0 * (1.0 - t2 / 132.0)))));
    let swap = (q & 1u) == 1u;
    var xv = c;
    var yv = s;
    if swap {
        xv = s;
        yv = c;
    }
    if q == 1u || q == 2u {
        xv = -xv;
    }
    if q >= 2u {
        yv = -yv;
    }
    return vec2<f32>(xv, yv);
}

// Pair `i` of the stream of `seed`: values 2i and 2i + 1.
fn gaussian_pair(seed: vec2<u32>, i: u32) -> vec2<f32> {
    let gamma = vec2<u32>(0x7F4A7C15u, 0x9E3779B9u);
    let bits = mix64(add64(seed, mul64(vec2<u32>(i + 1u, 0u), gamma)));
    let k1 = bits.y >> 8u;
    let k2 = ((bits.x >> 8u) | (bits.y << 24u)) & 0x00FFFFFFu;
    let r = sqrt(-2.0 * ln_u1(k1));
    let cs = sincos_turn(k2);
    return vec2<f32>(r * cs.x, r * cs.y);
}

fn seed_of(p: u32) -> vec2<u32> {
    return vec2<u32>(aux[2u * p], aux[2u * p + 1u]);
}

// dirs[p * chunk_len + j]: the raw values z_j of direction p.
@compute @workgroup_size(64)
fn generate(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let pairs = (prm.chunk_len + 1u) / 2u;
    let id = flat_index(gid, groups);
    if id >= pairs * prm.p_count {
        return;
    }
    let p = id / pairs;
    let i = id % pairs;
    let v = gaussian_pair(seed_of(p), i);
    let at = p * prm.chunk_len + 2u * i;
    dirs[at] = v.x;
    if 2u * i + 1u < prm.chunk_len {
        dirs[at + 1u] = v.y;
    }
}

var<workgroup> lanes: array<f64, 8>;

// Step 4: one workgroup per direction, one invocation per lane of the f64 sum.
@compute @workgroup_size(8)
fn norm(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let p = wid.x;
    let lane = lid.x;
    var acc = f64(0.0);
    for (var j = lane; j < prm.chunk_len; j = j + 8u) {
        let z = f64(dirs[p * prm.chunk_len + j]);
        acc = acc + z * z;
    }
    lanes[lane] = acc;
    workgroupBarrier();
    if lane == 0u {
        var sum = f64(0.0);
        for (var l = 0u; l < 8u; l = l + 1u) {
            sum = sum + lanes[l];
        }
        let base = 3u * prm.p_count;
        if sum > f64(0.0) {
            let one = f64(1.0);
            aux[base + p] = bitcast<u32>(f32(one / sqrt(sum)));
            aux[base + prm.p_count + p] = 0u;
        } else {
            aux[base + p] = 0u;
            aux[base + prm.p_count + p] = 1u;
        }
    }
}

// Step 4, `v_j = z_j * inv` (or the first unit vector).
@compute @workgroup_size(64)
fn normalise(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let id = flat_index(gid, groups);
    if id >= prm.chunk_len * prm.p_count {
        return;
    }
    let p = id / prm.chunk_len;
    let j = id % prm.chunk_len;
    let base = 3u * prm.p_count;
    if aux[base + prm.p_count + p] == 1u {
        dirs[id] = select(0.0, 1.0, j == 0u);
    } else {
        dirs[id] = dirs[id] * bitcast<f32>(aux[base + p]);
    }
}

// z0 = x Wᵀ + b over every output.
@compute @workgroup_size(64)
fn preactivation(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let id = flat_index(gid, groups);
    if id >= prm.batch * prm.n_out {
        return;
    }
    let b = id / prm.n_out;
    let o = id % prm.n_out;
    var acc = 0.0;
    let xr = b * prm.n_in;
    let wr = o * prm.n_in;
    for (var i = 0u; i < prm.n_in; i = i + 1u) {
        acc = acc + x[xr + i] * w[wr + i];
    }
    z0[id] = w[prm.n_out * prm.n_in + o] + acc;
}

// dz[(b P + p) rows_len + r] = x_b · (row rows_start + r of v_p laid over W).
@compute @workgroup_size(64)
fn products(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let id = flat_index(gid, groups);
    let k = prm.rows_len;
    if id >= prm.batch * prm.p_count * k {
        return;
    }
    let r = id % k;
    let p = (id / k) % prm.p_count;
    let b = id / (k * prm.p_count);
    let row_flat = (prm.rows_start + r) * prm.n_in;
    let i_lo = max(prm.w_start, row_flat) - row_flat;
    let i_hi = min(prm.w_end, row_flat + prm.n_in) - row_flat;
    let v_at = p * prm.chunk_len + row_flat - prm.chunk_start;
    let xr = b * prm.n_in;
    var acc = 0.0;
    for (var i = i_lo; i < i_hi; i = i + 1u) {
        acc = acc + x[xr + i] * dirs[v_at + i];
    }
    dz[id] = acc;
}

// The product of direction p at (sample b, output o) and its bias part: zero where the chunk
// does not reach.
fn moved_by(p: u32, b: u32, o: u32) -> f32 {
    var d = 0.0;
    if o >= prm.rows_start && o < prm.rows_start + prm.rows_len {
        d = dz[(b * prm.p_count + p) * prm.rows_len + o - prm.rows_start];
    }
    var vb = 0.0;
    if o >= prm.bias_start && o < prm.bias_end {
        vb = dirs[p * prm.chunk_len + (prm.w_end - prm.w_start) + o - prm.bias_start];
    }
    return d + vb;
}

// out[((p 2 + s) batch + b) out_len + t] = ReLU(z0 ± eps (x v_pᵀ + v_bias)) on the touched outputs.
@compute @workgroup_size(64)
fn perturbed(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let id = flat_index(gid, groups);
    let t_len = prm.out_len;
    if id >= prm.p_count * 2u * prm.batch * t_len {
        return;
    }
    let t = id % t_len;
    let b = (id / t_len) % prm.batch;
    let s = (id / (t_len * prm.batch)) % 2u;
    let p = id / (t_len * prm.batch * 2u);
    let o = prm.out_start + t;
    let sign = select(1.0, -1.0, s == 1u);
    let a = z0[b * prm.n_out + o] + sign * prm.eps * moved_by(p, b, o);
    out[id] = max(a, 0.0);
}

// out[gather_at + b cols_len + c] = z0[b, cols_start + c]: the clean pre-activation the host's
// copy lacks.
@compute @workgroup_size(64)
fn gather(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let id = flat_index(gid, groups);
    if id >= prm.batch * prm.cols_len {
        return;
    }
    let c = id % prm.cols_len;
    let b = id / prm.cols_len;
    out[prm.gather_at + id] = z0[b * prm.n_out + prm.cols_start + c];
}

// After `W -= scale sum_p dd_p v_p` of the chunk just evaluated: z0 -= scale sum_p dd_p (x v_pᵀ).
@compute @workgroup_size(64)
fn move_clean(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let id = flat_index(gid, groups);
    if id >= prm.batch * prm.out_len {
        return;
    }
    let t = id % prm.out_len;
    let b = id / prm.out_len;
    let o = prm.out_start + t;
    var g = 0.0;
    for (var p = 0u; p < prm.p_count; p = p + 1u) {
        g = g + bitcast<f32>(aux[2u * prm.p_count + p]) * moved_by(p, b, o);
    }
    z0[b * prm.n_out + o] = z0[b * prm.n_out + o] - prm.scale * g;
}
