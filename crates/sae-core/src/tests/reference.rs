//! A plain dense f64 reference of every architecture's loss and gradients: straightforward
//! loops over all latents, no sparsity tricks. `frozen` holds the stop-gradient copies
//! (Gated's auxiliary decoder; the detached residual of AuxK), so finite differences of
//! `loss(live, frozen)` w.r.t. `live` are the gradients the trainer must produce.

#![allow(clippy::needless_range_loop)]

use crate::arch::ArchKind;

#[derive(Clone, Debug)]
pub struct RefParams {
    pub w_enc_t: Vec<f64>,
    pub w_dec: Vec<f64>,
    pub b_dec: Vec<f64>,
    /// Per-latent parameters in `Arch::param_names` order.
    pub lat: Vec<Vec<f64>>,
}

#[derive(Clone, Debug)]
pub struct RefCfg {
    pub arch: ArchKind,
    pub d_in: usize,
    pub d_sae: usize,
    pub k: usize,
    pub k_aux: usize,
    pub lambda: f64,
    pub alpha: f64,
    pub bandwidth: f64,
    pub dnorm: bool,
    pub apply_b_dec: bool,
    pub dead: Vec<usize>,
    /// Reconstruction heads: prefix widths ending at d_sae (empty: the whole dictionary).
    pub widths: Vec<usize>,
    /// vSAE: the KL coefficient, and the seed of the training noise (step 1's is used).
    pub beta: f64,
    pub noise_seed: u64,
    /// g-SAE: the loss gradient of each input row (`[n, d_in]`), read by the selection only
    /// (`beta` is then its weight).
    pub input_grad: Vec<f64>,
}

impl RefCfg {
    fn heads(&self) -> Vec<usize> {
        if self.widths.is_empty() {
            vec![self.d_sae]
        } else {
            self.widths.clone()
        }
    }
}

/// The code restricted to the first `w` latents.
fn prefix(code: &[f64], w: usize) -> Vec<f64> {
    code.iter()
        .enumerate()
        .map(|(j, v)| if j < w { *v } else { 0.0 })
        .collect()
}

struct Fwd {
    xc: Vec<Vec<f64>>,
    pre: Vec<Vec<f64>>,
    /// Code used by the reconstruction, and the auxiliary code.
    f: Vec<Vec<f64>>,
    a: Vec<Vec<f64>>,
}

fn dotf(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn row(w: &[f64], j: usize, d: usize) -> &[f64] {
    &w[j * d..(j + 1) * d]
}

/// Indices of the `k` largest values (ties: lower index first).
fn top_k(vals: &[(f64, usize)], k: usize) -> Vec<(f64, usize)> {
    let mut v = vals.to_vec();
    v.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap().then(a.1.cmp(&b.1)));
    v.truncate(k);
    v
}

/// Feature Choice's capacities for a batch of `n`: shares `n k (j+1)^-a / sum_i (i+1)^-a`
/// with the exponent a new SAE gets, rounded by largest remainder (ties: lower index) to sum
/// to `k n`, then at least one token each.
fn zipf_capacities(c: &RefCfg, n: usize) -> Vec<usize> {
    let settings = c
        .arch
        .family()
        .settings(c.k, c.d_sae, &Default::default())
        .unwrap();
    let a = settings["zipf_exponent"].as_f64().unwrap();
    let w: Vec<f64> = (1..=c.d_sae).map(|r| (r as f64).powf(-a)).collect();
    let total: f64 = w.iter().sum();
    let shares: Vec<f64> = w.iter().map(|v| (c.k * n) as f64 * v / total).collect();
    let mut caps: Vec<usize> = shares.iter().map(|s| s.floor() as usize).collect();
    let mut by_remainder: Vec<usize> = (0..c.d_sae).collect();
    by_remainder.sort_by(|&i, &j| {
        let (ri, rj) = (shares[i].fract(), shares[j].fract());
        rj.partial_cmp(&ri).unwrap().then(i.cmp(&j))
    });
    let left = c.k * n - caps.iter().sum::<usize>();
    for &j in &by_remainder[..left] {
        caps[j] += 1;
    }
    caps.iter().map(|&m| m.max(1)).collect()
}

fn forward(c: &RefCfg, p: &RefParams, x: &[f64], n: usize) -> Fwd {
    let (d_in, m) = (c.d_in, c.d_sae);
    let mut out = Fwd {
        xc: vec![],
        pre: vec![],
        f: vec![],
        a: vec![],
    };
    for b in 0..n {
        let xb = &x[b * d_in..(b + 1) * d_in];
        let xc: Vec<f64> = (0..d_in)
            .map(|i| xb[i] - if c.apply_b_dec { p.b_dec[i] } else { 0.0 })
            .collect();
        let pre: Vec<f64> = (0..m)
            .map(|j| dotf(row(&p.w_enc_t, j, d_in), &xc))
            .collect();
        out.xc.push(xc);
        out.pre.push(pre);
    }
    // BatchTopK: the (k*n)-th largest positive value over the batch.
    let mut batch_t = 0.0;
    if matches!(c.arch.as_str(), "batchtopk" | "matryoshka" | "mutualchoice") {
        let mut all: Vec<f64> = out
            .pre
            .iter()
            .flat_map(|pr| (0..m).map(move |j| pr[j]))
            .enumerate()
            .map(|(i, v)| v + p.lat[0][i % m])
            .filter(|v| *v > 0.0)
            .collect();
        all.sort_by(|a, b| b.partial_cmp(a).unwrap());
        batch_t = if all.len() >= c.k * n {
            all[c.k * n - 1]
        } else {
            *all.last().unwrap_or(&0.0)
        };
    }
    // Feature Choice: each latent's cut-off, its capacity-th largest positive value over the
    // batch (capacities from the exponent a new SAE gets).
    let mut column_cut = vec![f64::INFINITY; m];
    if c.arch.as_str() == "featurechoice" {
        let caps = zipf_capacities(c, n);
        for j in 0..m {
            let mut col: Vec<f64> = (0..n)
                .map(|b| out.pre[b][j] + p.lat[0][j])
                .filter(|v| *v > 0.0)
                .collect();
            col.sort_by(|a, b| b.partial_cmp(a).unwrap());
            if let Some(v) = col.get(caps[j].min(col.len()).wrapping_sub(1)) {
                column_cut[j] = *v;
            }
        }
    }
    for b in 0..n {
        let pre = &out.pre[b];
        let mut f = vec![0.0; m];
        let mut a = vec![0.0; m];
        match c.arch.as_str() {
            "gated" => {
                for j in 0..m {
                    let pg = pre[j] + p.lat[0][j];
                    let pm = p.lat[1][j].exp() * pre[j] + p.lat[2][j];
                    if pg > 0.0 {
                        f[j] = pm.max(0.0);
                        a[j] = pg;
                    }
                }
            }
            "relu" | "gba" => {
                for j in 0..m {
                    f[j] = (pre[j] + p.lat[0][j]).max(0.0);
                }
            }
            "jumprelu" => {
                for j in 0..m {
                    let pi = pre[j] + p.lat[0][j];
                    if pi > p.lat[1][j].exp() {
                        f[j] = pi;
                    }
                }
            }
            "topk" | "batchtopk" | "matryoshka" | "mutualchoice" | "vsae" => {
                // vSAE selects on mu + eps, the noise of the trainer's first step.
                let mut eps = vec![0.0f32; m];
                if c.arch.as_str() == "vsae" {
                    crate::trainer::noise::add_gaussian_row(
                        c.noise_seed,
                        1,
                        b as u64,
                        1.0,
                        &mut eps,
                    );
                }
                let vals: Vec<(f64, usize)> = (0..m)
                    .map(|j| (pre[j] + p.lat[0][j] + eps[j] as f64, j))
                    .collect();
                if matches!(c.arch.as_str(), "topk" | "vsae") {
                    for (v, j) in top_k(&vals, c.k) {
                        f[j] = v.max(0.0);
                    }
                } else {
                    for &(v, j) in &vals {
                        if v >= batch_t && v > 0.0 {
                            f[j] = v;
                        }
                    }
                }
                let dead_vals: Vec<(f64, usize)> = c.dead.iter().map(|&j| vals[j]).collect();
                for (v, j) in top_k(&dead_vals, c.k_aux) {
                    a[j] = v.max(0.0);
                }
            }
            "gsae" => {
                let g = &c.input_grad[b * d_in..(b + 1) * d_in];
                let z: Vec<f64> = (0..m).map(|j| pre[j] + p.lat[0][j]).collect();
                let score: Vec<(f64, usize)> = (0..m)
                    .map(|j| {
                        let u = dotf(row(&p.w_dec, j, d_in), g).abs();
                        (z[j] + c.beta * z[j] * u, j)
                    })
                    .collect();
                for (s, j) in top_k(&score, c.k) {
                    if s > 0.0 {
                        f[j] = z[j];
                    }
                }
                let dead_vals: Vec<(f64, usize)> = c.dead.iter().map(|&j| (z[j], j)).collect();
                for (v, j) in top_k(&dead_vals, c.k_aux) {
                    a[j] = v.max(0.0);
                }
            }
            "featurechoice" => {
                for j in 0..m {
                    let v = pre[j] + p.lat[0][j];
                    if v > 0.0 && v >= column_cut[j] {
                        f[j] = v;
                    }
                }
            }
            other => panic!("no dense reference for {other}"),
        }
        out.f.push(f);
        out.a.push(a);
    }
    out
}

fn decode(c: &RefCfg, w_dec: &[f64], bias: Option<&[f64]>, code: &[f64]) -> Vec<f64> {
    let mut y: Vec<f64> = match bias {
        Some(b) => b.to_vec(),
        None => vec![0.0; c.d_in],
    };
    for (j, &v) in code.iter().enumerate() {
        if v != 0.0 {
            for i in 0..c.d_in {
                y[i] += v * w_dec[j * c.d_in + i];
            }
        }
    }
    y
}

/// AuxK's detached residuals e_b = x_b - x_hat_b (from `frozen`) and their variance sum.
fn auxk_target(c: &RefCfg, frozen: &RefParams, x: &[f64], n: usize) -> (Vec<Vec<f64>>, f64) {
    let fw = forward(c, frozen, x, n);
    let e: Vec<Vec<f64>> = (0..n)
        .map(|b| {
            let xh = decode(c, &frozen.w_dec, Some(&frozen.b_dec), &fw.f[b]);
            (0..c.d_in).map(|i| x[b * c.d_in + i] - xh[i]).collect()
        })
        .collect();
    let mean: Vec<f64> = (0..c.d_in)
        .map(|i| e.iter().map(|r| r[i]).sum::<f64>() / n as f64)
        .collect();
    let denom = e
        .iter()
        .map(|r| (0..c.d_in).map(|i| (r[i] - mean[i]).powi(2)).sum::<f64>())
        .sum();
    (e, denom)
}

fn sq(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
}

/// Matching pursuit, naively: every step correlates the residual with every atom of the
/// dictionary (which is also the encoder). Per row: `(atom, coefficient, residual before the
/// step)` of each step, and the final residual.
#[allow(clippy::type_complexity)]
fn mp_forward(
    c: &RefCfg,
    p: &RefParams,
    x: &[f64],
    n: usize,
) -> Vec<(Vec<(usize, f64, Vec<f64>)>, Vec<f64>)> {
    let d_in = c.d_in;
    (0..n)
        .map(|b| {
            let mut r: Vec<f64> = (0..d_in).map(|i| x[b * d_in + i] - p.b_dec[i]).collect();
            let mut steps = Vec::new();
            for _ in 0..c.k {
                let (mut best, mut bj) = (0.0, usize::MAX);
                for j in 0..c.d_sae {
                    let v = dotf(row(&p.w_dec, j, d_in), &r);
                    if v > best {
                        best = v;
                        bj = j;
                    }
                }
                if bj == usize::MAX {
                    break;
                }
                steps.push((bj, best, r.clone()));
                for i in 0..d_in {
                    r[i] -= best * p.w_dec[bj * d_in + i];
                }
            }
            (steps, r)
        })
        .collect()
}

/// The atoms each row's pursuit chose.
pub fn mp_steps(c: &RefCfg, p: &RefParams, x: &[f64], n: usize) -> Vec<Vec<usize>> {
    mp_forward(c, p, x, n)
        .into_iter()
        .map(|(s, _)| s.into_iter().map(|t| t.0).collect())
        .collect()
}

fn mp_loss(c: &RefCfg, p: &RefParams, x: &[f64], n: usize) -> f64 {
    let rows = mp_forward(c, p, x, n);
    rows.iter().map(|(_, r)| dotf(r, r)).sum::<f64>() / n as f64
}

/// Backpropagation through the unrolled pursuit with the stored residuals.
fn mp_grads(c: &RefCfg, p: &RefParams, x: &[f64], n: usize) -> RefParams {
    let d_in = c.d_in;
    let mut g = RefParams {
        w_enc_t: vec![0.0; c.d_sae * d_in],
        w_dec: vec![0.0; c.d_sae * d_in],
        b_dec: vec![0.0; d_in],
        lat: Vec::new(),
    };
    for (steps, r) in mp_forward(c, p, x, n) {
        let mut gr: Vec<f64> = r.iter().map(|v| 2.0 * v / n as f64).collect();
        for (j, coef, r_before) in steps.iter().rev() {
            let d = row(&p.w_dec, *j, d_in).to_vec();
            let gc = -dotf(&gr, &d);
            for i in 0..d_in {
                g.w_dec[j * d_in + i] += -coef * gr[i] + gc * r_before[i];
            }
            for i in 0..d_in {
                gr[i] += gc * d[i];
            }
        }
        for i in 0..d_in {
            g.b_dec[i] -= gr[i];
        }
    }
    g
}

/// The full loss (mean over tokens), `frozen` supplying the stop-gradient copies.
pub fn loss(c: &RefCfg, live: &RefParams, frozen: &RefParams, x: &[f64], n: usize) -> f64 {
    if c.arch.as_str() == "mp" {
        return mp_loss(c, live, x, n);
    }
    let d_in = c.d_in;
    let fw = forward(c, live, x, n);
    let nf = n as f64;
    let mut total = 0.0;
    let auxk = c.arch.uses_k();
    let (e, denom) = if auxk {
        auxk_target(c, frozen, x, n)
    } else {
        (vec![], 0.0)
    };
    for b in 0..n {
        let xb = &x[b * d_in..(b + 1) * d_in];
        for w in c.heads() {
            let xh = decode(c, &live.w_dec, Some(&live.b_dec), &prefix(&fw.f[b], w));
            total += sq(&xh, xb) / nf;
        }
        match c.arch.as_str() {
            "gated" => {
                total += c.lambda * fw.a[b].iter().sum::<f64>() / nf;
                let xa = decode(c, &frozen.w_dec, Some(&frozen.b_dec), &fw.a[b]);
                total += sq(&xa, xb) / nf;
            }
            "relu" => {
                for j in 0..c.d_sae {
                    let w = if c.dnorm {
                        dotf(row(&live.w_dec, j, d_in), row(&live.w_dec, j, d_in)).sqrt()
                    } else {
                        1.0
                    };
                    total += c.lambda * fw.f[b][j] * w / nf;
                }
            }
            "jumprelu" => {
                let l0 = fw.f[b].iter().filter(|v| **v != 0.0).count() as f64;
                total += c.lambda * l0 / nf;
            }
            "topk" | "batchtopk" | "matryoshka" | "mutualchoice" | "vsae" | "gsae" => {
                if !c.dead.is_empty() && denom > 0.0 {
                    let eh = decode(c, &live.w_dec, None, &fw.a[b]);
                    total += c.alpha * sq(&eh, &e[b]) / denom;
                }
                // KL(N(mu, I) || N(0, I)) over every latent, mu without the noise.
                if c.arch.as_str() == "vsae" {
                    for j in 0..c.d_sae {
                        let mu = fw.pre[b][j] + live.lat[0][j];
                        total += c.beta * 0.5 * mu * mu / nf;
                    }
                }
            }
            // No sparsity penalty.
            "featurechoice" | "gba" => {}
            other => panic!("no dense reference for {other}"),
        }
    }
    total
}

/// Hand-derived gradients of `loss(p, p)` w.r.t. the live parameters (the JumpReLU threshold
/// gets the paper's straight-through pseudo-gradient).
pub fn grads(c: &RefCfg, p: &RefParams, x: &[f64], n: usize) -> RefParams {
    if c.arch.as_str() == "mp" {
        return mp_grads(c, p, x, n);
    }
    let (d_in, m) = (c.d_in, c.d_sae);
    let nf = n as f64;
    let fw = forward(c, p, x, n);
    let mut g = RefParams {
        w_enc_t: vec![0.0; m * d_in],
        w_dec: vec![0.0; m * d_in],
        b_dec: vec![0.0; d_in],
        lat: p.lat.iter().map(|v| vec![0.0; v.len()]).collect(),
    };
    let auxk = c.arch.uses_k();
    let (e, denom) = if auxk {
        auxk_target(c, p, x, n)
    } else {
        (vec![], 0.0)
    };
    let aux_on = auxk && !c.dead.is_empty() && denom > 0.0;
    for b in 0..n {
        let xb = &x[b * d_in..(b + 1) * d_in];
        // d loss / d x_hat of each head.
        let heads = c.heads();
        let rs: Vec<Vec<f64>> = heads
            .iter()
            .map(|&w| {
                let xh = decode(c, &p.w_dec, Some(&p.b_dec), &prefix(&fw.f[b], w));
                (0..d_in).map(|i| 2.0 * (xh[i] - xb[i]) / nf).collect()
            })
            .collect();
        for r in &rs {
            for i in 0..d_in {
                g.b_dec[i] += r[i];
            }
        }
        // Gradient w.r.t. the residual of the auxiliary reconstruction.
        let ra: Vec<f64> = match c.arch.as_str() {
            "gated" => {
                let xa = decode(c, &p.w_dec, Some(&p.b_dec), &fw.a[b]);
                (0..d_in).map(|i| 2.0 * (xa[i] - xb[i]) / nf).collect()
            }
            _ if aux_on => {
                let eh = decode(c, &p.w_dec, None, &fw.a[b]);
                (0..d_in)
                    .map(|i| 2.0 * c.alpha * (eh[i] - e[b][i]) / denom)
                    .collect()
            }
            _ => vec![0.0; d_in],
        };
        let mut dpre = vec![0.0; m];
        for j in 0..m {
            let d = row(&p.w_dec, j, d_in);
            let (f, a) = (fw.f[b][j], fw.a[b][j]);
            // Latent j reconstructs in every head that contains it.
            let mut r = vec![0.0; d_in];
            for (q, &w) in heads.iter().enumerate() {
                if j < w {
                    for i in 0..d_in {
                        r[i] += rs[q][i];
                    }
                }
            }
            let df = dotf(d, &r);
            let da = dotf(d, &ra);
            let pre = fw.pre[b][j];
            for i in 0..d_in {
                g.w_dec[j * d_in + i] += f * r[i];
                if auxk {
                    g.w_dec[j * d_in + i] += a * ra[i];
                }
            }
            match c.arch.as_str() {
                "gated" => {
                    let pg = pre + p.lat[0][j];
                    let s = p.lat[1][j].exp();
                    let pm = s * pre + p.lat[2][j];
                    if pg > 0.0 {
                        let g_mag = if pm > 0.0 { df } else { 0.0 };
                        let g_gate = da + c.lambda / nf;
                        dpre[j] = g_gate + s * g_mag;
                        g.lat[0][j] += g_gate;
                        g.lat[1][j] += g_mag * s * pre;
                        g.lat[2][j] += g_mag;
                    }
                }
                "relu" => {
                    if f > 0.0 {
                        let nrm = dotf(d, d).sqrt();
                        let w = if c.dnorm { nrm } else { 1.0 };
                        dpre[j] = df + c.lambda * w / nf;
                        g.lat[0][j] += dpre[j];
                        if c.dnorm {
                            for i in 0..d_in {
                                g.w_dec[j * d_in + i] += c.lambda * f * d[i] / nrm / nf;
                            }
                        }
                    }
                }
                "jumprelu" => {
                    let pi = pre + p.lat[0][j];
                    let theta = p.lat[1][j].exp();
                    if pi > theta {
                        dpre[j] = df;
                        g.lat[0][j] += df;
                    }
                    let u = (pi - theta) / c.bandwidth;
                    if u.abs() < 0.5 {
                        let gt = -(theta / c.bandwidth) * df - c.lambda / nf / c.bandwidth;
                        g.lat[1][j] += gt * theta;
                    }
                }
                "topk" | "batchtopk" | "matryoshka" | "mutualchoice" | "vsae" | "gsae" => {
                    if f > 0.0 {
                        dpre[j] += df;
                    }
                    if a > 0.0 {
                        dpre[j] += da;
                    }
                    if c.arch.as_str() == "vsae" {
                        dpre[j] += c.beta * (pre + p.lat[0][j]) / nf;
                    }
                    g.lat[0][j] += dpre[j];
                }
                // The threshold is an inference estimate: no gradient.
                "featurechoice" => {
                    if f > 0.0 {
                        dpre[j] = df;
                        g.lat[0][j] += df;
                    }
                }
                // The bias is set outside gradient descent: no gradient.
                "gba" => {
                    if f > 0.0 {
                        dpre[j] = df;
                    }
                }
                other => panic!("no dense reference for {other}"),
            }
        }
        for j in 0..m {
            for i in 0..d_in {
                g.w_enc_t[j * d_in + i] += dpre[j] * fw.xc[b][i];
                if c.apply_b_dec {
                    g.b_dec[i] -= dpre[j] * p.w_enc_t[j * d_in + i];
                }
            }
        }
    }
    g
}
