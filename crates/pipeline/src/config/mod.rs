//! The TOML config every training stage reads: what to train (`[model]`, `[lora]`), on
//! what (`[data]`, `[eval_data]`, `[tokenize]`), how (`[training]`), and the stage's own
//! section (`packing` for SFT; `[reward]`, `[dpo]`, `[orpo]`, `[simpo]` for the pairwise
//! stages; `[kto]`; `[grpo]`, `[rloo]`, `[ppo]`). A section of another stage is refused, so a DPO config never runs as ORPO.
//! Every section's settings live in this module (one file per stage family); the stages
//! import them, and nothing here imports a stage.
//! One struct rather than one per stage: serde's `flatten` cannot be combined with
//! `deny_unknown_fields`, which every config keeps.

use std::path::{Path, PathBuf};

use align_data::{DatasetConfig, TokenizeConfig};
use align_lora::LoraConfig;
use align_model::BaseStorage;
use align_model::quant::{GgmlBlock, QuantFormat};

pub use crate::distributed::DistributedConfig;
use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

pub mod curriculum;
pub mod grpo;
pub mod kto;
pub mod ppo;
pub mod preference;
pub mod rloo;
pub mod sft;
mod training;

pub use curriculum::CurriculumConfig;
pub use grpo::GrpoSettings;
pub use kto::KtoSettings;
pub use ppo::PpoSettings;
pub use preference::{DpoSettings, OrpoSettings, RewardSettings, SimpoSettings};
pub use rloo::RlooSettings;
pub use sft::{ContrastiveConfig, ScoreConditioningConfig, SelfCritiqueConfig};
pub use training::{ReportTo, TrainingArguments};

/// `[model]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// A GGUF file or an HF directory.
    pub path: PathBuf,
    /// Keep the frozen base's block projections quantised under `[lora]` (QLoRA):
    /// `"nf4"` (4-bit NormalFloat, bitsandbytes' layout), `"q8_0"`, `"q4_0"` (llama.cpp's
    /// blocks, made on load), or `"gguf"` (a GGUF file's own Q4_0/Q4_1/Q8_0/Q4_K/Q6_K
    /// blocks, as stored). Embeddings, norms and heads stay f32. Default none: f32.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantize: Option<Quantize>,
    /// bitsandbytes' name for `quantize = "nf4"`. Default false.
    #[serde(default, skip_serializing_if = "is_false")]
    pub load_in_4bit: bool,
    /// NF4: also quantise the per-block absmaxes (QLoRA's double quantisation,
    /// bitsandbytes' `bnb_4bit_use_double_quant`). Default false, as bitsandbytes.
    #[serde(default, alias = "bnb_4bit_use_double_quant", skip_serializing_if = "is_false")]
    pub double_quant: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// `[model] quantize`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Quantize {
    Nf4,
    #[serde(rename = "q8_0")]
    Q8_0,
    #[serde(rename = "q4_0")]
    Q4_0,
    Gguf,
}

impl ModelSpec {
    /// How the base's projections are stored, from `quantize` / `load_in_4bit`.
    pub fn storage(&self) -> Result<BaseStorage> {
        let quantize = match (self.quantize, self.load_in_4bit) {
            (None, true) | (Some(Quantize::Nf4), _) => Some(Quantize::Nf4),
            (Some(q), true) => {
                bail!("[model] load_in_4bit = true means quantize = \"nf4\", but quantize = {q:?} is also set")
            }
            (q, false) => q,
        };
        if self.double_quant && quantize != Some(Quantize::Nf4) {
            bail!("[model] double_quant: only NF4 has scales to double-quantise (set quantize = \"nf4\")");
        }
        Ok(match quantize {
            None => BaseStorage::Dense,
            Some(Quantize::Nf4) => BaseStorage::Quantize(QuantFormat::Nf4 { double_quant: self.double_quant }),
            Some(Quantize::Q8_0) => BaseStorage::Quantize(QuantFormat::Ggml(GgmlBlock::Q8_0)),
            Some(Quantize::Q4_0) => BaseStorage::Quantize(QuantFormat::Ggml(GgmlBlock::Q4_0)),
            Some(Quantize::Gguf) => {
                if self.path.is_dir() {
                    bail!(
                        "[model] quantize = \"gguf\" keeps a GGUF file's blocks, but path {} is a directory (use nf4, q8_0 or q4_0 for safetensors)",
                        self.path.display()
                    );
                }
                BaseStorage::Gguf
            }
        })
    }
}

/// A training stage's config (TOML).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageConfig {
    /// Where metrics, checkpoints and `final/` go.
    pub output_dir: PathBuf,
    pub model: ModelSpec,
    /// Training rows (SFT: text, prompt/completion or conversations; pairwise stages:
    /// `prompt`/`chosen`/`rejected` or an adapter such as `piqa_preference`).
    pub data: DatasetConfig,
    /// Held-out rows evaluated every `eval_steps`. Default none.
    #[serde(default)]
    pub eval_data: Option<DatasetConfig>,
    #[serde(default)]
    pub tokenize: TokenizeConfig,
    #[serde(default)]
    pub training: TrainingArguments,
    /// LoRA instead of full fine-tuning. Default none (full).
    #[serde(default)]
    pub lora: Option<LoraConfig>,
    /// SFT: pack micro-batches into rows of `tokenize.max_length` (best-fit decreasing).
    /// Default false.
    #[serde(default)]
    pub packing: bool,
    /// `align reward` settings. Default none.
    #[serde(default)]
    pub reward: Option<RewardSettings>,
    /// `align dpo` settings. Default none.
    #[serde(default)]
    pub dpo: Option<DpoSettings>,
    /// `align orpo` settings. Default none.
    #[serde(default)]
    pub orpo: Option<OrpoSettings>,
    /// `align simpo` settings. Default none.
    #[serde(default)]
    pub simpo: Option<SimpoSettings>,
    /// `align grpo` settings (with its reward functions). Default none.
    #[serde(default)]
    pub grpo: Option<GrpoSettings>,
    /// `align ppo` settings (reward functions, critic, KL control). Default none.
    #[serde(default)]
    pub ppo: Option<PpoSettings>,
    /// `align kto` settings. Default none.
    #[serde(default)]
    pub kto: Option<KtoSettings>,
    /// `align rloo` settings (with its reward functions). Default none.
    #[serde(default)]
    pub rloo: Option<RlooSettings>,
    /// Easier examples first (the dataset stages). Default none.
    #[serde(default)]
    pub curriculum: Option<CurriculumConfig>,
    /// SFT: condition each scored conversation on its score. Default none.
    #[serde(default)]
    pub score_conditioning: Option<ScoreConditioningConfig>,
    /// SFT: train on scored conversations' critiques too. Default none.
    #[serde(default)]
    pub self_critique: Option<SelfCritiqueConfig>,
    /// SFT: an auxiliary prompt–reply contrastive loss. Default none.
    #[serde(default)]
    pub contrastive: Option<ContrastiveConfig>,
    /// Data-parallel replicas (devices, nodes). Default: one device.
    #[serde(default, skip_serializing_if = "is_single_device")]
    pub distributed: DistributedConfig,
}

fn is_single_device(d: &DistributedConfig) -> bool {
    *d == DistributedConfig::default()
}

impl StageConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
        let cfg: StageConfig =
            toml::from_str(&text).with_context(|| format!("{}: invalid stage config", path.display()))?;
        cfg.validate_fields().with_context(|| format!("{}: invalid stage config", path.display()))?;
        Ok(cfg)
    }

    /// The checks every stage shares: `output_dir` and `[training]`.
    pub fn validate_fields(&self) -> Result<()> {
        if self.output_dir.as_os_str().is_empty() {
            bail!("output_dir: must not be empty (it would write into the current directory)");
        }
        self.training.validate()?;
        self.distributed.validate()?;
        if self.model.storage()? != BaseStorage::Dense && self.lora.is_none() {
            bail!(
                "[model] quantize: a quantised base is frozen and only trains through adapters; add a [lora] section (QLoRA)"
            );
        }
        if let Some(c) = &self.curriculum {
            c.validate()?;
        }
        if let Some(c) = &self.score_conditioning {
            c.condition()?;
        }
        if let Some(c) = &self.self_critique {
            c.task()?;
        }
        if let Some(c) = &self.contrastive {
            c.validate()?;
        }
        for (field, v) in
            [("max_length", self.tokenize.max_length), ("max_prompt_length", self.tokenize.max_prompt_length)]
        {
            if v == Some(0) {
                bail!("[tokenize] {field}: must be at least 1, found 0 (leave it out for no limit)");
            }
        }
        let sampling = [
            self.grpo.as_ref().map(|g| ("grpo", g.temperature, g.top_p, g.eval_temperature)),
            self.ppo.as_ref().map(|p| ("ppo", p.temperature, p.top_p, p.eval_temperature)),
            self.rloo.as_ref().map(|r| ("rloo", r.temperature, r.top_p, r.eval_temperature)),
        ];
        for (section, temperature, top_p, eval_temperature) in sampling.into_iter().flatten() {
            for t in [temperature, eval_temperature] {
                let cfg = align_rollout::SamplingConfig { temperature: t, top_p, ..Default::default() };
                cfg.validate().with_context(|| format!("[{section}]"))?;
            }
        }
        Ok(())
    }

    /// Refuse a stage section other than `own` (`None`: the stage has none), and any
    /// invalid shared field.
    pub fn check_sections(&self, stage: &str, own: Option<&str>) -> Result<()> {
        self.validate_fields()?;
        let present = [
            ("reward", self.reward.is_some()),
            ("dpo", self.dpo.is_some()),
            ("orpo", self.orpo.is_some()),
            ("simpo", self.simpo.is_some()),
            ("grpo", self.grpo.is_some()),
            ("ppo", self.ppo.is_some()),
            ("kto", self.kto.is_some()),
            ("rloo", self.rloo.is_some()),
        ];
        if let Some((other, _)) = present.iter().find(|(n, p)| *p && Some(*n) != own) {
            bail!("the config has a [{other}] section, but this is the {stage} stage");
        }
        let sft_only = [("self_critique", self.self_critique.is_some()), ("contrastive", self.contrastive.is_some())];
        if let Some((section, _)) = sft_only.iter().find(|(_, p)| *p && stage != "sft") {
            bail!("[{section}] is an SFT section, but this is the {stage} stage");
        }
        if let Some(c) = &self.score_conditioning {
            match (stage, c.target) {
                ("sft", Some(_)) => bail!(
                    "[score_conditioning] target: SFT conditions each row on its own meta_eval_score; `target` is for the grpo, rloo and ppo stages' prompts"
                ),
                ("sft" | "grpo" | "rloo" | "ppo", _) => {}
                _ => bail!("[score_conditioning] conditions SFT rows or online prompts, but this is the {stage} stage"),
            }
        }
        if self.packing
            && let Some((section, _)) = sft_only.iter().find(|(_, p)| *p)
        {
            bail!(
                "[{section}] reads each row on its own (its weights or pooled states), so it cannot run with packing = true"
            );
        }
        if let Some(c) = &self.curriculum {
            if matches!(stage, "grpo" | "rloo" | "ppo") {
                bail!(
                    "[curriculum]: the {stage} stage draws prompts to generate from; only the dataset stages (sft, reward, dpo, orpo, simpo, kto) draw by a curriculum"
                );
            }
            if c.measure != curriculum::Measure::Length && stage != "sft" {
                bail!(
                    "[curriculum] measure = \"{}\": only the sft stage measures its rows' starting loss or score; use measure = \"length\" for {stage}",
                    c.measure.name()
                );
            }
        }
        Ok(())
    }
}
