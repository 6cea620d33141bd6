//! AdamW with decoupled weight decay (Loshchilov & Hutter 2019, arXiv:1711.05101), global
//! gradient-norm clipping, and the learning-rate schedules of HF `get_scheduler`.
//!
//! The update is PyTorch's `torch.optim.AdamW` exactly:
//! `p ← p − lr·wd·p; m ← β1 m + (1−β1) g; v ← β2 v + (1−β2) g²;
//!  p ← p − lr · (m / (1−β1ᵗ)) / (√(v / (1−β2ᵗ)) + ε)`.
//! Weight decay skips 1-D parameters (norms, biases) and embeddings unless `decay_all`.
//! Optimizer state is keyed by the parameter's module path, so it survives a reload (a
//! resumed run's parameters get new ids but the same paths).

use std::collections::BTreeMap;

use align_model::burn::module::{AutodiffModule, ModuleMapper, ModuleVisitor, Param};
use align_model::burn::optim::GradientsParams;
use align_model::burn::tensor::backend::{AutodiffBackend, Backend};
use align_model::burn::tensor::{FloatDType, Tensor};
use serde::{Deserialize, Serialize};

/// `[optimizer]` settings (HF TrainingArguments names where they exist).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdamWConfig {
    /// Default 0.9.
    pub adam_beta1: f64,
    /// Default 0.999.
    pub adam_beta2: f64,
    /// Default 1e-8.
    pub adam_epsilon: f64,
    /// Decoupled weight decay. Default 0.0.
    pub weight_decay: f64,
    /// Also decay norms, biases and embeddings. Default false.
    pub decay_all: bool,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig { adam_beta1: 0.9, adam_beta2: 0.999, adam_epsilon: 1e-8, weight_decay: 0.0, decay_all: false }
    }
}

/// First and second moments of one parameter, flattened, in f32; for a parameter held in a
/// lower precision (bf16 training) also its f32 master copy, which the update is applied
/// to so that steps smaller than a bf16 ulp are not lost.
pub struct Moments<B: Backend> {
    pub m: Tensor<B, 1>,
    pub v: Tensor<B, 1>,
    pub master: Option<Tensor<B, 1>>,
}

/// AdamW state: the step count and the moments of every trained parameter by path.
pub struct AdamW<B: AutodiffBackend> {
    pub config: AdamWConfig,
    pub step: u64,
    pub state: BTreeMap<String, Moments<B::InnerBackend>>,
}

/// Tracks the module path during a visit/map (`layers.3.self_attn.q_proj.linear.weight`).
#[derive(Default)]
struct Path(Vec<String>);

impl Path {
    fn enter(&mut self, name: &str) {
        self.0.push(name.to_string());
    }
    fn exit(&mut self) {
        self.0.pop();
    }
    fn key(&self) -> String {
        self.0.join(".")
    }
}

fn decays(path: &str, dims: usize, cfg: &AdamWConfig) -> bool {
    cfg.decay_all || (dims >= 2 && !path.starts_with("embed_tokens") && !path.starts_with("position_embeddings"))
}

/// Sum of squared gradients over every parameter that has one.
struct NormVisitor<'a, B: AutodiffBackend> {
    grads: &'a GradientsParams,
    sum: f64,
    _b: std::marker::PhantomData<B>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for NormVisitor<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(g) = self.grads.get::<B::InnerBackend, D>(param.id) {
            self.sum += g.cast(FloatDType::F32).square().sum().into_scalar().elem::<f64>();
        }
    }
}

use align_model::burn::tensor::ElementConversion;

/// Collects the paths of the trainable parameters (the keys of [`AdamW::state`]).
struct TrainablePaths {
    path: Path,
    found: std::collections::BTreeSet<String>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for TrainablePaths {
    fn enter_module(&mut self, name: &str, _container: &str) {
        self.path.enter(name);
    }
    fn exit_module(&mut self, _name: &str, _container: &str) {
        self.path.exit();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if param.val().is_require_grad() {
            self.found.insert(self.path.key());
        }
    }
}

/// The paths of `model`'s trainable parameters, as the optimizer keys their moments.
pub fn trainable_paths<B: AutodiffBackend, M: AutodiffModule<B>>(model: &M) -> std::collections::BTreeSet<String> {
    let mut v = TrainablePaths { path: Path::default(), found: Default::default() };
    model.visit(&mut v);
    v.found
}

/// The global L2 norm of the gradients (what `max_grad_norm` clips).
pub fn grad_norm<B: AutodiffBackend, M: AutodiffModule<B>>(model: &M, grads: &GradientsParams) -> f64 {
    let mut v = NormVisitor::<B> { grads, sum: 0.0, _b: std::marker::PhantomData };
    model.visit(&mut v);
    v.sum.sqrt()
}

struct Step<'a, B: AutodiffBackend> {
    opt: &'a mut AdamW<B>,
    grads: &'a mut GradientsParams,
    lr: f64,
    grad_scale: f64,
    path: Path,
}

impl<B: AutodiffBackend> ModuleMapper<B> for Step<'_, B> {
    fn enter_module(&mut self, name: &str, _container: &str) {
        self.path.enter(name);
    }
    fn exit_module(&mut self, _name: &str, _container: &str) {
        self.path.exit();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        let Some(g) = self.grads.remove::<B::InnerBackend, D>(id) else {
            return Param::from_mapped_value(id, tensor, mapper);
        };
        let key = self.path.key();
        let cfg = &self.opt.config;
        let shape = tensor.dims();
        let n: usize = shape.iter().product();
        let dtype = FloatDType::from(tensor.dtype());
        let g = g.reshape([n]).cast(FloatDType::F32) * self.grad_scale;
        let prev = self.opt.state.remove(&key);
        let mut p = match prev.as_ref().and_then(|s| s.master.clone()) {
            Some(master) => master,
            None => tensor.inner().reshape([n]).cast(FloatDType::F32),
        };
        if cfg.weight_decay > 0.0 && decays(&key, D, cfg) {
            p = p.clone() - p * (self.lr * cfg.weight_decay);
        }
        let (b1, b2) = (cfg.adam_beta1, cfg.adam_beta2);
        let (m, v) = match prev {
            Some(s) => (s.m * b1 + g.clone() * (1.0 - b1), s.v * b2 + g.square() * (1.0 - b2)),
            None => (g.clone() * (1.0 - b1), g.square() * (1.0 - b2)),
        };
        let t = self.opt.step as i32;
        let (c1, c2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
        let update = (m.clone() / c1) / ((v.clone() / c2).sqrt() + cfg.adam_epsilon);
        let p = p - update * self.lr;
        let master = (dtype != FloatDType::F32).then(|| p.clone());
        self.opt.state.insert(key, Moments { m, v, master });
        let p = Tensor::<B, D>::from_inner(p.cast(dtype).reshape(shape)).require_grad();
        Param::from_mapped_value(id, p, mapper)
    }
}

/// Puts the f32 master copies back in place of their low-precision parameters.
struct RestoreMasters<'a, B: AutodiffBackend> {
    opt: &'a AdamW<B>,
    path: Path,
}

impl<B: AutodiffBackend> ModuleMapper<B> for RestoreMasters<'_, B> {
    fn enter_module(&mut self, name: &str, _container: &str) {
        self.path.enter(name);
    }
    fn exit_module(&mut self, _name: &str, _container: &str) {
        self.path.exit();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        let Some(master) = self.opt.state.get(&self.path.key()).and_then(|s| s.master.clone()) else {
            return Param::from_mapped_value(id, tensor, mapper);
        };
        let t = Tensor::<B, D>::from_inner(master.reshape(tensor.dims()));
        Param::from_mapped_value(id, if tensor.is_require_grad() { t.require_grad() } else { t }, mapper)
    }
}

impl<B: AutodiffBackend> AdamW<B> {
    /// The model with every float parameter in f32 and each trained low-precision parameter
    /// replaced by its f32 master copy: what bf16 training exports at the end.
    pub fn model_with_masters<M: AutodiffModule<B>>(&self, model: M) -> M {
        let model = align_model::cast_float(model, FloatDType::F32);
        model.map(&mut RestoreMasters { opt: self, path: Path::default() })
    }

    pub fn new(config: AdamWConfig) -> Self {
        AdamW { config, step: 0, state: BTreeMap::new() }
    }

    /// One update with learning rate `lr`; gradients are multiplied by `grad_scale` first
    /// (clipping and accumulation averaging). Parameters without a gradient (frozen) are
    /// untouched and get no state.
    pub fn step<M: AutodiffModule<B>>(&mut self, model: M, mut grads: GradientsParams, lr: f64, grad_scale: f64) -> M {
        self.step += 1;
        let mut s = Step { opt: self, grads: &mut grads, lr, grad_scale, path: Path::default() };
        model.map(&mut s)
    }
}

/// The schedules of HF `get_scheduler`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    Constant,
    #[default]
    Linear,
    Cosine,
    CosineWithRestarts,
}

/// Learning rate at optimizer step `step` (0-based, before the update), as HF computes it:
/// linear warmup over `warmup` steps, then the schedule's decay over the rest.
pub fn learning_rate(base: f64, schedule: Schedule, step: usize, warmup: usize, total: usize, cycles: f64) -> f64 {
    if step < warmup {
        return base * step as f64 / warmup.max(1) as f64;
    }
    let progress = (step - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
    let f = match schedule {
        Schedule::Constant => 1.0,
        Schedule::Linear => {
            ((total.saturating_sub(step)) as f64 / (total.saturating_sub(warmup)).max(1) as f64).max(0.0)
        }
        Schedule::Cosine => (0.5 * (1.0 + (std::f64::consts::PI * cycles * 2.0 * progress).cos())).max(0.0),
        Schedule::CosineWithRestarts => {
            if progress >= 1.0 {
                0.0
            } else {
                (0.5 * (1.0 + (std::f64::consts::PI * ((cycles * progress) % 1.0)).cos())).max(0.0)
            }
        }
    };
    base * f
}

#[cfg(test)]
mod tests {
    use super::*;
    use align_model::backend::{Autodiff, Cpu};
    use align_model::burn::module::Module;
    use align_model::burn::tensor::TensorData;

    #[derive(Module, Debug)]
    struct Two<B: Backend> {
        w: Param<Tensor<B, 2>>,
        b: Param<Tensor<B, 1>>,
    }

    /// Two AdamW steps against the PyTorch formula computed by hand in f64.
    #[test]
    fn matches_torch_adamw() {
        type B = Autodiff<Cpu>;
        let dev = Default::default();
        let w0 = [0.5f64, -1.0, 2.0, 0.25];
        let b0 = [0.1f64, -0.2];
        let mut model = Two::<B> {
            w: Param::from_tensor(Tensor::from_data(TensorData::new(w0.map(|x| x as f32).to_vec(), [2, 2]), &dev)),
            b: Param::from_tensor(Tensor::from_data(TensorData::new(b0.map(|x| x as f32).to_vec(), [2]), &dev)),
        };
        let cfg = AdamWConfig { weight_decay: 0.1, ..Default::default() };
        let mut opt = AdamW::<B>::new(cfg.clone());
        let (lr, (b1, b2, eps, wd)): (f64, (f64, f64, f64, f64)) = (0.01, (0.9, 0.999, 1e-8, 0.1));
        // loss = sum(w^2) + sum(3 b)  => g_w = 2w, g_b = 3
        let (mut w, mut b) = (w0.to_vec(), b0.to_vec());
        let (mut mw, mut vw, mut mb, mut vb) = (vec![0.0; 4], vec![0.0; 4], vec![0.0; 2], vec![0.0; 2]);
        for t in 1..=2 {
            let loss = model.w.val().square().sum() + model.b.val().sum() * 3.0;
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            model = opt.step(model, grads, lr, 1.0);
            let (c1, c2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
            for i in 0..4 {
                let g = 2.0 * w[i];
                w[i] -= lr * wd * w[i];
                mw[i] = b1 * mw[i] + (1.0 - b1) * g;
                vw[i] = b2 * vw[i] + (1.0 - b2) * g * g;
                w[i] -= lr * (mw[i] / c1) / ((vw[i] / c2).sqrt() + eps);
            }
            for i in 0..2 {
                let g = 3.0;
                // 1-D: no decay
                mb[i] = b1 * mb[i] + (1.0 - b1) * g;
                vb[i] = b2 * vb[i] + (1.0 - b2) * g * g;
                b[i] -= lr * (mb[i] / c1) / ((vb[i] / c2).sqrt() + eps);
            }
        }
        let got_w: Vec<f32> = model.w.val().into_data().to_vec().unwrap();
        let got_b: Vec<f32> = model.b.val().into_data().to_vec().unwrap();
        for (a, e) in got_w.iter().zip(&w).chain(got_b.iter().zip(&b)) {
            assert!((*a as f64 - e).abs() < 1e-6, "{a} vs {e}");
        }
        assert_eq!(opt.state.len(), 2);
        assert!(
            opt.state.contains_key("w") && opt.state.contains_key("b"),
            "{:?}",
            opt.state.keys().collect::<Vec<_>>()
        );
    }

    /// bf16 parameters: steps far below a bf16 ulp (2^-8 at 1.0) accumulate in the f32
    /// master, the bf16 weight tracks the master's rounding, and the export is the master.
    #[test]
    fn bf16_parameters_keep_f32_masters() {
        type B = Autodiff<Cpu>;
        let dev = Default::default();
        let model = Two::<B> {
            w: Param::from_tensor(Tensor::from_data(TensorData::new(vec![1.0f32; 4], [2, 2]), &dev)),
            b: Param::from_tensor(Tensor::from_data(TensorData::new(vec![1.0f32; 2], [2]), &dev)),
        };
        let mut model = align_model::cast_float(model, FloatDType::BF16);
        assert_eq!(model.w.val().dtype(), FloatDType::BF16.into());
        let mut opt = AdamW::<B>::new(AdamWConfig::default());
        // loss = sum(w) + sum(b): a constant gradient, so each Adam step moves by ~lr.
        let lr = 1e-4;
        for _ in 0..30 {
            let loss = model.w.val().sum() + model.b.val().sum();
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            model = opt.step(model, grads, lr, 1.0);
            assert_eq!(model.w.val().dtype(), FloatDType::BF16.into());
        }
        // 30 steps of 1e-4: the master is at 0.997; bf16 alone would have stayed at 1.0.
        let master: Vec<f32> = opt.state["w"].master.clone().unwrap().into_data().to_vec().unwrap();
        for m in &master {
            assert!((*m as f64 - 0.997).abs() < 1e-6, "master {m}");
        }
        let bf16: Vec<f32> = model.w.val().into_data().convert::<f32>().to_vec().unwrap();
        assert_eq!(bf16[0], half::bf16::from_f32(master[0]).to_f32());
        let exported = opt.model_with_masters(model);
        assert_eq!(exported.w.val().dtype(), FloatDType::F32.into());
        let w: Vec<f32> = exported.w.val().into_data().to_vec().unwrap();
        assert_eq!(w, master);
    }

    #[test]
    fn schedules_follow_hf() {
        // warmup 10 of 100 steps, base 1.0
        assert_eq!(learning_rate(1.0, Schedule::Linear, 0, 10, 100, 0.5), 0.0);
        assert!((learning_rate(1.0, Schedule::Linear, 5, 10, 100, 0.5) - 0.5).abs() < 1e-12);
        assert!((learning_rate(1.0, Schedule::Linear, 55, 10, 100, 0.5) - 0.5).abs() < 1e-12);
        assert!((learning_rate(1.0, Schedule::Cosine, 55, 10, 100, 0.5) - 0.5).abs() < 1e-12);
        assert!((learning_rate(1.0, Schedule::Cosine, 10, 10, 100, 0.5) - 1.0).abs() < 1e-12);
        assert_eq!(learning_rate(1.0, Schedule::Constant, 99, 10, 100, 0.5), 1.0);
        // two restarts: the second cycle starts again at the top
        assert!((learning_rate(1.0, Schedule::CosineWithRestarts, 55, 10, 100, 2.0) - 1.0).abs() < 1e-12);
        assert!(learning_rate(1.0, Schedule::CosineWithRestarts, 54, 10, 100, 2.0) < 0.01);
    }
}
