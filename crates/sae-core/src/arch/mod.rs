//! One file per SAE family, each owning the whole life of its family: name and SAELens name,
//! per-latent parameters by name with their initial values, inference, the training rule,
//! the tensor mapping for save/load, defaults and its own options. [`REGISTRY`] lists them;
//! code outside this module asks the family instead of matching on it.
//!
//! A family has two halves:
//! * [`Family`]: everything about the saved SAE and its defaults;
//! * [`Arch`]: the training rule, built by [`Family::rule`]. The trainer owns the shared pieces
//!   (the dense encoder product, sparse decode, the residuals, the per-latent gradient pass and
//!   Adam); a rule says only
//!   * how one row of encoder pre-activations becomes sparse entries (`select_row`): each entry
//!     carries `f` (its coefficient in the reconstruction) and `a` (its coefficient in the
//!     auxiliary reconstruction, 0 when unused), plus the raw pre-activation for the backward
//!     pass;
//!   * how the loss gradients w.r.t. `f` and `a` of one entry become the gradient w.r.t. the
//!     pre-activation and w.r.t. its own per-latent parameters (`entry_backward`);
//!   * which reconstruction heads (nested prefixes of the dictionary) the loss sums;
//!   * what it computes from the whole batch before selection (`prepare_batch`), kept in a
//!     state of its own type that the trainer holds without reading.
//!
//! Every entry whose pre-activation gradient can be non-zero must be emitted, so the gradient
//! w.r.t. the pre-activations is exactly sparse on the emitted entries.

use std::any::Any;
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use crate::sae::{Invalid, Sae};
use crate::trainer::TrainHyper;
use rayon::prelude::*;

/// Declares the family modules and [`REGISTRY`] from one list: adding a family is its file
/// and its name here. Each module defines `KIND`, its registry handle.
macro_rules! registry {
    ($($family:ident),* $(,)?) => {
        $(pub(crate) mod $family;)*
        /// Every family this toolkit trains and loads, in the order help texts list them.
        pub const REGISTRY: &[ArchKind] = &[$($family::KIND),*];
    };
}

registry![
    gated,
    relu,
    topk,
    batchtopk,
    jumprelu,
    matryoshka,
    mp,
    mutualchoice,
    featurechoice,
    gba,
    vsae,
    gsae
];

/// Settings saved with an SAE that change its math (`k`, prefix widths, ...), under the
/// `sae_core` block of cfg.json. Each family says which keys it reads.
pub type Settings = BTreeMap<String, serde_json::Value>;

/// A per-latent parameter of a family: its name (the SAELens tensor name) and initial value.
#[derive(Clone, Copy, Debug)]
pub struct LatentParam {
    pub name: &'static str,
    pub init: f32,
}

/// How a saved tensor becomes a parameter on load (SAELens files spell some parameters
/// differently).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stored {
    /// The tensor is the parameter, `[d_sae]`.
    AsIs,
    /// The tensor holds the parameter's logarithm, `[d_sae]`.
    Log,
    /// The tensor holds one value for every latent (shape `[]` or `[1]`).
    Broadcast,
}

/// What sets a family's sparsity.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Sparsity {
    /// A penalty with a coefficient (`--l1`); `default` suits inputs scaled to norm sqrt(d_in).
    Penalty { default: f32 },
    /// The number of active latents per token (`--k`); no coefficient.
    K,
}

/// One family-specific option (`--arch-opt name=value`).
#[derive(Clone, Copy, Debug)]
pub struct OptionSpec {
    pub name: &'static str,
    pub help: &'static str,
}

/// A family's training options, resolved (defaults filled in), by name: the family's own small
/// serde struct as JSON, carried by [`TrainHyper::arch_opts`]. They shape training only, so
/// unlike [`Settings`] they are not saved with the SAE.
pub type TrainOpts = BTreeMap<String, serde_json::Value>;

/// What the text of a training option holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OptValue {
    /// A whole number >= 0.
    Count,
    /// A finite number (parsed as f32 directly, so `x=0.05` gives the bits of `0.05f32`).
    Number,
    /// `true` or `false`.
    Flag,
}

/// One training option of a family (`--arch-opt name=value`), not saved with the SAE.
#[derive(Clone, Copy, Debug)]
pub struct TrainOption {
    pub name: &'static str,
    pub value: OptValue,
    pub help: &'static str,
}

impl TrainOption {
    /// The option's JSON value from its text; the error names the option and what to write.
    pub fn parse(&self, text: &str) -> Result<serde_json::Value, String> {
        let (name, text) = (self.name, text.trim());
        match self.value {
            OptValue::Count => text
                .parse::<u64>()
                .map(serde_json::Value::from)
                .map_err(|_| {
                    format!("{name}: '{text}' is not a whole number >= 0; write e.g. {name}=64")
                }),
            OptValue::Number => match text.parse::<f32>() {
                Ok(v) if v.is_finite() => Ok(serde_json::Value::from(v)),
                _ => Err(format!(
                    "{name}: '{text}' is not a finite number; write e.g. {name}=0.05"
                )),
            },
            OptValue::Flag => text
                .parse::<bool>()
                .map(serde_json::Value::from)
                .map_err(|_| {
                    format!(
                        "{name}: '{text}' is not true or false; write {name}=true or {name}=false"
                    )
                }),
        }
    }
}

/// `T` with the options of `specs` that `given` holds set from their text, the rest at
/// `T`'s defaults (keys of `given` outside `specs` are left to the caller).
pub(crate) fn parse_train_opts<T>(
    specs: &[TrainOption],
    given: &BTreeMap<String, String>,
) -> Result<T, String>
where
    T: Default + serde::Serialize + serde::de::DeserializeOwned,
{
    let mut opts = train_opts_from(&T::default());
    for spec in specs {
        if let Some(text) = given.get(spec.name) {
            opts.insert(spec.name.to_string(), spec.parse(text)?);
        }
    }
    serde_json::from_value(serde_json::Value::Object(opts.into_iter().collect()))
        .map_err(|e| format!("training options: {e}"))
}

/// The JSON form of a family's options struct.
pub(crate) fn train_opts_from<T: serde::Serialize>(opts: &T) -> TrainOpts {
    match serde_json::to_value(opts) {
        Ok(serde_json::Value::Object(map)) => map.into_iter().collect(),
        _ => TrainOpts::new(),
    }
}

/// A family's options struct from `hyper.arch_opts` (defaults for the missing ones; keys of
/// other families are ignored). `arch_opts` comes from [`Family::train_opts`], which checked
/// it; a value of the wrong type is a programming error of the caller that built it.
pub(crate) fn train_opts_of<T>(hyper: &TrainHyper) -> T
where
    T: Default + serde::de::DeserializeOwned,
{
    if hyper.arch_opts.is_empty() {
        return T::default();
    }
    let map = hyper.arch_opts.clone().into_iter().collect();
    serde_json::from_value(serde_json::Value::Object(map)).unwrap_or_else(|e| {
        panic!("TrainHyper::arch_opts does not fit the family's options ({e}); build them with Family::train_opts")
    })
}

/// Everything about one SAE family except its training rule's arithmetic.
pub trait Family: Send + Sync + 'static {
    /// Our name: the `--arch` value and `sae_core.architecture` in cfg.json.
    fn name(&self) -> &'static str;
    /// One line for help texts.
    fn about(&self) -> &'static str;
    /// SAELens' `architecture` written to cfg.json (a family SAELens runs the same way at
    /// inference where SAELens has none of its own).
    fn saelens_name(&self) -> &'static str;
    /// SAELens `architecture` values read as this family when cfg.json has no `sae_core` block.
    fn saelens_reads(&self) -> &'static [&'static str];
    /// Keys of [`Settings`] this family saves and reads (under `sae_core` in cfg.json):
    /// `k` for the families whose sparsity is k.
    fn setting_keys(&self) -> &'static [&'static str] {
        match self.sparsity() {
            Sparsity::K => &["k"],
            Sparsity::Penalty { .. } => &[],
        }
    }
    /// Settings read from SAELens' own cfg.json keys when our `sae_core` block lacks them.
    fn settings_from_saelens(&self, _cfg: &serde_json::Value, _settings: &mut Settings) {}
    /// Per-latent parameters saved with the SAE, in order; the first is the encoder bias.
    fn latent_params(&self) -> &'static [LatentParam];
    /// Tensors that may hold parameter `name` on load, tried in order.
    fn stored_as(&self, name: &'static str) -> Vec<(&'static str, Stored)> {
        vec![(name, Stored::AsIs)]
    }
    /// Whether `b_dec` is subtracted from the input before encoding.
    fn apply_b_dec_to_input(&self) -> bool {
        true
    }
    fn sparsity(&self) -> Sparsity;
    /// Peak learning rate when none is given.
    fn default_lr(&self, d_sae: usize) -> f32;
    /// Steps over which the sparsity coefficient ramps up when none is given.
    fn default_sparsity_warmup(&self, _steps: u64, _hyper: &TrainHyper) -> u64 {
        0
    }
    /// Whether training computes `(x - b_dec) W_enc`, the product `TrainHyper::precision`
    /// sets (rules that pursue the residual do not).
    fn has_encoder_product(&self) -> bool {
        true
    }
    /// Whether dead-latent resampling (Bricken et al.) applies to this family.
    fn resamplable(&self) -> bool {
        false
    }
    /// Whether training needs the language model's loss gradient at every input row (its
    /// rule's `Arch::reads_input_grad`): sources must provide it.
    fn trains_on_input_grad(&self) -> bool {
        false
    }
    /// Whether SAELens' `rescale_acts_by_decoder_norm` applies to this family's files.
    fn reads_decoder_norm_rescale(&self) -> bool {
        false
    }
    /// The options of `--arch-opt`.
    fn options(&self) -> &'static [OptionSpec] {
        &[]
    }
    /// Settings of a new SAE from `k` (ignored by penalty families) and `--arch-opt` values.
    /// Errors name the option and what it should be.
    fn settings(
        &self,
        k: usize,
        _d_sae: usize,
        _opts: &BTreeMap<String, String>,
    ) -> Result<Settings, String> {
        Ok(match self.sparsity() {
            Sparsity::K => Settings::from([("k".to_string(), serde_json::json!(k))]),
            Sparsity::Penalty { .. } => Settings::new(),
        })
    }
    /// The training options of `--arch-opt` (read by the rule, not saved with the SAE).
    fn train_options(&self) -> &'static [TrainOption] {
        &[]
    }
    /// The resolved training options (every one of `train_options`, defaults filled in)
    /// from `--arch-opt` values; keys that are not training options are ignored. Errors name
    /// the option and what it should be.
    fn train_opts(
        &self,
        _d_sae: usize,
        _opts: &BTreeMap<String, String>,
    ) -> Result<TrainOpts, String> {
        Ok(TrainOpts::new())
    }
    /// Checks of the settings against the sizes (k in range, prefix widths, ...); reads no
    /// tensor.
    fn validate_settings(&self, sae: &Sae) -> Result<(), Invalid> {
        match self.sparsity() {
            Sparsity::K => validate_k(sae),
            Sparsity::Penalty { .. } => Ok(()),
        }
    }
    /// Checks of the parameters' values beyond finiteness (thresholds >= 0, ...).
    fn validate_params(&self, _sae: &Sae) -> Result<(), Invalid> {
        Ok(())
    }
    /// Extra top-level SAELens cfg.json keys.
    fn saelens_cfg(&self, _sae: &Sae, _cfg: &mut serde_json::Map<String, serde_json::Value>) {}
    /// Inference: the non-zero codes of one row of raw pre-activations `(x - b_dec) @ W_enc`.
    fn encode_row(&self, sae: &Sae, pre: &[f32], out: &mut RowCode);
    /// Inference codes of `n` rows from their raw pre-activations (`[n, d_sae]`); row by row
    /// with `encode_row` unless the family codes a batch at once.
    fn encode_pre(&self, sae: &Sae, pre: Vec<f32>, n: usize) -> crate::SparseCode {
        let d_sae = sae.d_sae;
        let rows: Vec<(Vec<u32>, Vec<f32>)> = pre
            .par_chunks(d_sae.max(1))
            .map_init(RowCode::default, |code, row| {
                code.idx.clear();
                code.val.clear();
                self.encode_row(sae, row, code);
                (code.idx.clone(), code.val.clone())
            })
            .collect();
        let mut code = crate::SparseCode {
            n_rows: n,
            d_sae,
            row_ptr: Vec::with_capacity(n + 1),
            idx: Vec::new(),
            val: Vec::new(),
        };
        code.row_ptr.push(0);
        for (i, v) in rows {
            code.idx.extend_from_slice(&i);
            code.val.extend_from_slice(&v);
            code.row_ptr.push(code.idx.len());
        }
        code
    }
    /// Codes of `n` rows of `x` in the family's training form where it differs from inference
    /// (BatchTopK's batch selection); `None` where inference is the training form.
    fn encode_batch(&self, _sae: &Sae, _x: &[f32], _n: usize) -> Option<crate::SparseCode> {
        None
    }
    /// Fold a training-time input scale into the weights (see [`Sae::fold_activation_scale`]).
    /// As SAELens: W_enc times `scale`, W_dec and b_dec divided by it, so feature activations
    /// and per-latent parameters stay those of training.
    fn fold_activation_scale(&self, sae: &mut Sae, scale: f32) {
        sae.w_enc.iter_mut().for_each(|w| *w *= scale);
        sae.w_dec.iter_mut().for_each(|w| *w /= scale);
        sae.b_dec.iter_mut().for_each(|b| *b /= scale);
    }
    /// Parameters that make about `l0` latents fire per token when the `l0`-th largest raw
    /// pre-activation is about `cutoff` (benchmarks set up trained-like sparsity this way).
    /// By default k = `l0` for the families whose sparsity is k; penalty families move their
    /// biases or thresholds instead and override this.
    fn set_sparsity(&self, sae: &mut Sae, l0: usize, _cutoff: f32) {
        if self.sparsity() == Sparsity::K {
            sae.settings
                .insert("k".into(), serde_json::json!(l0.clamp(1, sae.d_sae)));
        }
    }
    /// Data-dependent starting values of a fresh SAE from `sample` (rows of the training
    /// input, already scaled; b_dec is set), before training starts. Nothing by default.
    fn init_from_sample(&self, _sae: &mut Sae, _hyper: &TrainHyper, _sample: &[f32]) {}
    /// A note for the user before a fresh run of `steps` steps at `lr` starts, where the
    /// family can tell that the run is likely too short for its settings. None by default.
    fn start_note(&self, _hyper: &TrainHyper, _steps: u64, _lr: f32) -> Option<String> {
        None
    }
    /// The training rule of an SAE of this family.
    fn rule(&self, sae: &Sae, hyper: &TrainHyper) -> Box<dyn Arch>;
}

/// Codes of one row, reused across rows.
#[derive(Default)]
pub struct RowCode {
    pub idx: Vec<u32>,
    pub val: Vec<f32>,
    pub scratch: TopKScratch,
}

impl RowCode {
    /// Keeps positive values only.
    #[inline]
    pub fn push(&mut self, j: usize, v: f32) {
        if v > 0.0 {
            self.idx.push(j as u32);
            self.val.push(v);
        }
    }
}

/// A registered family: a copyable handle compared by name.
#[derive(Clone, Copy)]
pub struct ArchKind(&'static dyn Family);

impl ArchKind {
    pub fn family(self) -> &'static dyn Family {
        self.0
    }
    pub fn as_str(self) -> &'static str {
        self.0.name()
    }
    /// Every registered family.
    pub fn all() -> impl Iterator<Item = ArchKind> {
        REGISTRY.iter().copied()
    }
    /// The registered names, comma-separated (for error messages and help).
    pub fn names() -> String {
        Self::all()
            .map(ArchKind::as_str)
            .collect::<Vec<_>>()
            .join(", ")
    }
    pub fn uses_k(self) -> bool {
        self.0.sparsity() == Sparsity::K
    }
}

impl PartialEq for ArchKind {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}
impl Eq for ArchKind {}
impl std::hash::Hash for ArchKind {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.as_str().hash(h)
    }
}

impl fmt::Debug for ArchKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for ArchKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An unknown family name; the message lists the registered ones.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnknownArch(pub String);

impl fmt::Display for UnknownArch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "unknown architecture '{}': expected one of {}",
            self.0,
            ArchKind::names()
        )
    }
}

impl std::error::Error for UnknownArch {}

impl FromStr for ArchKind {
    type Err = UnknownArch;
    fn from_str(s: &str) -> Result<Self, UnknownArch> {
        let want = s.to_ascii_lowercase();
        ArchKind::all()
            .find(|a| a.as_str() == want)
            .ok_or_else(|| UnknownArch(s.to_string()))
    }
}

impl serde::Serialize for ArchKind {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> serde::Deserialize<'de> for ArchKind {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// `settings["k"]` as a count (0 when absent).
pub fn setting_usize(settings: &Settings, key: &str) -> usize {
    settings
        .get(key)
        .and_then(serde_json::Value::as_u64)
        .unwrap_or(0) as usize
}

/// Checks `1 <= k <= d_sae` for the families whose sparsity is k.
pub(crate) fn validate_k(sae: &Sae) -> Result<(), Invalid> {
    let k = sae.k();
    let arch = sae.arch;
    if k == 0 {
        return Err(Invalid::Config {
            key: "k",
            msg: format!("k is 0 or missing; a {arch} SAE needs k >= 1"),
        });
    }
    if k > sae.d_sae {
        return Err(Invalid::Config {
            key: "k",
            msg: format!(
                "k = {k} is more than d_sae = {}; a {arch} SAE keeps at most d_sae latents",
                sae.d_sae
            ),
        });
    }
    Ok(())
}

/// Checks that a threshold parameter is `>= 0` (training keeps it positive; a negative value
/// means the file is not what it claims).
pub(crate) fn validate_threshold(sae: &Sae, name: &'static str) -> Result<(), Invalid> {
    let t = sae.param(name);
    let negative = t.iter().filter(|t| **t < 0.0).count();
    if negative > 0 {
        let lowest = t.iter().cloned().fold(f32::INFINITY, f32::min);
        return Err(Invalid::Tensor {
            tensor: name,
            msg: format!(
                "{name} holds {negative} negative values (lowest {lowest}); a {} threshold \
                 is >= 0",
                sae.arch
            ),
            non_finite: false,
        });
    }
    Ok(())
}

/// JumpReLU inference (SAELens): `relu(pi) * 1[pi > threshold]`, `pi = pre + b_enc`.
pub(crate) fn encode_jumprelu_row(sae: &Sae, pre: &[f32], out: &mut RowCode) {
    let (b_enc, threshold) = (sae.param("b_enc"), sae.param("threshold"));
    for (j, &p) in pre.iter().enumerate() {
        let pi = p + b_enc[j];
        if pi > threshold[j] {
            out.push(j, pi);
        }
    }
}

/// How an architecture's auxiliary reconstruction (entries' `a` coefficients) enters the loss.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuxMode {
    /// No auxiliary term.
    None,
    /// Gated: `||x - (sg(W_dec) a + sg(b_dec))||^2`, decoder frozen (stop-gradient copy).
    FrozenDecoder,
    /// TopK/BatchTopK AuxK: `coeff * sum_b ||e_b - W_dec a_b||^2 / sum_b ||e_b - mean(e)||^2`
    /// with `e = x - x_hat` detached; the decoder is trained by it.
    AuxK,
}

/// A family's per-batch state: what its `Arch::prepare_batch` computes from the whole batch
/// before selection (a batch threshold, per-latent cut-offs, decoder norms). Only the family
/// knows its type; it reads it back with [`BatchRef::get`].
pub type BatchState = dyn Any + Send + Sync;

/// Where the trainer keeps a family's [`BatchState`] between steps (None until the family
/// makes one).
pub type BatchSlot = Option<Box<BatchState>>;

/// The state of type `T` in `slot`, a default one put there first when it holds none of
/// that type: the first step makes it, later steps reuse its buffers.
pub(crate) fn batch_state<T: Any + Send + Sync + Default>(slot: &mut BatchSlot) -> &mut T {
    if !slot.as_deref().is_some_and(|s| s.is::<T>()) {
        *slot = Some(Box::new(T::default()));
    }
    match slot.as_deref_mut().and_then(|s| s.downcast_mut::<T>()) {
        Some(state) => state,
        None => unreachable!("the slot was just given a {}", std::any::type_name::<T>()),
    }
}

/// Read access to a family's [`BatchState`] during a step.
#[derive(Clone, Copy, Default)]
pub struct BatchRef<'a>(Option<&'a BatchState>);

impl<'a> BatchRef<'a> {
    pub fn new(slot: &'a BatchSlot) -> Self {
        BatchRef(slot.as_deref())
    }
    /// The state as the family's own type. A rule that reads a state its `prepare_batch`
    /// does not make is a programming error, hence the panic.
    pub fn get<T: Any>(self) -> &'a T {
        match self.0.and_then(|s| s.downcast_ref::<T>()) {
            Some(state) => state,
            None => panic!(
                "no batch state of type {}: the rule's prepare_batch makes none",
                std::any::type_name::<T>()
            ),
        }
    }
}

/// What `Arch::prepare_batch` may read: the batch before any row is selected.
pub struct BatchInput<'a> {
    /// Tokens in the batch.
    pub n: usize,
    pub d_in: usize,
    pub d_sae: usize,
    /// Per-latent parameters of the architecture, in `Arch::param_names` order.
    pub params: &'a [Vec<f32>],
    /// Raw pre-activations `(x - b_dec) @ W_enc`, `[n, d_sae]`, with the training noise of
    /// `Arch::pre_noise` when the rule has some.
    pub pre: &'a [f32],
    /// Decoder rows, `[d_sae, d_in]`, as this step starts.
    pub w_dec: &'a [f32],
    /// The screen's lists, when this step screened (`StepCtx::screened`).
    pub screened: Option<RowLists<'a>>,
}

/// Per row of a screened step (`Precision::F32Screened`), ascending, the latents whose
/// pre-activations the screen recomputed in f32, with those values: every latent that may
/// pass the rule's `Arch::screen_cutoff` (raised as `Arch::screen_top_k` says) is among
/// them, and the other entries of `pre` are bf16 values at or under their cutoffs, so
/// selection can read these lists instead of the whole row (whose entries are scattered
/// over memory by then).
#[derive(Clone, Copy)]
pub struct RowLists<'a> {
    /// Row b's latents are `idx[ptr[b]..ptr[b + 1]]`, their pre-activations `val[..]` there.
    pub ptr: &'a [usize],
    pub idx: &'a [u32],
    pub val: &'a [f32],
}

impl<'a> RowLists<'a> {
    pub fn row(&self, b: usize) -> (&'a [u32], &'a [f32]) {
        let at = self.ptr[b]..self.ptr[b + 1];
        (&self.idx[at.clone()], &self.val[at])
    }
}

/// What every architecture may read during one step.
pub struct StepCtx<'a> {
    /// Tokens in the batch.
    pub n: usize,
    pub d_sae: usize,
    pub sparsity_coeff: f32,
    pub hyper: &'a TrainHyper,
    /// Per-latent parameters of the architecture, in `Arch::param_names` order.
    pub params: &'a [Vec<f32>],
    /// Latents the auxiliary reconstruction may use this step (AuxK), ascending: those of
    /// `Arch::aux_latents`, the dead ones unless the rule says otherwise.
    pub dead: &'a [u32],
    /// Per-latent lower bounds from `Arch::prefilter` (empty when the arch has none).
    pub cutoff: &'a [f32],
    /// The screen's lists of this step, when it screened: a row's candidates.
    pub screened: Option<RowLists<'a>>,
    /// The family's state from `Arch::prepare_batch` for this batch.
    pub batch: BatchRef<'a>,
}

/// What `Arch::after_step` may read: the step just applied.
pub struct AfterStep<'a> {
    /// The step's number (1 for the first).
    pub t: u64,
    /// Tokens in the batch.
    pub n: usize,
    /// The family's state from `Arch::prepare_batch` for this batch.
    pub batch: BatchRef<'a>,
}

/// Entries of one row, appended by `select_row`.
#[derive(Default)]
pub struct RowOut {
    pub idx: Vec<u32>,
    pub f: Vec<f32>,
    pub a: Vec<f32>,
    pub pre: Vec<f32>,
    /// Unweighted sparsity penalty of the rows written so far (multiplied by lambda later).
    pub sparsity: f64,
    /// Scratch for selections.
    pub scratch: TopKScratch,
    /// Scratch: candidate latents of the current row, and their pre-activations.
    pub cands: Vec<u32>,
    pub cand_vals: Vec<f32>,
}

impl RowOut {
    #[inline]
    pub fn push(&mut self, j: usize, f: f32, a: f32, pre: f32) {
        self.idx.push(j as u32);
        self.f.push(f);
        self.a.push(a);
        self.pre.push(pre);
    }
    pub fn clear(&mut self) {
        self.idx.clear();
        self.f.clear();
        self.a.clear();
        self.pre.clear();
        self.sparsity = 0.0;
    }
}

/// One selected entry: latent `j`, its raw pre-activation and its two coefficients.
#[derive(Clone, Copy, Debug)]
pub struct Entry {
    pub j: usize,
    pub pre: f32,
    pub f: f32,
    pub a: f32,
}

/// Gradient of one entry: w.r.t. its pre-activation and up to three per-latent parameters.
#[derive(Clone, Copy, Debug, Default)]
pub struct EntryGrad {
    pub gpre: f32,
    pub params: [f32; 3],
}

/// Where a top-k rule takes its k largest (`Arch::screen_top_k`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TopKScope {
    /// The k largest of each row (TopK).
    Row(usize),
    /// The k*n largest of the whole batch of n rows (BatchTopK).
    Batch(usize),
}

/// One SAE architecture's forward selection and backward rule.
pub trait Arch: Send + Sync {
    fn kind(&self) -> ArchKind;
    /// Names of the per-latent parameters as trained (the optimiser state is saved by them).
    fn param_names(&self) -> &'static [&'static str];
    /// The trained parameters of `sae` (in `param_names` order); the saved ones by default.
    fn trained_params(&self, sae: &Sae) -> Vec<Vec<f32>> {
        sae.params.clone()
    }
    /// The saved parameters from the trained ones; `batch_threshold` is the trainer's
    /// estimate of the batch selection threshold (for rules that select per batch).
    fn saved_params(&self, trained: &[Vec<f32>], _batch_threshold: f32) -> Vec<Vec<f32>> {
        trained.to_vec()
    }
    /// Rules that select per batch: this batch's selection threshold, read from the state
    /// `prepare_batch` left. The trainer keeps an estimate of it for inference (saved with
    /// its state, handed to `saved_params`); None for the other rules.
    fn batch_threshold(&self, _batch: BatchRef) -> Option<f32> {
        None
    }
    /// The first batch threshold estimate of `sae` (a resumed or loaded SAE's).
    fn initial_batch_threshold(&self, _sae: &Sae) -> f32 {
        0.0
    }
    /// Reconstruction heads: widths of the nested dictionary prefixes whose reconstructions
    /// the loss sums, ascending and ending at d_sae. Empty means one head, the whole
    /// dictionary. Entries of one row must come in ascending latent order when there are
    /// several heads.
    fn heads(&self) -> &[usize] {
        &[]
    }
    fn aux_mode(&self) -> AuxMode;
    /// The AuxK loss coefficient (`AuxMode::AuxK`): the family's `aux_coeff` option, 1/32 by
    /// default.
    fn aux_coeff(&self) -> f32 {
        topk::AuxKOpts::default().aux_coeff
    }
    /// Rules whose encoder selects against the residual (matching pursuit) return their
    /// selection here; the trainer then runs its pursuit step instead of `select_row` and
    /// `entry_backward`.
    fn residual_select(&self) -> Option<&dyn ResidualSelect> {
        None
    }
    /// Decoder rows kept at exactly unit norm (gradient projection + renormalisation).
    fn unit_norm_decoder(&self) -> bool {
        true
    }
    /// Batch-level work before `select_row`, the one place a rule computes from the whole
    /// batch (BatchTopK's threshold, per-latent cut-offs, decoder norms): it keeps the result
    /// in `state`, as its own type (see [`batch_state`]), and reads it back through
    /// `StepCtx::batch`, `AfterStep::batch` and `prefilter`. The trainer keeps `state`
    /// between steps, so buffers are reused, but never saves it: what must survive a resume
    /// belongs in the parameters. Rules that compute nothing per batch leave it alone.
    fn prepare_batch(&self, _batch: &BatchInput, _state: &mut BatchSlot) {}
    /// The latents the auxiliary reconstruction (AuxK) may use this step, ascending, given
    /// how many tokens ago each last fired: by default the dead ones (no firing in
    /// `dead_window_tokens`).
    fn aux_latents(&self, since_fired: &[u64], hyper: &TrainHyper, out: &mut Vec<u32>) {
        out.clear();
        let w = hyper.dead_window_tokens;
        out.extend((0..since_fired.len() as u32).filter(|&j| since_fired[j as usize] >= w));
    }
    /// Per-latent parameters set outside gradient descent, after each applied step (their
    /// gradients are zero, so Adam leaves them alone). Not called when only collecting
    /// gradients.
    fn after_step(&self, _step: &AfterStep, _params: &mut [Vec<f32>]) {}
    /// Per-latent values `c_j` such that only latents with `pre_j > c_j` can be selected
    /// (a vectorised prefilter; `select_row` still applies its exact test). Returns false
    /// when the arch has no such bound. `batch` is what `prepare_batch` left.
    fn prefilter(&self, _params: &[Vec<f32>], _batch: BatchRef, _out: &mut Vec<f32>) -> bool {
        false
    }
    /// Per-latent values `c_j` such that a raw pre-activation with `pre_j <= c_j` is never
    /// selected and nothing else in the step reads it (no batch state, penalty or noise
    /// from the pre-activations). `Precision::F32Screened` then recomputes in f32 only the
    /// entries that may lie above. False when its selection depends on more than
    /// that (the row, the batch, every pre-activation).
    fn screen_cutoff(&self, _params: &[Vec<f32>], _out: &mut Vec<f32>) -> bool {
        false
    }
    /// Set when, besides `screen_cutoff`, selection keeps only the k largest
    /// `pre_j - cutoff_j` of each row (`TopKScope::Row`) or the k*n largest of the batch of
    /// n rows (`TopKScope::Batch`), except among the AuxK latents (`aux_latents`), which keep
    /// the plain cutoff: the screen then raises the other cutoffs by a bound under that
    /// k-th value. Anything the rule reads of the other entries must not change its result
    /// (TopK's prefilter floor, BatchTopK's collection above a bound).
    fn screen_top_k(&self) -> Option<TopKScope> {
        None
    }
    /// Training-time selection for one row of raw pre-activations `(x - b_dec) @ W_enc`;
    /// `row` is its index in the batch `prepare_batch` saw.
    fn select_row(&self, ctx: &StepCtx, row: usize, pre: &[f32], out: &mut RowOut);
    /// Whether selection also reads, per row b and latent j, `|W_dec[j] . g_b|`, with `g_b`
    /// the gradient of the language model's loss w.r.t. input row b (g-SAE). The trainer then
    /// takes those gradients with every batch (`SaeTrainer::step_with_grad`) and computes the
    /// scores in one more dense product per step; it calls `select_row_scored`.
    fn reads_input_grad(&self) -> bool {
        false
    }
    /// `select_row` given the row's `g W_dec^T` (`[d_sae]`, signed: `g` the row's loss
    /// gradient) when `reads_input_grad`.
    fn select_row_scored(
        &self,
        ctx: &StepCtx,
        row: usize,
        pre: &[f32],
        _scores: &[f32],
        out: &mut RowOut,
    ) {
        self.select_row(ctx, row, pre, out);
    }
    /// `df`, `da`: loss gradients w.r.t. the entry's `f` and `a` (batch mean included).
    fn entry_backward(&self, ctx: &StepCtx, e: Entry, df: f32, da: f32) -> EntryGrad;
    /// Extra decoder-row gradient given `sum_b f_bj` (decoder-norm-weighted L1 only).
    fn dec_row_extra(&self, _ctx: &StepCtx, _j: usize, _sum_f: f32) -> Option<f32> {
        None
    }
    /// Standard deviation of Gaussian noise added in training to every raw pre-activation
    /// before selection (`prepare_batch`, `prefilter` and `select_row` all see the noisy
    /// values, and so do the entries' `pre`); None for none. Inference adds none. The noise
    /// of a row depends only on `TrainHyper::seed`, the step and the row's index in the
    /// batch (`trainer::noise`). Applies to the shared step, not to `residual_select` rules.
    fn pre_noise(&self) -> Option<f32> {
        None
    }
    /// A penalty on every pre-activation of every row, not only the selected entries (a
    /// prior on the encoder's output). Its gradient w.r.t. the pre-activations is dense, so
    /// its W_enc gradient costs one more dense product per step. Applies to the shared step.
    fn dense_penalty(&self) -> Option<&dyn DensePenalty> {
        None
    }
}

/// A loss term on every pre-activation of a row (see [`Arch::dense_penalty`]); the trainer
/// averages it over the batch and adds it to the loss (reported as `sparsity_loss`).
pub trait DensePenalty: Sync {
    /// The penalty of one row of raw pre-activations (before any training noise), with its
    /// coefficient; writes its gradient w.r.t. each pre-activation into `grad`.
    fn row(&self, params: &[Vec<f32>], pre: &[f32], grad: &mut [f32]) -> f64;
    /// Gradients of the penalty w.r.t. latent `j`'s per-latent parameters (in
    /// `Arch::param_names` order) given `sum_b d penalty / d pre_bj`.
    fn param_grads(&self, j: usize, colsum: f32) -> [f32; 3];
}

/// An encoder that selects against the residual, step by step, with the dictionary as its
/// encoder (the trainer's slot for matching pursuit).
pub trait ResidualSelect: Sync {
    /// The steps of every row: `(atom, coefficient)` in the order chosen. `corr` holds the
    /// first correlations `r_0 W_dec^T` (`[n, d_sae]`) and is overwritten. `scratch` is the
    /// rule's working space, kept by the trainer between steps.
    fn select(
        &self,
        w_dec: &[f32],
        d_in: usize,
        corr: &mut [f32],
        n: usize,
        scratch: &mut Vec<f32>,
    ) -> Vec<Steps>;
    /// Backward through one row's steps. `g` holds `dL/dr_k` on entry and `dL/dr_0` on exit;
    /// `r` holds `r_k` on entry (overwritten). `atom_grads` gets `dL/dd_j` of each step,
    /// `d_in` values per step, in step order.
    fn row_backward(
        &self,
        w_dec: &[f32],
        steps: &Steps,
        r: &mut [f32],
        g: &mut [f32],
        atom_grads: &mut [f32],
    );
}

/// The `(atom, coefficient)` chosen at each step of one row.
pub type Steps = Vec<(u32, f32)>;

/// Lower a cutoff slightly so that float rounding in `pre + b > t` versus `pre > t - b`
/// can never drop a candidate.
pub(crate) fn loosen(c: f32) -> f32 {
    c - c.abs() * 1e-5 - 1e-30
}

/// `f(out, j, p)` for each candidate latent `j` of row `row` (`candidates`, ascending) with
/// its pre-activation `p`.
pub(crate) fn each_candidate(
    ctx: &StepCtx,
    row: usize,
    pre: &[f32],
    out: &mut RowOut,
    mut f: impl FnMut(&mut RowOut, usize, f32),
) {
    let (mut cands, mut vals) = (
        std::mem::take(&mut out.cands),
        std::mem::take(&mut out.cand_vals),
    );
    candidates(ctx, row, pre, &mut cands, &mut vals);
    for (&j, &p) in cands.iter().zip(&vals) {
        f(out, j as usize, p);
    }
    out.cands = cands;
    out.cand_vals = vals;
}

/// Candidate latents of row `row` (ascending) into `cands` and their pre-activations into
/// `vals`: the screen's list when the step screened, else those above the prefilter, else
/// all of them.
pub(crate) fn candidates(
    ctx: &StepCtx,
    row: usize,
    pre: &[f32],
    cands: &mut Vec<u32>,
    vals: &mut Vec<f32>,
) {
    cands.clear();
    vals.clear();
    if let Some(lists) = ctx.screened {
        let (js, vs) = lists.row(row);
        cands.extend_from_slice(js);
        vals.extend_from_slice(vs);
        return;
    }
    if ctx.cutoff.is_empty() {
        cands.extend(0..pre.len() as u32);
        vals.extend_from_slice(pre);
    } else {
        crate::kernels::indices_above(pre, ctx.cutoff, cands);
        vals.extend(cands.iter().map(|&j| pre[j as usize]));
    }
}

/// Reused buffers of [`top_k_into`] and [`top_k_in_order`]; `best` holds the former's
/// result, `positions` the latter's.
#[derive(Default)]
pub struct TopKScratch {
    keys: Vec<u64>,
    pub best: Vec<(f32, u32)>,
    /// Candidate values (the caller's, for [`top_k_in_order`]).
    pub(crate) vals: Vec<f32>,
    order: Vec<u32>,
    pub(crate) positions: Vec<u32>,
}

/// [`top_k_into`] for candidates already in index order, given by their values
/// `scratch.vals`: the positions of the `k` largest into `scratch.positions`, ascending, with
/// the same ranking (larger value first, then the earlier position; NaN below every number).
///
/// One selection on the values' order bits finds the k-th; one pass in order then keeps what
/// beats it and the earliest of its ties. So no per-candidate 64-bit key and no sort of the
/// result, which is what a row of TopK's prefiltered candidates (a few times k) spent its
/// time on.
pub(crate) fn top_k_in_order(k: usize, scratch: &mut TopKScratch) {
    let TopKScratch {
        vals,
        order,
        positions,
        ..
    } = scratch;
    positions.clear();
    if k == 0 {
        return;
    }
    if vals.len() <= k {
        positions.extend(0..vals.len() as u32);
        return;
    }
    order.clear();
    order.extend(vals.iter().map(|&v| order_bits(v)));
    let cut = vals.len() - k;
    let (_, &mut kth, above) = order.select_nth_unstable(cut);
    // Everything past the k-th is at least it; the k-th's ties fill what the larger leave.
    let mut ties = k - above.iter().filter(|&&o| o > kth).count();
    // Every position is written and the length moves past the kept ones: no branch on the data.
    positions.resize(vals.len(), 0);
    let mut len = 0;
    for (i, &v) in vals.iter().enumerate() {
        let o = order_bits(v);
        let tie = (o == kth && ties > 0) as usize;
        positions[len] = i as u32;
        ties -= tie;
        len += (o > kth) as usize | tie;
    }
    positions.truncate(len);
}

/// Indices and values of the `k` largest values among `cands` into `scratch.best`, sorted
/// by index (ties: lower index first; NaN ranks below every number and comes back as -inf).
/// Indices must be distinct.
///
/// Each candidate becomes one integer key ordered as the ranking, so comparisons are single
/// integer compares. Keys go into a buffer of up to `2k`; a full buffer is cut to its best
/// `k` by one quickselect, whose k-th key then turns away every later candidate that cannot
/// beat it. That is linear in the candidates, where keeping the worst of the best `k` by a
/// scan costs O(k) per replacement.
pub(crate) fn top_k_into(
    k: usize,
    cands: impl Iterator<Item = (f32, u32)>,
    scratch: &mut TopKScratch,
) {
    let TopKScratch { keys, best, .. } = scratch;
    keys.clear();
    best.clear();
    if k == 0 {
        return;
    }
    let cap = 2 * k + 16;
    // Every key is above 0 (`rank_key`), so 0 turns nothing away.
    let mut bar = 0u64;
    for (v, j) in cands {
        let key = rank_key(v, j);
        if key < bar {
            continue;
        }
        keys.push(key);
        if keys.len() == cap {
            bar = keep_largest(keys, k);
        }
    }
    if keys.len() > k {
        keep_largest(keys, k);
    }
    best.extend(keys.iter().map(|&key| from_rank_key(key)));
    best.sort_unstable_by_key(|&(_, j)| j);
}

/// The `want`-th largest (from 1) of `vals`, which must all be positive (not NaN), with
/// `1 <= want <= vals.len()`. Positive floats order as their bits, so one parallel histogram
/// of the high 16 bits finds the bucket that holds it and a quickselect runs inside that
/// bucket only: linear in `vals` and mostly parallel, where a quickselect over all of them
/// takes several passes on one thread.
pub(crate) fn kth_largest_positive(vals: &[f32], want: usize) -> f32 {
    assert!(
        (1..=vals.len()).contains(&want),
        "kth_largest_positive: want {want} of {}",
        vals.len()
    );
    const BUCKETS: usize = 1 << 16;
    let bucket = |v: &f32| (v.to_bits() >> 16) as usize;
    let hist = vals
        .par_chunks(1 << 16)
        .fold(
            || vec![0usize; BUCKETS],
            |mut h, part| {
                part.iter().for_each(|v| h[bucket(v)] += 1);
                h
            },
        )
        .reduce(
            || vec![0usize; BUCKETS],
            |mut a, b| {
                a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
                a
            },
        );
    // From the top: the bucket where the count of larger values reaches `want`.
    let (mut above, mut at) = (0usize, 0usize);
    for b in (0..BUCKETS).rev() {
        if above + hist[b] >= want {
            at = b;
            break;
        }
        above += hist[b];
    }
    let mut inside: Vec<u32> = vals
        .par_iter()
        .filter(|v| bucket(v) == at)
        .map(|v| v.to_bits())
        .collect();
    let pos = inside.len() - (want - above);
    f32::from_bits(*inside.select_nth_unstable(pos).1)
}

/// Cuts `keys` (longer than `k`) to its `k` largest; returns the smallest of them.
fn keep_largest(keys: &mut Vec<u64>, k: usize) -> u64 {
    let cut = keys.len() - k;
    keys.select_nth_unstable(cut);
    keys.copy_within(cut.., 0);
    keys.truncate(k);
    keys[0]
}

/// The ranking of [`top_k_into`] as one integer: larger value first, then lower index.
/// The value's bits are mapped to an unsigned order (NaN as -inf, -0 as +0) in the high
/// half; the complemented index fills the low half.
fn rank_key(v: f32, j: u32) -> u64 {
    (order_bits(v) as u64) << 32 | !j as u64
}

/// A float's place in [`rank_key`]'s order as an unsigned integer: NaN as -inf, -0 as +0.
fn order_bits(v: f32) -> u32 {
    let v = if v.is_nan() {
        f32::NEG_INFINITY
    } else {
        v + 0.0
    };
    let b = v.to_bits();
    if b >> 31 == 1 {
        !b
    } else {
        b | 1 << 31
    }
}

/// The value and index a [`rank_key`] was made from.
fn from_rank_key(key: u64) -> (f32, u32) {
    let ord = (key >> 32) as u32;
    let b = if ord >> 31 == 1 {
        ord & !(1 << 31)
    } else {
        !ord
    };
    (f32::from_bits(b), !(key as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Cuts(Vec<f32>);
    #[derive(Default)]
    struct Threshold(f32);

    /// The first use makes the state, later ones get the same one back (its buffers are
    /// reused across steps); a state of another type is replaced.
    #[test]
    fn batch_state_is_made_once_and_reused() {
        let mut slot: BatchSlot = None;
        let made: *const Cuts = batch_state::<Cuts>(&mut slot);
        batch_state::<Cuts>(&mut slot).0.extend([1.0, 2.0]);
        let again: *const Cuts = batch_state::<Cuts>(&mut slot);
        assert_eq!(made, again);
        assert_eq!(BatchRef::new(&slot).get::<Cuts>().0, [1.0, 2.0]);
        batch_state::<Threshold>(&mut slot).0 = 0.5;
        assert_eq!(BatchRef::new(&slot).get::<Threshold>().0, 0.5);
        assert!(batch_state::<Cuts>(&mut slot).0.is_empty());
    }

    #[test]
    #[should_panic(expected = "no batch state")]
    fn reading_a_state_the_rule_never_made_panics() {
        let slot: BatchSlot = Some(Box::new(Threshold(1.0)));
        BatchRef::new(&slot).get::<Cuts>();
    }
}
