//! Checkpoints: `checkpoints/step-N/` holds the trainable weights (`model.safetensors`, or
//! the PEFT adapter under LoRA), `optimizer.safetensors` (AdamW moments by parameter path),
//! `metrics.json` and `trainer_state.json` (step, loader position, seed, the stage's own
//! state). It is written as `step-N.tmp` and renamed, and `trainer_state.json` is written
//! last, so the newest `step-N` with one is always complete.

use std::path::{Path, PathBuf};

use align_lora::LoraConfig;
use align_model::burn::module::{AutodiffModule, Param};
use align_model::burn::tensor::backend::{AutodiffBackend, Backend};
use align_model::burn::tensor::{Tensor, TensorData};
use align_model::weights::{HostTensor, SafetensorsSource, TensorMap, WeightSource, save_safetensors, write_atomic};
use align_model::{Heads, HfHead, ModelConfig, Tokenizer, Transformer, export};
use anyhow::{Context, Result, bail};
use serde_json::json;

use super::StepMetrics;
use crate::optim::{AdamW, Moments};

/// Collects the AdamW moments into named host tensors and back.
fn save_optimizer<B: AutodiffBackend>(opt: &AdamW<B>, path: &Path) -> Result<()> {
    let mut map = TensorMap::default();
    for (k, s) in &opt.state {
        let tensors = [("m", Some(&s.m)), ("v", Some(&s.v)), ("master", s.master.as_ref())];
        for (suffix, t) in tensors.into_iter().filter_map(|(n, t)| t.map(|t| (n, t))) {
            let data: Vec<f32> =
                t.clone().into_data().convert::<f32>().to_vec().map_err(|e| anyhow::anyhow!("{e:?}"))?;
            map.0.insert(format!("{k}.{suffix}"), HostTensor::new(vec![data.len()], data));
        }
    }
    save_safetensors(&map, path)?;
    Ok(())
}

pub(super) fn load_optimizer<B: AutodiffBackend>(opt: &mut AdamW<B>, path: &Path, device: &B::Device) -> Result<()> {
    let mut src = SafetensorsSource::open_files(&[path.to_path_buf()])?;
    let inner = |t: HostTensor| {
        let n = t.data.len();
        Tensor::<B::InnerBackend, 1>::from_data(TensorData::new(t.data, [n]), device)
    };
    for name in src.names() {
        if let Some(k) = name.strip_suffix(".m") {
            let m = inner(src.load(&name)?);
            let v = inner(src.load(&format!("{k}.v"))?);
            let master_name = format!("{k}.master");
            let master = match src.names().contains(&master_name) {
                true => Some(inner(src.load(&master_name)?)),
                false => None,
            };
            opt.state.insert(k.to_string(), Moments { m, v, master });
        }
    }
    Ok(())
}

/// The newest complete checkpoint to continue from with `resume`; without it, an error if
/// the run already holds checkpoints (nothing written is overwritten by accident).
pub(super) fn resume_point(output_dir: &Path, resume: bool) -> Result<Option<(usize, PathBuf)>> {
    let existing = checkpoints(output_dir);
    if !resume && !existing.is_empty() {
        bail!(
            "{} already holds checkpoints (newest: step {}): continue with --resume, or choose another output_dir",
            output_dir.display(),
            existing.last().map_or(0, |(s, _)| *s)
        );
    }
    Ok(if resume { existing.last().cloned() } else { None })
}

/// A checkpoint's `trainer_state.json`, refused if made with another seed or length.
pub(super) fn read_state(dir: &Path, seed: u64, total_steps: usize) -> Result<super::LoopState> {
    let path = dir.join("trainer_state.json");
    let state: super::LoopState =
        serde_json::from_str(&std::fs::read_to_string(&path).with_context(|| path.display().to_string())?)
            .with_context(|| path.display().to_string())?;
    let (s, t) = (state.seed, state.total_steps);
    if s != seed || t != total_steps {
        bail!(
            "{}: checkpoint was made with seed {s} / {t} steps; this config has seed {seed} / {total_steps} steps",
            dir.display()
        );
    }
    Ok(state)
}

/// Checkpoint directories of a run, oldest first (only complete ones: no `.tmp`).
pub fn checkpoints(output_dir: &Path) -> Vec<(usize, PathBuf)> {
    let mut v: Vec<(usize, PathBuf)> = std::fs::read_dir(output_dir.join("checkpoints"))
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter_map(|p| {
            let step = p.file_name()?.to_str()?.strip_prefix("step-")?.parse().ok()?;
            p.join("trainer_state.json").exists().then_some((step, p))
        })
        .collect();
    v.sort();
    v
}

/// Write `checkpoints/step-N/` atomically: the trainable weights (`save`), the optimizer,
/// `metrics.json` and, last, `trainer_state.json` (`state`), whose presence marks the
/// checkpoint complete; keep the newest `keep`.
pub(super) fn write_checkpoint<B: AutodiffBackend>(
    save: &dyn Fn(&Path) -> Result<()>,
    opt: &AdamW<B>,
    step: usize,
    state: &serde_json::Value,
    metrics: &[StepMetrics],
    output_dir: &Path,
    keep: Option<usize>,
) -> Result<()> {
    let dir = output_dir.join("checkpoints").join(format!("step-{step}"));
    let tmp = output_dir.join("checkpoints").join(format!("step-{step}.tmp"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).with_context(|| tmp.display().to_string())?;
    }
    // What a kill during an earlier removal left behind.
    for e in std::fs::read_dir(output_dir.join("checkpoints")).into_iter().flatten().flatten() {
        if e.path().extension().is_some_and(|x| x == "old") {
            std::fs::remove_dir_all(e.path()).with_context(|| e.path().display().to_string())?;
        }
    }
    std::fs::create_dir_all(&tmp).with_context(|| tmp.display().to_string())?;
    save(&tmp)?;
    save_optimizer(opt, &tmp.join("optimizer.safetensors"))?;
    let json = json!({"state": state, "metrics": metrics});
    let text = serde_json::to_string_pretty(&json)?;
    // trainer_state.json last: its presence marks the checkpoint complete.
    let state_text = serde_json::to_string_pretty(state)?;
    write_atomic(&tmp.join("metrics.json"), text.as_bytes())?;
    write_atomic(&tmp.join("trainer_state.json"), state_text.as_bytes())?;
    if dir.exists() {
        remove_checkpoint(&dir)?;
    }
    std::fs::rename(&tmp, &dir).with_context(|| dir.display().to_string())?;
    if let Some(k) = keep {
        let all = checkpoints(output_dir);
        for (_, old) in all.iter().take(all.len().saturating_sub(k.max(1))) {
            remove_checkpoint(old)?;
        }
    }
    tracing::info!(checkpoint = %dir.display(), "saved");
    Ok(())
}

/// Delete a checkpoint so that a kill part-way never leaves a partial one that looks
/// complete: it is renamed out of the `step-N` names first, then removed.
fn remove_checkpoint(dir: &Path) -> Result<()> {
    let doomed = dir.with_extension("old");
    if doomed.exists() {
        std::fs::remove_dir_all(&doomed).with_context(|| doomed.display().to_string())?;
    }
    std::fs::rename(dir, &doomed).with_context(|| dir.display().to_string())?;
    std::fs::remove_dir_all(&doomed).with_context(|| doomed.display().to_string())
}

/// Save what a stage trains: the PEFT adapter (plus a reward model's score head, which
/// LoRA trains in full, in `score.safetensors`), or the whole model in HF names.
pub fn save_trainable<B: Backend>(
    model: &Transformer<B>,
    lora: Option<&LoraConfig>,
    head: HfHead,
    dir: &Path,
) -> Result<()> {
    match lora {
        Some(cfg) => {
            align_lora::save_peft(&mut model.clone(), cfg, "base", dir)?;
            if head == HfHead::SequenceClassification {
                let full = export(model, head)?;
                let mut score = TensorMap::default();
                if let Some(t) = full.0.get("score.weight") {
                    score.0.insert("score.weight".into(), t.clone());
                }
                save_safetensors(&score, &dir.join("score.safetensors"))?;
            }
        }
        None => save_safetensors(&export(model, head)?, &dir.join("model.safetensors"))?,
    }
    Ok(())
}

/// Inverse of [`save_trainable`] onto the starting model.
pub fn load_trainable<B: Backend>(
    model: Transformer<B>,
    lora: Option<&LoraConfig>,
    config: &ModelConfig,
    heads: Heads,
    dir: &Path,
    device: &B::Device,
) -> Result<Transformer<B>> {
    Ok(match lora {
        Some(_) => {
            let mut base = model;
            for (_, p) in base.projections_mut() {
                p.adapter = None;
            }
            let mut m = align_lora::load_peft(base, dir)?.0;
            let score = dir.join("score.safetensors");
            if score.exists() {
                let mut src = SafetensorsSource::open_files(&[score])?;
                let t = align_model::WeightSource::load(&mut src, "score.weight")?;
                let [out, inp] = [t.shape[0], t.shape[1]];
                // HF stores [out, in]; Burn's Linear holds [in, out].
                let w = Tensor::<B, 2>::from_data(TensorData::new(t.data, [out, inp]), device).transpose();
                if let Some(s) = m.score.as_mut() {
                    s.weight = Param::from_tensor(w).set_require_grad(true);
                }
            }
            m
        }
        None => {
            let mut src = SafetensorsSource::open_files(&[dir.join("model.safetensors")])?;
            align_model::build::<B>(config, &mut src, heads, device)?
        }
    })
}

/// Write a trained policy to `final/`: the PEFT adapter and tokenizer under LoRA, else the
/// HF checkpoint (`head` names the head the checkpoint carries).
pub fn export_policy<B: AutodiffBackend>(
    policy: &Transformer<B>,
    lora: Option<&LoraConfig>,
    base: &Path,
    tok: &Tokenizer,
    head: HfHead,
    final_dir: &Path,
) -> Result<()> {
    match lora {
        Some(l) => {
            align_lora::save_peft(&mut policy.clone(), l, &base.display().to_string(), final_dir)?;
            tok.save(final_dir)?;
        }
        None => align_model::save_pretrained(&policy.valid(), Some(tok), head, final_dir)?,
    }
    Ok(())
}
