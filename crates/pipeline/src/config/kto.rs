//! `[kto]`: TRL `KTOConfig` names and defaults.

use align_losses::kto::KtoLossType;
use serde::{Deserialize, Serialize};

/// `[kto]`: TRL `KTOConfig` names and defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KtoSettings {
    /// Deviation from the reference. Default 0.1.
    pub beta: f64,
    /// Weight of desirable examples' losses (λ_D). Default 1.0.
    pub desirable_weight: f64,
    /// Weight of undesirable examples' losses (λ_U); the paper keeps λ_D·n_D / λ_U·n_U in
    /// [1, 4/3]. Default 1.0.
    pub undesirable_weight: f64,
    /// kto | apo_zero_unpaired. Default kto.
    pub loss_type: KtoLossType,
}

impl Default for KtoSettings {
    fn default() -> Self {
        KtoSettings { beta: 0.1, desirable_weight: 1.0, undesirable_weight: 1.0, loss_type: KtoLossType::Kto }
    }
}
