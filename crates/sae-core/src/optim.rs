//! Adam, applied row by row so that the trainer can fuse it with the sparse gradient pass.
//!
//! With beta1 = 0 a zero gradient gives an exactly zero parameter update; only the second
//! moment decays (`v <- beta2 * v`). Rows without gradient are therefore skipped and their
//! decay is applied lazily (`v <- beta2^missed * v`) the next time they get a gradient, which
//! is the same value up to float rounding.

/// Per-step Adam constants.
#[derive(Clone, Copy, Debug)]
pub struct AdamStep {
    pub beta1: f32,
    pub beta2: f32,
    /// `lr * sqrt(1 - beta2^t) / (1 - beta1^t)`.
    pub step_size: f32,
    /// `eps * sqrt(1 - beta2^t)`: the PyTorch update `lr/bc1 * m / (sqrt(v/bc2) + eps)`
    /// rewritten with one division.
    pub eps_hat: f32,
}

impl AdamStep {
    /// Constants for step `t` (1-based).
    pub fn new(lr: f32, beta1: f32, beta2: f32, eps: f32, t: u64) -> Self {
        let bc1 = 1.0 - (beta1 as f64).powf(t as f64);
        let bc2 = 1.0 - (beta2 as f64).powf(t as f64);
        AdamStep {
            beta1,
            beta2,
            step_size: (lr as f64 * bc2.sqrt() / bc1) as f32,
            eps_hat: (eps as f64 * bc2.sqrt()) as f32,
        }
    }

    /// `v <- beta2^missed * v` for a row skipped during `missed` steps.
    pub fn catch_up(&self, v: &mut [f32], missed: u64) {
        if missed > 0 {
            let decay = (self.beta2 as f64).powf(missed as f64) as f32;
            v.iter_mut().for_each(|x| *x *= decay);
        }
    }

    /// One Adam update of `p` with gradient `g`. `m` is empty when beta1 = 0.
    #[inline]
    pub fn update(&self, p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32]) {
        if m.is_empty() {
            adam_no_momentum(p, v, g, self.beta2, self.step_size, self.eps_hat);
        } else {
            adam_momentum(
                p,
                m,
                v,
                g,
                [self.beta1, self.beta2],
                self.step_size,
                self.eps_hat,
            );
        }
    }
}

crate::kernels::multiversion! {
    /// Adam with beta1 = 0: `v <- b2 v + (1 - b2) g^2; p -= step * g / (sqrt(v) + eps)`.
    pub fn adam_no_momentum(p: &mut [f32], v: &mut [f32], g: &[f32], b2: f32, step: f32, eps: f32) -> () {
        let c2 = 1.0 - b2;
        for ((pi, vi), &gi) in p.iter_mut().zip(v.iter_mut()).zip(g) {
            let vn = b2 * *vi + c2 * gi * gi;
            *vi = vn;
            *pi -= step * gi / (vn.sqrt() + eps);
        }
    }
}

crate::kernels::multiversion! {
    /// Adam with momentum.
    pub fn adam_momentum(
        p: &mut [f32],
        m: &mut [f32],
        v: &mut [f32],
        g: &[f32],
        betas: [f32; 2],
        step: f32,
        eps: f32
    ) -> () {
        let [b1, b2] = betas;
        let (c1, c2) = (1.0 - b1, 1.0 - b2);
        for (((pi, mi), vi), &gi) in p.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g) {
            let mn = b1 * *mi + c1 * gi;
            let vn = b2 * *vi + c2 * gi * gi;
            *mi = mn;
            *vi = vn;
            *pi -= step * mn / (vn.sqrt() + eps);
        }
    }
}

/// Adam moments of one parameter tensor (`m` empty when beta1 = 0).
#[derive(Clone, Debug, Default)]
pub struct Moments {
    pub m: Vec<f32>,
    pub v: Vec<f32>,
}

impl Moments {
    pub fn new(len: usize, beta1: f32) -> Self {
        Moments {
            m: if beta1 != 0.0 {
                vec![0.0; len]
            } else {
                Vec::new()
            },
            v: vec![0.0; len],
        }
    }
    /// The first-moment slice of a row (empty when beta1 = 0).
    pub fn m_row(&mut self, start: usize, len: usize) -> &mut [f32] {
        if self.m.is_empty() {
            &mut []
        } else {
            &mut self.m[start..start + len]
        }
    }
}
