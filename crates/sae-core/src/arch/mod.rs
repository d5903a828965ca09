//! One module per SAE architecture behind one small trait.

use std::fmt;
use std::str::FromStr;

/// The SAE families this toolkit trains. The string forms are the `--arch` values and
/// SAELens' `architecture` field where one exists.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ArchKind {
    /// Rajamanoharan et al. 2024: gate + magnitude paths tied by r_mag.
    Gated,
    /// The paper's baseline: ReLU + L1 with unit-norm decoder columns.
    Relu,
    /// Gao et al. 2024: TopK with the AuxK loss.
    TopK,
    /// Bussmann et al. 2024: top k*B over the batch, JumpReLU threshold at inference.
    BatchTopK,
    /// Rajamanoharan et al. 2024b: JumpReLU with STE and L0 penalty.
    JumpRelu,
}

impl ArchKind {
    pub const ALL: [ArchKind; 5] = [
        ArchKind::Gated,
        ArchKind::Relu,
        ArchKind::TopK,
        ArchKind::BatchTopK,
        ArchKind::JumpRelu,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ArchKind::Gated => "gated",
            ArchKind::Relu => "relu",
            ArchKind::TopK => "topk",
            ArchKind::BatchTopK => "batchtopk",
            ArchKind::JumpRelu => "jumprelu",
        }
    }
}

impl fmt::Display for ArchKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ArchKind {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        ArchKind::ALL
            .into_iter()
            .find(|a| a.as_str() == s.to_ascii_lowercase())
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "unknown architecture '{s}': expected one of gated, relu, topk, batchtopk, jumprelu"
                )
            })
    }
}
