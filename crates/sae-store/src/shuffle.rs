//! Shuffled batches over all rows of a store.
//!
//! Each epoch visits every row once in the order of a seeded pseudo-random permutation. The
//! permutation is a keyed Feistel network on the next power of four above the row count with
//! cycle-walking, so it needs O(1) memory, and the position in the stream is just
//! (epoch, index): saving and restoring it makes a resumed run see the same batches.

use crate::reader::ActivationStore;
use anyhow::Result;

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A bijection of `0..n` chosen by `key`.
#[derive(Clone, Debug)]
pub struct Permutation {
    n: u64,
    half_bits: u32,
    keys: [u64; 4],
}

impl Permutation {
    pub fn new(n: u64, key: u64) -> Self {
        let bits = 64 - n.saturating_sub(1).leading_zeros();
        let half_bits = bits.div_ceil(2).max(1);
        let mut keys = [0u64; 4];
        let mut s = key;
        for k in &mut keys {
            s = splitmix64(s);
            *k = s;
        }
        Permutation { n, half_bits, keys }
    }

    fn feistel(&self, x: u64) -> u64 {
        let mask = (1u64 << self.half_bits) - 1;
        let (mut l, mut r) = (x >> self.half_bits, x & mask);
        for k in self.keys {
            let f = splitmix64(r ^ k) & mask;
            (l, r) = (r, l ^ f);
        }
        (l << self.half_bits) | r
    }

    /// The image of `i < n`.
    pub fn get(&self, i: u64) -> u64 {
        debug_assert!(i < self.n);
        // The network permutes 0..4^half_bits (< 4n); walk until we land inside 0..n.
        let mut x = self.feistel(i);
        while x >= self.n {
            x = self.feistel(x);
        }
        x
    }
}

/// Row order of a batch stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Order {
    Shuffled,
    Sequential,
}

/// Where a stream is: epoch and rows already taken within it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StreamPosition {
    pub epoch: u64,
    pub index: u64,
}

/// Endless `[batch, d_in]` f32 batches from a store, epoch after epoch.
pub struct BatchStream {
    store: ActivationStore,
    order: Order,
    seed: u64,
    pos: StreamPosition,
    perm: Permutation,
    rows: Vec<u64>,
    /// The loss gradient of every row, when the store has them and they were asked for.
    grads: Option<ActivationStore>,
}

/// A distinct key for the initialisation sample so it does not follow the training order.
const SAMPLE_KEY: u64 = 0x0005_a3c0_ffee_1234;

impl BatchStream {
    pub fn new(store: ActivationStore, order: Order, seed: u64) -> Self {
        let perm = Permutation::new(store.n_rows(), epoch_key(seed, 0));
        BatchStream {
            store,
            order,
            seed,
            pos: StreamPosition::default(),
            perm,
            rows: Vec::new(),
            grads: None,
        }
    }

    /// Also reads each row's loss gradient from `grads` (the same rows: see
    /// [`ActivationStore::open_grads`]) in [`BatchStream::next_batch_with_grads`].
    pub fn attach_grads(&mut self, grads: ActivationStore) -> Result<()> {
        if grads.n_rows() != self.store.n_rows() || grads.d_in() != self.store.d_in() {
            anyhow::bail!(
                "{}: the gradients hold [{}, {}] but the activations [{}, {}]; re-harvest the \
                 store with sae harvest --with-grad",
                grads.root.display(),
                grads.n_rows(),
                grads.d_in(),
                self.store.n_rows(),
                self.store.d_in()
            );
        }
        self.grads = Some(grads);
        Ok(())
    }

    pub fn has_grads(&self) -> bool {
        self.grads.is_some()
    }

    pub fn store(&self) -> &ActivationStore {
        &self.store
    }

    pub fn d_in(&self) -> usize {
        self.store.d_in()
    }

    pub fn position(&self) -> StreamPosition {
        self.pos
    }

    pub fn seek(&mut self, pos: StreamPosition) {
        let n = self.store.n_rows();
        // Positions come from checkpoint files; a corrupt one must not overflow.
        self.pos = StreamPosition {
            epoch: pos.epoch.saturating_add(pos.index / n),
            index: pos.index % n,
        };
        self.perm = Permutation::new(n, epoch_key(self.seed, self.pos.epoch));
    }

    /// Fills `out` (`[n, d_in]`) with the next `n` rows, starting a new epoch when needed.
    pub fn next_batch(&mut self, out: &mut [f32], n: usize) -> Result<()> {
        self.advance(n);
        self.store.read_rows(&self.rows, out)
    }

    /// `next_batch`, and the same rows' loss gradients into `grads` (`[n, d_in]`); an error
    /// without [`BatchStream::attach_grads`].
    pub fn next_batch_with_grads(
        &mut self,
        out: &mut [f32],
        grads: &mut [f32],
        n: usize,
    ) -> Result<()> {
        if self.grads.is_none() {
            anyhow::bail!("{}: no gradients attached", self.store.root.display());
        }
        self.advance(n);
        let g = self.grads.as_ref().expect("checked above");
        self.store.read_rows(&self.rows, out)?;
        g.read_rows(&self.rows, grads)
    }

    /// The next `n` row indices into `self.rows`.
    fn advance(&mut self, n: usize) {
        let total = self.store.n_rows();
        self.rows.clear();
        while self.rows.len() < n {
            let i = self.pos.index;
            self.rows.push(match self.order {
                Order::Shuffled => self.perm.get(i),
                Order::Sequential => i,
            });
            self.pos.index += 1;
            if self.pos.index == total {
                self.seek(StreamPosition {
                    epoch: self.pos.epoch.saturating_add(1),
                    index: 0,
                });
            }
        }
    }

    /// `n` rows drawn without replacement (while `n` <= rows) in an order independent of the
    /// training stream; the stream position does not move.
    pub fn sample(&self, out: &mut [f32], n: usize) -> Result<()> {
        let total = self.store.n_rows();
        let perm = Permutation::new(total, self.seed ^ SAMPLE_KEY);
        let rows: Vec<u64> = (0..n as u64).map(|i| perm.get(i % total)).collect();
        self.store.read_rows(&rows, out)
    }
}

fn epoch_key(seed: u64, epoch: u64) -> u64 {
    splitmix64(seed ^ splitmix64(epoch.wrapping_add(0x51ed)))
}
