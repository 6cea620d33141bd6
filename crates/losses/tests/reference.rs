//! Every case of every `fixtures/reference/losses/*.json` (TRL's own outputs, float64; torch's
//! for `contrastive`), checked twice: on `NdArray<f64>` to 1e-6 relative and on the default f32
//! CPU backend to 1e-4 (`|got − want| ≤ tol · max(1, |want|)`). Gradients (torch autograd's,
//! in `contrastive`) are checked on `Autodiff` of the same two backends at the same
//! tolerances. A section, config key or output this test does not know fails it, so a new
//! file or case cannot be silently skipped.

use std::path::{Path, PathBuf};

use align_losses::burn::backend::{Autodiff, Flex, NdArray};
use align_losses::burn::tensor::backend::Backend;
use align_losses::burn::tensor::{Int, Tensor, TensorData};
use align_losses::contrastive::{ContrastiveDirection, info_nce_loss};
use align_losses::grpo::{
    AdvantageConfig, GrpoLossType, GrpoObjective, MultiObjective, ScaleRewards, grpo_advantages, grpo_aggregate,
    grpo_clip_metrics, grpo_per_token_loss,
};
use align_losses::kl::KlEstimator;
use align_losses::kto::{KtoLossType, kto_loss, kto_reference_point};
use align_losses::ppo::{
    INVALID_LOGPROB, apply_missing_eos_penalty, gae, mask_after, masked_whiten, ppo_policy_loss, ppo_token_rewards,
    ppo_value_loss, sequence_lengths, truncate_after_stop, valid_mask,
};
use align_losses::preference::{
    DpoLossType, PreferenceMetrics, bradley_terry_loss, dpo_loss, orpo_loss, orpo_odds_ratio,
};
use align_losses::rloo::{rloo_advantages, rloo_loss};
use align_losses::{sequence_logprobs, sft_loss, token_logprobs};
use serde_json::Value;

const METADATA: [&str; 4] = ["seed", "dtype", "versions", "command"];

struct Checker {
    tol: f64,
    checked: usize,
    failures: Vec<String>,
    /// The largest `|got − want| / max(1, |want|)` seen.
    worst: f64,
}

impl Checker {
    fn num(&mut self, what: &str, got: f64, want: f64) {
        self.checked += 1;
        let err = (got - want).abs() / want.abs().max(1.0);
        if !want.is_nan() {
            self.worst = self.worst.max(err);
        }
        let ok = if want.is_nan() { got.is_nan() } else { err <= self.tol };
        if !ok {
            self.failures.push(format!("{what}: got {got}, want {want}"));
        }
    }
    fn vec(&mut self, what: &str, got: &[f64], want: &[f64]) {
        if got.len() != want.len() {
            self.failures.push(format!("{what}: {} values, want {}", got.len(), want.len()));
            return;
        }
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            self.num(&format!("{what}[{i}]"), *g, *w);
        }
    }
    fn mat(&mut self, what: &str, got: &[Vec<f64>], want: &[Vec<f64>]) {
        if got.len() != want.len() {
            self.failures.push(format!("{what}: {} rows, want {}", got.len(), want.len()));
            return;
        }
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            self.vec(&format!("{what}[{i}]"), g, w);
        }
    }
    fn unknown(&mut self, what: String) {
        self.failures.push(format!("{what}: not known to this test"));
    }
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}
fn v1(v: &Value) -> Vec<f64> {
    v.as_array().expect("a list").iter().map(f).collect()
}
fn v2(v: &Value) -> Vec<Vec<f64>> {
    v.as_array().expect("a list of lists").iter().map(v1).collect()
}
fn i2(v: &Value) -> Vec<Vec<i64>> {
    v.as_array().unwrap().iter().map(|r| r.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect()).collect()
}

fn t1<B: Backend>(v: &[f64]) -> Tensor<B, 1> {
    Tensor::from_data(TensorData::new(v.to_vec(), [v.len()]).convert::<B::FloatElem>(), &Default::default())
}
fn t2<B: Backend>(v: &[Vec<f64>]) -> Tensor<B, 2> {
    let (r, c) = (v.len(), v.first().map_or(0, |x| x.len()));
    Tensor::from_data(TensorData::new(v.concat(), [r, c]).convert::<B::FloatElem>(), &Default::default())
}
fn h1<B: Backend>(t: Tensor<B, 1>) -> Vec<f64> {
    t.into_data().convert::<f64>().to_vec().unwrap()
}
fn h0<B: Backend>(t: Tensor<B, 1>) -> f64 {
    h1(t)[0]
}
fn h2<B: Backend>(t: Tensor<B, 2>) -> Vec<Vec<f64>> {
    let [_, c] = t.dims();
    h1(t.flatten(0, 1)).chunks(c).map(|x| x.to_vec()).collect()
}
fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

/// Fails on config keys outside `known`.
fn config_keys(c: &mut Checker, what: &str, config: &Value, known: &[&str]) {
    for k in config.as_object().unwrap().keys() {
        if !known.contains(&k.as_str()) {
            c.unknown(format!("{what}: config key {k}"));
        }
    }
}

/// Calls `check(name, value)` for every output; names it does not handle fail.
fn outputs(c: &mut Checker, what: &str, out: &Value, mut check: impl FnMut(&mut Checker, &str, &Value) -> bool) {
    for (k, v) in out.as_object().unwrap() {
        if !check(c, k, v) {
            c.unknown(format!("{what}: output {k}"));
        }
    }
}

fn dpo<B: Backend>(c: &mut Checker, s: &Value) {
    let inp = &s["inputs"];
    let cm = v2(&inp["completion_mask"]);
    let logps = v2(&inp["per_token_logps"]);
    let shifted: Vec<Vec<f64>> = cm.iter().map(|r| r[1..].to_vec()).collect();
    let seq = h1(sequence_logprobs(t2::<B>(&logps), t2::<B>(&shifted), false));
    let b = seq.len() / 2;
    let (pc, pr) = (v1(&inp["policy_chosen_logps"]), v1(&inp["policy_rejected_logps"]));
    c.vec("dpo.policy_chosen_logps from per_token_logps", &seq[..b], &pc);
    c.vec("dpo.policy_rejected_logps from per_token_logps", &seq[b..], &pr);
    let (rc, rr) = (v1(&inp["ref_chosen_logps"]), v1(&inp["ref_rejected_logps"]));
    let ntok: Vec<f64> = shifted.iter().map(|r| r.iter().sum()).collect();
    for (i, case) in s["cases"].as_array().unwrap().iter().enumerate() {
        let what = format!("dpo.cases[{i}]");
        let cfg = &case["config"];
        config_keys(c, &what, cfg, &["loss_type", "beta", "label_smoothing"]);
        let beta = f(&cfg["beta"]);
        let ls = f(&cfg["label_smoothing"]);
        let run = |lt: DpoLossType| {
            dpo_loss(
                t1::<B>(&pc),
                t1::<B>(&pr),
                t1::<B>(&rc),
                t1::<B>(&rr),
                t1::<B>(&ntok[..b]),
                t1::<B>(&ntok[b..]),
                lt,
                beta,
                ls,
            )
        };
        let lt = match cfg["loss_type"].as_str() {
            Some("sigmoid") => DpoLossType::Sigmoid,
            Some("robust") => DpoLossType::Robust,
            Some("hinge") => DpoLossType::Hinge,
            Some("ipo") => DpoLossType::Ipo,
            other => {
                c.unknown(format!("{what}: loss_type {other:?}"));
                continue;
            }
        };
        let terms = run(lt);
        let losses = h1(terms.losses);
        let (cr, rj) = (h1(terms.chosen_rewards), h1(terms.rejected_rewards));
        let m = PreferenceMetrics::from_rewards(&cr, &rj);
        outputs(c, &what, &case["outputs"], |c, k, v| {
            let w = format!("{what}.{k}");
            match k {
                "loss" => c.num(&w, mean(&losses), f(v)),
                "per_pair_loss" => c.vec(&w, &losses, &v1(v)),
                "chosen_logratios" => c.vec(&w, &cr.iter().map(|x| x / beta).collect::<Vec<_>>(), &v1(v)),
                "rejected_logratios" => c.vec(&w, &rj.iter().map(|x| x / beta).collect::<Vec<_>>(), &v1(v)),
                "chosen_rewards" => c.vec(&w, &cr, &v1(v)),
                "rejected_rewards" => c.vec(&w, &rj, &v1(v)),
                "reward_margins" => c.vec(&w, &cr.iter().zip(&rj).map(|(a, b)| a - b).collect::<Vec<_>>(), &v1(v)),
                "reward_accuracy" => c.num(&w, m.accuracy, f(v)),
                "legacy_cdpo_loss_trl_le_0_28" => c.num(&w, mean(&h1(run(DpoLossType::Cdpo).losses)), f(v)),
                "trl_logged_metrics" => outputs(c, &w, v, |c, k, v| {
                    let got = match k {
                        "rewards/chosen" => m.chosen,
                        "rewards/rejected" => m.rejected,
                        "rewards/accuracies" => m.accuracy,
                        "rewards/margins" => m.margin,
                        _ => return false,
                    };
                    c.num(&format!("{w}.{k}"), got, f(v));
                    true
                }),
                _ => return false,
            }
            true
        });
    }
}

fn orpo<B: Backend>(c: &mut Checker, s: &Value, f32_tol: f64) {
    for (i, case) in s["cases"].as_array().unwrap().iter().enumerate() {
        let what = format!("orpo.cases[{i}]");
        config_keys(c, &what, &case["config"], &["beta_aka_lambda"]);
        let lambda = f(&case["config"]["beta_aka_lambda"]);
        let inp = &case["inputs"];
        let (ch, rj) = (v1(&inp["chosen_avg_logps"]), v1(&inp["rejected_avg_logps"]));
        let nll = f(&inp["policy_nll_loss"]);
        let terms = orpo_odds_ratio(t1::<B>(&ch), t1::<B>(&rj), lambda);
        let loss = h0(orpo_loss(t1::<B>(&[nll]), &terms));
        let losses = h1(terms.losses.clone());
        let log_odds = h1(terms.log_odds.clone());
        let (cr, rr) = (h1(terms.chosen_rewards.clone()), h1(terms.rejected_rewards.clone()));
        outputs(c, &what, &case["outputs"], |c, k, v| {
            // TRL's own float32 run: compared at the float32 tolerance.
            let tol = if k == "trl_float32" { f32_tol.max(c.tol) } else { c.tol };
            let saved = std::mem::replace(&mut c.tol, tol);
            let w = format!("{what}.{k}");
            let known = matches!(k, "trl_float32" | "float64");
            if known {
                outputs(c, &w, v, |c, k, v| {
                    let w = format!("{w}.{k}");
                    match k {
                        "losses" => c.vec(&w, &losses, &v1(v)),
                        "log_odds" => c.vec(&w, &log_odds, &v1(v)),
                        "loss" => c.num(&w, loss, f(v)),
                        "chosen_rewards" => c.vec(&w, &cr, &v1(v)),
                        "rejected_rewards" => c.vec(&w, &rr, &v1(v)),
                        "mean_log_odds" => c.num(&w, mean(&log_odds), f(v)),
                        "mean_log_sigmoid_log_odds" => c.num(&w, mean(&losses) / lambda, f(v)),
                        _ => return false,
                    }
                    true
                });
            }
            c.tol = saved;
            known
        });
    }
    // From logits: log-probs, averaged completion log-probs, TRL's prompt+chosen NLL.
    let e = &s["end_to_end_from_logits"];
    let what = "orpo.end_to_end_from_logits";
    config_keys(c, what, &e["config"], &["beta_aka_lambda"]);
    let lambda = f(&e["config"]["beta_aka_lambda"]);
    let inp = &e["inputs"];
    let ids: Vec<Vec<i64>> = [i2(&inp["chosen_input_ids"]), i2(&inp["rejected_input_ids"])].concat();
    let att: Vec<Vec<i64>> = [i2(&inp["chosen_attention_mask"]), i2(&inp["rejected_attention_mask"])].concat();
    let labels: Vec<Vec<i64>> = [i2(&inp["chosen_labels"]), i2(&inp["rejected_labels"])].concat();
    let logits: Vec<Vec<Vec<f64>>> = inp["logits"].as_array().unwrap().iter().map(v2).collect();
    let (rows, t, v) = (logits.len(), logits[0].len(), logits[0][0].len());
    let flat: Vec<f64> = logits.iter().flat_map(|r| r[..t - 1].concat()).collect();
    let lg = Tensor::<B, 3>::from_data(
        TensorData::new(flat, [rows, t - 1, v]).convert::<B::FloatElem>(),
        &Default::default(),
    );
    let tg: Vec<i64> = ids.iter().flat_map(|r| r[1..].to_vec()).collect();
    let targets = Tensor::<B, 2, Int>::from_data(TensorData::new(tg, [rows, t - 1]), &Default::default());
    let logp = token_logprobs(lg, targets, 1.0);
    let cast_f64 = |m: &[Vec<i64>], keep: &dyn Fn(i64) -> bool| -> Vec<Vec<f64>> {
        m.iter().map(|r| r[1..].iter().map(|&x| if keep(x) { 1.0 } else { 0.0 }).collect()).collect()
    };
    let completion = cast_f64(&labels, &|x| x != -100);
    let attended = cast_f64(&att, &|x| x == 1);
    let avg = h1(sequence_logprobs(logp.clone(), t2::<B>(&completion), true));
    let b = rows / 2;
    let chosen_logp = logp.clone().slice([0..b, 0..t - 1]);
    let nll = sft_loss(chosen_logp.clone(), t2::<B>(&attended[..b]));
    let nll_completion = h0(sft_loss(chosen_logp, t2::<B>(&completion[..b])));
    let terms = orpo_odds_ratio(t1::<B>(&avg[..b]), t1::<B>(&avg[b..]), lambda);
    let loss = h0(orpo_loss(nll.clone(), &terms));
    let losses = h1(terms.losses.clone());
    let nll = h0(nll);
    outputs(c, what, &e["outputs"], |c, k, val| {
        let w = format!("{what}.{k}");
        match k {
            "chosen_avg_logps" => c.vec(&w, &avg[..b], &v1(val)),
            "rejected_avg_logps" => c.vec(&w, &avg[b..], &v1(val)),
            "policy_nll_loss" => c.num(&w, nll, f(val)),
            "loss" => c.num(&w, loss, f(val)),
            "nll_if_completion_only_NOT_what_trl_does" => c.num(&w, nll_completion, f(val)),
            "losses_float32" => {
                let tol = f32_tol.max(c.tol);
                let saved = std::mem::replace(&mut c.tol, tol);
                c.vec(&w, &losses, &v1(val));
                c.tol = saved;
            }
            _ => return false,
        }
        true
    });
}

fn reward_model<B: Backend>(c: &mut Checker, s: &Value) {
    let inp = &s["inputs"];
    let (rc, rr, margin) = (v1(&inp["rewards_chosen"]), v1(&inp["rewards_rejected"]), v1(&inp["margin"]));
    for (i, case) in s["cases"].as_array().unwrap().iter().enumerate() {
        let what = format!("reward_model.cases[{i}]");
        let cfg = &case["config"];
        config_keys(c, &what, cfg, &["margin", "center_rewards_coefficient"]);
        let m = cfg["margin"].as_bool().unwrap().then(|| t1::<B>(&margin));
        let center = cfg["center_rewards_coefficient"].as_f64();
        let loss = mean(&h1(bradley_terry_loss(t1::<B>(&rc), t1::<B>(&rr), m, center)));
        let metrics = PreferenceMetrics::from_rewards(&rc, &rr);
        outputs(c, &what, &case["outputs"], |c, k, v| {
            let got = match k {
                "loss" => loss,
                "accuracy" => metrics.accuracy,
                "mean_margin" => metrics.margin,
                _ => return false,
            };
            c.num(&format!("{what}.{k}"), got, f(v));
            true
        });
    }
}

fn grpo_loss<B: Backend>(c: &mut Checker, s: &Value) {
    let inp = &s["inputs"];
    let mask = v2(&inp["completion_mask"]);
    let adv = v1(&inp["advantages"]);
    let (old, new, reference) =
        (v2(&inp["old_per_token_logps"]), v2(&inp["new_per_token_logps"]), v2(&inp["ref_per_token_logps"]));
    let masked = |x: &[Vec<f64>]| -> Vec<Vec<f64>> {
        x.iter().zip(&mask).map(|(r, m)| r.iter().zip(m).map(|(a, b)| a * b).collect()).collect()
    };
    for (i, case) in s["cases"].as_array().unwrap().iter().enumerate() {
        let what = format!("grpo_loss.cases[{i}]");
        let cfg = &case["config"];
        config_keys(
            c,
            &what,
            cfg,
            &[
                "loss_type",
                "beta",
                "epsilon",
                "epsilon_high",
                "use_bias_correction_kl",
                "on_policy_old_logps_absent",
                "max_completion_length",
                "num_items_in_batch",
                "importance_sampling_level",
                "num_processes",
                "gradient_accumulation_steps",
            ],
        );
        if cfg["importance_sampling_level"] != "token"
            || cfg["num_processes"] != 1
            || cfg["gradient_accumulation_steps"] != 1
        {
            c.unknown(format!("{what}: sequence-level sampling, several processes or accumulation"));
            continue;
        }
        let loss_type = match cfg["loss_type"].as_str() {
            Some("grpo") => GrpoLossType::Grpo,
            Some("bnpo") => GrpoLossType::Bnpo,
            Some("dr_grpo") => GrpoLossType::DrGrpo,
            Some("dapo") => GrpoLossType::Dapo,
            other => {
                c.unknown(format!("{what}: loss_type {other:?}"));
                continue;
            }
        };
        let eps = f(&cfg["epsilon"]);
        let eps_high = cfg["epsilon_high"].as_f64().unwrap_or(eps);
        let objective = GrpoObjective {
            clip: Some((eps, eps_high)),
            beta: f(&cfg["beta"]),
            use_bias_correction_kl: cfg["use_bias_correction_kl"].as_bool().unwrap(),
        };
        let on_policy = cfg["on_policy_old_logps_absent"].as_bool().unwrap();
        let old_t = (!on_policy).then(|| t2::<B>(&old));
        let terms = grpo_per_token_loss(t2::<B>(&new), old_t, Some(t2::<B>(&reference)), t1::<B>(&adv), &objective);
        let loss = h0(grpo_aggregate(
            terms.per_token_loss.clone(),
            t2::<B>(&mask),
            loss_type,
            cfg["max_completion_length"].as_u64().unwrap() as usize,
            f(&cfg["num_items_in_batch"]),
        ));
        let ptl = masked(&h2(terms.per_token_loss));
        let kl = terms.per_token_kl.map(|k| masked(&h2(k)));
        let ratio = h2(terms.ratio);
        let clip = grpo_clip_metrics(&ratio, &adv, &mask, eps, eps_high);
        let active: f64 = mask.iter().flatten().sum();
        outputs(c, &what, &case["outputs"], |c, k, v| {
            let w = format!("{what}.{k}");
            match k {
                "loss" => c.num(&w, loss, f(v)),
                "per_token_loss" => c.mat(&w, &ptl, &v2(v)),
                "per_token_kl" if v.is_null() => {
                    if kl.is_some() {
                        c.failures.push(format!("{w}: a KL where TRL has none"));
                    }
                }
                "per_token_kl" => match &kl {
                    Some(kl) => c.mat(&w, kl, &masked(&v2(v))),
                    None => c.failures.push(format!("{w}: no KL computed")),
                },
                "trl_logged_metrics" => outputs(c, &w, v, |c, k, v| {
                    let got = match k {
                        "kl" => kl.as_ref().map_or(f64::NAN, |kl| kl.iter().flatten().sum::<f64>() / active),
                        "clip_ratio/low_mean" => clip.low_mean,
                        "clip_ratio/high_mean" => clip.high_mean,
                        "clip_ratio/region_mean" => clip.region_mean,
                        "clip_ratio/low_min" => clip.low_min,
                        "clip_ratio/high_max" => clip.high_max,
                        _ => return false,
                    };
                    c.num(&format!("{w}.{k}"), got, f(v));
                    true
                }),
                _ => return false,
            }
            true
        });
    }
}

fn grpo_advantages_section(c: &mut Checker, s: &Value) {
    let inp = &s["inputs"];
    let rpf: Vec<Vec<Option<f64>>> = inp["rewards_per_func"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_array().unwrap().iter().map(|x| x.as_f64()).collect())
        .collect();
    let weights = v1(&inp["reward_weights"]);
    let g = inp["num_generations"].as_u64().unwrap() as usize;
    for (i, case) in s["cases"].as_array().unwrap().iter().enumerate() {
        let what = format!("grpo_advantages.cases[{i}]");
        let cfg = &case["config"];
        config_keys(c, &what, cfg, &["multi_objective_aggregation", "scale_rewards"]);
        let multi = match cfg["multi_objective_aggregation"].as_str() {
            Some("sum_then_normalize") => MultiObjective::SumThenNormalize,
            Some("normalize_then_sum") => MultiObjective::NormalizeThenSum,
            other => {
                c.unknown(format!("{what}: multi_objective_aggregation {other:?}"));
                continue;
            }
        };
        let scale = match cfg["scale_rewards"].as_str() {
            Some("group") => ScaleRewards::Group,
            Some("batch") => ScaleRewards::Batch,
            Some("none") => ScaleRewards::None,
            other => {
                c.unknown(format!("{what}: scale_rewards {other:?}"));
                continue;
            }
        };
        let cfg = AdvantageConfig { scale_rewards: scale, multi_objective: multi, ..Default::default() };
        let got = grpo_advantages(&rpf, &weights, g, &cfg).unwrap();
        outputs(c, &what, &case["outputs"], |c, k, v| {
            let w = format!("{what}.{k}");
            match k {
                "rewards" => c.vec(&w, &got.rewards.iter().map(|r| r.unwrap_or(f64::NAN)).collect::<Vec<_>>(), &v1(v)),
                "std" => c.vec(&w, &got.std, &v1(v)),
                "advantages" => c.vec(&w, &got.advantages, &v1(v)),
                _ => return false,
            }
            true
        });
    }
    let r = &s["single_func_random"];
    let rewards: Vec<Vec<Option<f64>>> = v1(&r["rewards"]).iter().map(|x| vec![Some(*x)]).collect();
    let g = r["num_generations"].as_u64().unwrap() as usize;
    outputs(c, "grpo_advantages.single_func_random", r, |c, k, v| {
        let scale = match k {
            "rewards" | "num_generations" => return true,
            "advantages_group_scaled" => ScaleRewards::Group,
            "advantages_unscaled" => ScaleRewards::None,
            _ => return false,
        };
        let cfg = AdvantageConfig { scale_rewards: scale, ..Default::default() };
        let got = grpo_advantages(&rewards, &[1.0], g, &cfg).unwrap();
        c.vec(&format!("grpo_advantages.single_func_random.{k}"), &got.advantages, &v1(v));
        true
    });
}

fn ppo<B: Backend>(c: &mut Checker, s: &Value) {
    let inp = &s["inputs"];
    let responses = i2(&inp["responses"]);
    let pad = inp["pad_token_id"].as_i64().unwrap();
    let eos = inp["eos_token_id"].as_i64().unwrap();
    let stop = inp["stop_token_id"].as_i64().unwrap();
    let post = truncate_after_stop(&responses, stop, pad);
    let lens = sequence_lengths(&post, pad);
    let width = responses[0].len();
    let logprobs = mask_after(&v2(&inp["logprobs"]), &lens, 0, INVALID_LOGPROB);
    let ref_logprobs = mask_after(&v2(&inp["ref_logprobs"]), &lens, 0, INVALID_LOGPROB);
    let values = mask_after(&v2(&inp["values"]), &lens, 1, 0.0);
    let new_logprobs = mask_after(&v2(&inp["new_logprobs"]), &lens, 0, INVALID_LOGPROB);
    let vpred = mask_after(&v2(&inp["vpred"]), &lens, 1, 0.0);
    let valid = valid_mask(width, &lens, 0);
    let valid_p1 = valid_mask(width, &lens, 1);
    let flip = |m: &[Vec<f64>]| -> Vec<Vec<f64>> { m.iter().map(|r| r.iter().map(|x| 1.0 - x).collect()).collect() };
    for (i, case) in s["cases"].as_array().unwrap().iter().enumerate() {
        let what = format!("ppo.cases[{i}]");
        let cfg = &case["config"];
        config_keys(
            c,
            &what,
            cfg,
            &[
                "kl_coef",
                "kl_estimator",
                "whiten_rewards",
                "gamma",
                "lam",
                "missing_eos_penalty",
                "cliprange",
                "cliprange_value",
                "vf_coef",
            ],
        );
        let estimator = match cfg["kl_estimator"].as_str() {
            Some("k1") => KlEstimator::K1,
            Some("k3") => KlEstimator::K3,
            other => {
                c.unknown(format!("{what}: kl_estimator {other:?}"));
                continue;
            }
        };
        let mut scores = v1(&inp["scores"]);
        if let Some(p) = cfg["missing_eos_penalty"].as_f64() {
            scores = apply_missing_eos_penalty(&scores, &post, eos, p);
        }
        let r = ppo_token_rewards(&logprobs, &ref_logprobs, &scores, &lens, f(&cfg["kl_coef"]), estimator);
        let mut rewards = r.rewards.clone();
        if cfg["whiten_rewards"].as_bool().unwrap() {
            rewards = mask_after(&masked_whiten(&rewards, &valid_p1, false).unwrap(), &lens, 1, 0.0);
        }
        let (adv_raw, returns) = gae(&rewards, &values, f(&cfg["gamma"]), f(&cfg["lam"]));
        let adv = mask_after(&masked_whiten(&adv_raw, &valid, true).unwrap(), &lens, 0, 0.0);
        let pg = ppo_policy_loss(
            t2::<B>(&new_logprobs),
            t2::<B>(&logprobs),
            t2::<B>(&adv),
            t2::<B>(&valid),
            f(&cfg["cliprange"]),
        );
        let vf = ppo_value_loss(
            t2::<B>(&vpred),
            t2::<B>(&values),
            t2::<B>(&returns),
            t2::<B>(&valid_p1),
            f(&cfg["cliprange_value"]),
        );
        let (pg_loss, vf_loss) = (h0(pg.loss), h0(vf.loss));
        let loss = pg_loss + f(&cfg["vf_coef"]) * vf_loss;
        let (pg_clip, approxkl, vf_clip) = (h0(pg.clipfrac), h0(pg.approxkl), h0(vf.clipfrac));
        outputs(c, &what, &case["outputs"], |c, k, v| {
            let w = format!("{what}.{k}");
            match k {
                "scores_after_missing_eos_penalty" => c.vec(&w, &scores, &v1(v)),
                "sequence_lengths" => c.vec(&w, &lens.iter().map(|&l| l as f64).collect::<Vec<_>>(), &v1(v)),
                "padding_mask" => c.mat(&w, &flip(&valid), &v2(v)),
                "padding_mask_p1" => c.mat(&w, &flip(&valid_p1), &v2(v)),
                "logprobs_masked" => c.mat(&w, &logprobs, &v2(v)),
                "ref_logprobs_masked" => c.mat(&w, &ref_logprobs, &v2(v)),
                "values_masked" => c.mat(&w, &values, &v2(v)),
                "kl" => c.mat(&w, &r.kl, &v2(v)),
                "non_score_reward" => c.mat(&w, &r.non_score_reward, &v2(v)),
                "rewards" => c.mat(&w, &rewards, &v2(v)),
                "advantages_raw" => c.mat(&w, &adv_raw, &v2(v)),
                "returns" => c.mat(&w, &returns, &v2(v)),
                "advantages_whitened" => c.mat(&w, &adv, &v2(v)),
                "pg_loss" => c.num(&w, pg_loss, f(v)),
                "vf_loss" => c.num(&w, vf_loss, f(v)),
                "loss" => c.num(&w, loss, f(v)),
                "pg_clipfrac" => c.num(&w, pg_clip, f(v)),
                "vf_clipfrac" => c.num(&w, vf_clip, f(v)),
                "approxkl" => c.num(&w, approxkl, f(v)),
                _ => return false,
            }
            true
        });
    }
}

fn kto<B: Backend>(c: &mut Checker, s: &Value) {
    let inp = &s["inputs"];
    let labels: Vec<bool> = inp["labels"].as_array().unwrap().iter().map(|x| x.as_bool().unwrap()).collect();
    let (logps, ref_logps) = (v1(&inp["policy_logps"]), v1(&inp["ref_logps"]));
    let (kl_logps, ref_kl_logps) = (v1(&inp["policy_kl_logps"]), v1(&inp["ref_kl_logps"]));
    for (i, case) in s["cases"].as_array().unwrap().iter().enumerate() {
        let what = format!("kto.cases[{i}]");
        let cfg = &case["config"];
        config_keys(c, &what, cfg, &["loss_type", "beta", "desirable_weight", "undesirable_weight", "kl_shift"]);
        let loss_type = match cfg["loss_type"].as_str() {
            Some("kto") => KtoLossType::Kto,
            Some("apo_zero_unpaired") => KtoLossType::ApoZeroUnpaired,
            other => {
                c.unknown(format!("{what}: loss_type {other:?}"));
                continue;
            }
        };
        let shift = cfg["kl_shift"].as_f64().unwrap_or(0.0);
        let shifted: Vec<f64> = kl_logps.iter().map(|x| x + shift).collect();
        let z = if loss_type.uses_reference_point() { kto_reference_point(&shifted, &ref_kl_logps) } else { 0.0 };
        let t = kto_loss(
            t1::<B>(&logps),
            t1::<B>(&ref_logps),
            &labels,
            z,
            f(&cfg["beta"]),
            f(&cfg["desirable_weight"]),
            f(&cfg["undesirable_weight"]),
            loss_type,
        );
        let (losses, rewards) = (h1(t.losses), h1(t.rewards));
        let pick = |v: &[f64], want: bool| -> Vec<f64> {
            v.iter().zip(&labels).filter(|(_, l)| **l == want).map(|(x, _)| *x).collect()
        };
        outputs(c, &what, &case["outputs"], |c, k, v| {
            let w = format!("{what}.{k}");
            match k {
                "loss" => c.num(&w, mean(&losses), f(v)),
                "kl" => c.num(&w, z, f(v)),
                "chosen_losses" => c.vec(&w, &pick(&losses, true), &v1(v)),
                "rejected_losses" => c.vec(&w, &pick(&losses, false), &v1(v)),
                "chosen_rewards" => c.vec(&w, &pick(&rewards, true), &v1(v)),
                "rejected_rewards" => c.vec(&w, &pick(&rewards, false), &v1(v)),
                _ => return false,
            }
            true
        });
    }
}

fn rloo_advantages_section(c: &mut Checker, s: &Value) {
    let inp = &s["inputs"];
    let rpf: Vec<Vec<Option<f64>>> = inp["rewards_per_func"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_array().unwrap().iter().map(|x| x.as_f64()).collect())
        .collect();
    let weights = v1(&inp["reward_weights"]);
    let kl = v1(&inp["sequence_kl"]);
    let g = inp["num_generations"].as_u64().unwrap() as usize;
    for (i, case) in s["cases"].as_array().unwrap().iter().enumerate() {
        let what = format!("rloo_advantages.cases[{i}]");
        let cfg = &case["config"];
        config_keys(c, &what, cfg, &["beta", "normalize_advantages", "reward_clip_range"]);
        let clip = cfg["reward_clip_range"].as_array().map(|r| (f(&r[0]), f(&r[1])));
        let normalize = cfg["normalize_advantages"].as_bool().unwrap();
        let got = rloo_advantages(&rpf, &weights, Some(&kl), f(&cfg["beta"]), g, normalize, clip).unwrap();
        outputs(c, &what, &case["outputs"], |c, k, v| {
            let w = format!("{what}.{k}");
            match k {
                "rewards" => c.vec(&w, &got.rewards, &v1(v)),
                "advantages" => c.vec(&w, &got.advantages, &v1(v)),
                _ => return false,
            }
            true
        });
    }
}

fn rloo_loss_section<B: Backend>(c: &mut Checker, s: &Value) {
    let inp = &s["inputs"];
    let logps =
        h1(sequence_logprobs(t2::<B>(&v2(&inp["per_token_logps"])), t2::<B>(&v2(&inp["completion_mask"])), false));
    let (old, adv) = (v1(&inp["old_logps"]), v1(&inp["advantages"]));
    let ratio: Vec<Vec<f64>> = logps.iter().zip(&old).map(|(l, o)| vec![(l - o).exp()]).collect();
    let ones = vec![vec![1.0]; adv.len()];
    for (i, case) in s["cases"].as_array().unwrap().iter().enumerate() {
        let what = format!("rloo_loss.cases[{i}]");
        let cfg = &case["config"];
        config_keys(c, &what, cfg, &["epsilon_low", "epsilon_high"]);
        let (lo, hi) = (f(&cfg["epsilon_low"]), f(&cfg["epsilon_high"]));
        let per_sequence = h1(rloo_loss(t1::<B>(&logps), t1::<B>(&old), t1::<B>(&adv), lo, hi));
        let clip = grpo_clip_metrics(&ratio, &adv, &ones, lo, hi);
        outputs(c, &what, &case["outputs"], |c, k, v| {
            let w = format!("{what}.{k}");
            match k {
                "loss" => c.num(&w, mean(&per_sequence), f(v)),
                "per_sequence_loss" => c.vec(&w, &per_sequence, &v1(v)),
                "clip_ratio/low_mean" => c.num(&w, clip.low_mean, f(v)),
                "clip_ratio/high_mean" => c.num(&w, clip.high_mean, f(v)),
                "clip_ratio/region_mean" => c.num(&w, clip.region_mean, f(v)),
                _ => return false,
            }
            true
        });
    }
}

/// InfoNCE on each case's own inputs, on `Autodiff<B>` so that torch's gradients of the loss
/// with respect to both inputs are checked along with the values.
fn contrastive<B: Backend>(c: &mut Checker, s: &Value) {
    for (i, case) in s["cases"].as_array().unwrap().iter().enumerate() {
        let what = format!("contrastive.cases[{i}]");
        let cfg = &case["config"];
        config_keys(c, &what, cfg, &["direction", "temperature"]);
        let direction = match cfg["direction"].as_str() {
            Some("symmetric") => ContrastiveDirection::Symmetric,
            Some("prompt_to_response") => ContrastiveDirection::PromptToResponse,
            other => {
                c.unknown(format!("{what}: direction {other:?}"));
                continue;
            }
        };
        let inp = &case["inputs"];
        let prompt = t2::<Autodiff<B>>(&v2(&inp["prompt"])).require_grad();
        let response = t2::<Autodiff<B>>(&v2(&inp["response"])).require_grad();
        let out = info_nce_loss(prompt.clone(), response.clone(), f(&cfg["temperature"]), direction);
        let metrics = out.metrics();
        let grads = out.loss.backward();
        let grad_prompt = prompt.grad(&grads).map(h2);
        let grad_response = response.grad(&grads).map(h2);
        let (loss, logits) = (h0(out.loss), h2(out.logits));
        outputs(c, &what, &case["outputs"], |c, k, v| {
            let w = format!("{what}.{k}");
            match k {
                "loss" => c.num(&w, loss, f(v)),
                "logits" => c.mat(&w, &logits, &v2(v)),
                "accuracy" => c.num(&w, metrics.accuracy, f(v)),
                "accuracy_response_to_prompt" => c.num(&w, metrics.accuracy_response_to_prompt, f(v)),
                "grad_prompt" | "grad_response" => {
                    match if k == "grad_prompt" { &grad_prompt } else { &grad_response } {
                        Some(g) => c.mat(&w, g, &v2(v)),
                        None => c.failures.push(format!("{w}: no gradient")),
                    }
                }
                _ => return false,
            }
            true
        });
    }
}

fn reference_files() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/reference/losses");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no reference files in {}", dir.display());
    files
}

fn check_all<B: Backend>(tol: f64) -> Checker {
    let mut c = Checker { tol, checked: 0, failures: vec![], worst: 0.0 };
    for path in reference_files() {
        let doc: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let before = c.failures.len();
        for (section, s) in doc.as_object().unwrap() {
            match section.as_str() {
                k if METADATA.contains(&k) => {}
                "dpo" => dpo::<B>(&mut c, s),
                "orpo" => orpo::<B>(&mut c, s, 1e-4),
                "reward_model" => reward_model::<B>(&mut c, s),
                "grpo_loss" => grpo_loss::<B>(&mut c, s),
                "grpo_advantages" => grpo_advantages_section(&mut c, s),
                "ppo" => ppo::<B>(&mut c, s),
                "kto" => kto::<B>(&mut c, s),
                "rloo_advantages" => rloo_advantages_section(&mut c, s),
                "rloo_loss" => rloo_loss_section::<B>(&mut c, s),
                "contrastive" => contrastive::<B>(&mut c, s),
                other => c.unknown(format!("section {other}")),
            }
        }
        for f in &mut c.failures[before..] {
            *f = format!("{}: {f}", path.display());
        }
    }
    c
}

fn report(c: Checker, what: &str) {
    eprintln!(
        "{what}: {} values checked, worst relative error {:.2e}, {} failures",
        c.checked,
        c.worst,
        c.failures.len()
    );
    assert!(c.failures.is_empty(), "{what}:\n{}", c.failures.join("\n"));
    assert!(c.checked > 500, "only {} values checked", c.checked);
}

#[test]
fn every_reference_case_in_f64() {
    report(check_all::<NdArray<f64>>(1e-6), "f64");
}

#[test]
fn every_reference_case_in_f32() {
    report(check_all::<Flex>(1e-4), "f32");
}
