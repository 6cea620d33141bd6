//! What every stage does around the loop: choose the autodiff backend, load the starting
//! model and tokenizer, attach LoRA, and record the config it ran with.

use std::path::PathBuf;

use align_model::burn::backend::Autodiff;
use align_model::burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing;
use align_model::burn::module::{AutodiffModule, Param};
use align_model::burn::tensor::FloatDType;
use align_model::burn::tensor::backend::Backend;
use align_model::{AutodiffFusedOps, BaseStorage, FusedOps, Heads, Tokenizer, Transformer, load_pretrained_stored};
use anyhow::{Context, Result};

use align_data::TokenizeConfig;

use crate::config::StageConfig;

/// A stage's body, generic over the autodiff backend it trains on.
pub trait StageMain {
    fn run<A: AutodiffFusedOps>(self, device: &A::Device) -> Result<PathBuf>;
}

/// Run `stage` on `Autodiff<B>`, with Burn's balanced activation checkpointing when
/// `gradient_checkpointing` is on (less memory, more compute), as every replica of
/// `[distributed]` this process holds (one per device, from `device`'s index on).
pub fn on_autodiff<B: FusedOps, S: StageMain + Clone + Sync>(
    cfg: &StageConfig,
    stage: S,
    device: &B::Device,
) -> Result<PathBuf> {
    let devices = replica_devices::<B>(device, cfg.distributed.devices)?;
    crate::distributed::launch(&cfg.distributed, &cfg.output_dir.display().to_string(), &devices, |device| {
        if cfg.training.gradient_checkpointing {
            stage.clone().run::<Autodiff<B, BalancedCheckpointing>>(device)
        } else {
            stage.clone().run::<Autodiff<B>>(device)
        }
    })
}

/// The devices of `n` local replicas: `device` and the next `n − 1` of its kind
/// (`cuda:0..n`). The CPU is one device: its replicas share it, each on its own thread.
pub fn replica_devices<B: Backend>(device: &B::Device, n: usize) -> Result<Vec<B::Device>> {
    use align_model::burn::tensor::backend::DeviceOps;
    if n <= 1 {
        return Ok(vec![device.clone()]);
    }
    let id = device.id();
    if align_model::backend::DeviceKind::of::<B>() == Some(align_model::backend::DeviceKind::Cpu) {
        return Ok(vec![device.clone(); n]);
    }
    let available = B::device_count(id.type_id);
    if id.index_id as usize + n > available {
        anyhow::bail!(
            "[distributed] devices = {n} from device index {}: this machine has {available} device(s) of this kind",
            id.index_id
        );
    }
    Ok((0..n)
        .map(|i| {
            let mut d = id;
            d.index_id += i as u16;
            <B::Device as align_model::burn::tensor::backend::Device>::from_id(d)
        })
        .collect())
}

/// The starting model of a stage, with LoRA attached when configured.
pub struct StartingModel<B: Backend> {
    pub model: Transformer<B>,
    pub tokenizer: Tokenizer,
    /// The id padding rows (the tokenizer's pad token, else its EOS).
    pub pad_id: u32,
    /// `[tokenize]` with `max_length` fitted to the model's positions.
    pub tokenize: TokenizeConfig,
}

/// Load `[model]` with `heads`, attach `[lora]` (seeded by the run's seed), and write the
/// config to `output_dir/config.toml`.
pub fn starting_model<B: FusedOps>(cfg: &StageConfig, heads: Heads, device: &B::Device) -> Result<StartingModel<B>> {
    let storage = cfg.model.storage()?;
    let pre = load_pretrained_stored::<B>(&cfg.model.path, heads, storage, device)?;
    if storage != BaseStorage::Dense {
        let (packed, bytes) = pre.model.packed_size();
        tracing::info!(projections = packed, packed_mib = bytes as f64 / (1 << 20) as f64, ?storage, "quantised base");
    }
    let tokenizer = pre.tokenizer;
    let pad_id = tokenizer
        .pad_token_id
        .or(tokenizer.eos_token_id)
        .context("the tokenizer has neither a pad nor an EOS token")?;
    let mut model = pre.model;
    if let Some(l) = &cfg.lora {
        let (m, names) = align_lora::attach(model, l, cfg.training.seed)?;
        tracing::info!(modules = names.len(), r = l.r, "LoRA attached");
        model = m;
    }
    std::fs::create_dir_all(&cfg.output_dir).with_context(|| cfg.output_dir.display().to_string())?;
    if crate::distributed::Replica::current().is_main() {
        let written = cfg.output_dir.join("config.toml");
        std::fs::write(&written, toml::to_string(cfg)?).with_context(|| written.display().to_string())?;
    }
    let tokenize = fit_to_context(&cfg.tokenize, model.config.max_position_embeddings);
    Ok(StartingModel { model, tokenizer, pad_id, tokenize })
}

/// `[tokenize]` with `max_length` at most the model's positions: a longer row has no
/// position to run at (GPT-2's learned positions end there), so rows are truncated to it,
/// with a warning, and counted in the truncation statistics like any other cut.
pub fn fit_to_context(tokenize: &TokenizeConfig, context: usize) -> TokenizeConfig {
    let mut fitted = tokenize.clone();
    match tokenize.max_length {
        Some(n) if n <= context => {}
        asked => {
            let asked = asked.map_or("no limit".to_string(), |n| n.to_string());
            tracing::warn!(
                "[tokenize] max_length ({asked}) exceeds the model's {context} positions (max_position_embeddings): rows are truncated to {context} tokens"
            );
            fitted.max_length = Some(context);
        }
    }
    if fitted.max_prompt_length.is_some_and(|p| p > context) {
        fitted.max_prompt_length = Some(context);
    }
    fitted
}

/// A head's parameters made trainable: LoRA freezes the whole base, but a new score or
/// value head trains in full (PEFT's `modules_to_save`).
pub fn train_in_full<B: Backend>(l: &mut align_model::burn::nn::Linear<B>) {
    l.weight = Param::from_tensor(l.weight.val().detach()).set_require_grad(true);
    if let Some(b) = l.bias.as_mut() {
        *b = Param::from_tensor(b.val().detach()).set_require_grad(true);
    }
}

/// A frozen copy of the starting policy (a reference model), in the precision the policy
/// trains in.
pub fn frozen_copy<A: AutodiffFusedOps>(model: &Transformer<A>, bf16: bool) -> Transformer<A::InnerBackend> {
    let dtype = if bf16 { FloatDType::BF16 } else { FloatDType::F32 };
    align_model::cast_float(model.valid(), dtype)
}
