//! Data-parallel runs against one device with the same global batch: two CPU replicas in
//! one process (threads) and two processes meeting through the orchestrator on 127.0.0.1
//! end with the same weights (within 1e-5) and log the same metrics as one device running
//! twice the gradient accumulation.

use crate::common::{metrics, rl_config, root, stage_head, tmp};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use align_model::backend::Cpu;
use align_model::weights::{SafetensorsSource, WeightSource};
use align_pipeline::config::StageConfig;
use align_pipeline::train::StepMetrics;

/// A LoRA SFT or DPO config on the tiny checkpoint: `accumulation` micro-batches of 2 rows per
/// replica, 5 steps. LoRA dropout off: the replicas of one process share the CPU backend's
/// random generator, so dropout masks would depend on thread timing.
fn config(out: &Path, stage: &str, accumulation: usize, extra: &str) -> String {
    let (data, adapter, section) = match stage {
        "sft" => ("fixtures/data/gsm8k_train_head.jsonl", "gsm8k_sft", ""),
        _ => ("fixtures/data/piqa_head.jsonl", "piqa_preference", "[dpo]\n"),
    };
    format!(
        r#"{head}[tokenize]
max_length = 128
max_prompt_length = 64
[lora]
r = 4
lora_alpha = 8
lora_dropout = 0.0
[training]
per_device_train_batch_size = 2
gradient_accumulation_steps = {accumulation}
learning_rate = 2e-3
max_steps = 5
logging_steps = 1
save_steps = 2
seed = 7
{section}{extra}"#,
        head = stage_head(out, data, adapter, 16),
    )
}

fn run(stage: &str, cfg: &StageConfig) -> PathBuf {
    match stage {
        "sft" => align_pipeline::sft::run_sft::<Cpu>(cfg, false, &Default::default()).unwrap(),
        _ => align_pipeline::preference::run_preference::<Cpu>(
            cfg,
            align_pipeline::preference::PairwiseStage::Dpo,
            false,
            &Default::default(),
        )
        .unwrap(),
    }
}

/// Every tensor of `final/`'s adapter (or full weights), by name.
fn adapter(final_dir: &Path) -> Vec<(String, Vec<f32>)> {
    let file = match final_dir.join("adapter_model.safetensors") {
        f if f.exists() => f,
        _ => final_dir.join("model.safetensors"),
    };
    let mut src = SafetensorsSource::open_files(&[file]).unwrap();
    let mut names = src.names();
    names.sort();
    names.into_iter().map(|n| (n.clone(), src.load(&n).unwrap().data)).collect()
}

/// The largest difference between two runs' adapters.
fn weight_gap(a: &Path, b: &Path) -> f32 {
    let (a, b) = (adapter(a), adapter(b));
    assert_eq!(a.len(), b.len());
    let mut gap = 0f32;
    for ((na, va), (nb, vb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        for (x, y) in va.iter().zip(vb) {
            gap = gap.max((x - y).abs());
        }
    }
    gap
}

/// The metrics two runs log agree: the same rows, steps, epochs and learning rates, and
/// losses, gradient norms and stage metrics within `tol` (relative); only timings differ.
fn assert_same_metrics(one: &[StepMetrics], dp: &[StepMetrics], tol: f64, what: &str) {
    assert_eq!(one.len(), dp.len(), "{what}: rows");
    let close = |x: f64, y: f64| (x - y).abs() <= tol * x.abs().max(1.0);
    for (a, b) in one.iter().zip(dp) {
        assert_eq!((a.step, a.epoch, a.learning_rate), (b.step, b.epoch, b.learning_rate), "{what}");
        assert!(close(a.loss.unwrap(), b.loss.unwrap()), "{what} step {}: loss {:?} vs {:?}", a.step, a.loss, b.loss);
        assert!(
            close(a.grad_norm, b.grad_norm),
            "{what} step {}: grad_norm {} vs {}",
            a.step,
            a.grad_norm,
            b.grad_norm
        );
        let timing = |k: &str| k.contains("per_second") || k.contains("seconds");
        let keys = |m: &StepMetrics| m.extra.keys().filter(|k| !timing(k)).cloned().collect::<Vec<_>>();
        assert_eq!(keys(a), keys(b), "{what} step {}", a.step);
        for k in keys(a) {
            assert!(close(a.extra[&k], b.extra[&k]), "{what} step {}: {k} {} vs {}", a.step, a.extra[&k], b.extra[&k]);
        }
    }
}

#[test]
fn two_cpu_replicas_match_one_device() {
    let d = tmp("dp-threads");
    for stage in ["sft", "dpo"] {
        let one: StageConfig = toml::from_str(&config(&d.join(format!("{stage}-one")), stage, 4, "")).unwrap();
        let two: StageConfig =
            toml::from_str(&config(&d.join(format!("{stage}-two")), stage, 2, "[distributed]\ndevices = 2\n")).unwrap();
        let (a, b) = (run(stage, &one), run(stage, &two));
        let gap = weight_gap(&a, &b);
        eprintln!("{stage}: 2 thread replicas against 1 device: largest weight difference {gap:.3e}");
        assert!(gap <= 1e-5, "{stage}: weights differ by {gap}");
        let (ma, mb) = (metrics(&d.join(format!("{stage}-one"))), metrics(&d.join(format!("{stage}-two"))));
        assert_same_metrics(&ma, &mb, 1e-5, stage);
        // Rank 0 alone wrote checkpoints, and they resume.
        assert!(d.join(format!("{stage}-two/checkpoints/step-4/trainer_state.json")).exists());
    }
    std::fs::remove_dir_all(&d).ok();
}

/// A free port on 127.0.0.1 for a run's coordinator.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `align STAGE --config CONFIG` as node `rank` of 2 meeting at `port`.
fn node(stage: &str, config: &Path, rank: usize, port: u16, resume: bool) -> std::process::Child {
    let mut c = Command::new(env!("CARGO_BIN_EXE_align"));
    c.args([stage, "--config"]).arg(config);
    c.args(["--nodes", "2", "--node-rank", &rank.to_string(), "--coordinator", &format!("127.0.0.1:{port}")]);
    if resume {
        c.arg("--resume");
    }
    c.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap()
}

/// Both nodes of a run to the end; panics with their logs if either fails.
fn two_nodes(stage: &str, config: &Path, resume: bool) {
    let port = free_port();
    let nodes = [node(stage, config, 0, port, resume), node(stage, config, 1, port, resume)];
    for (rank, n) in nodes.into_iter().enumerate() {
        let out = n.wait_with_output().unwrap();
        assert!(out.status.success(), "node {rank}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

#[test]
fn two_processes_match_one_device() {
    let d = tmp("dp-processes");
    for stage in ["sft", "dpo"] {
        let one: StageConfig = toml::from_str(&config(&d.join(format!("{stage}-one")), stage, 4, "")).unwrap();
        let a = run(stage, &one);
        let file = d.join(format!("{stage}.toml"));
        std::fs::write(&file, config(&d.join(format!("{stage}-two")), stage, 2, "[distributed]\ntimeout_s = 60\n"))
            .unwrap();
        two_nodes(stage, &file, false);
        let gap = weight_gap(&a, &d.join(format!("{stage}-two/final")));
        eprintln!("{stage}: 2 processes against 1 device: largest weight difference {gap:.3e}");
        assert!(gap <= 1e-5, "{stage}: weights differ by {gap}");
        let (ma, mb) = (metrics(&d.join(format!("{stage}-one"))), metrics(&d.join(format!("{stage}-two"))));
        assert_same_metrics(&ma, &mb, 1e-5, stage);
    }
    // GRPO: each process generates for its own prompts.
    let data = d.join("prompts.jsonl");
    let rows: String =
        (0..16).map(|i| format!("{{\"prompt\": \"Question {i}: what comes next?\", \"answer\": \"{i}\"}}\n")).collect();
    std::fs::write(&data, rows).unwrap();
    let one = rl_config(&d.join("grpo-one"), &data, &online_training(4), "grpo", GRPO, "");
    let a = align_pipeline::grpo::run_grpo::<Cpu>(&one, false, &Default::default()).unwrap();
    let mut two = rl_config(&d.join("grpo-two"), &data, &online_training(2), "grpo", GRPO, "");
    two.distributed.timeout_s = 60.0;
    let file = d.join("grpo.toml");
    std::fs::write(&file, toml::to_string(&two).unwrap()).unwrap();
    two_nodes("grpo", &file, false);
    assert_same_metrics(&metrics(&d.join("grpo-one")), &metrics(&d.join("grpo-two")), 1e-5, "grpo");
    let gap = weight_gap(&a, &d.join("grpo-two/final"));
    eprintln!("grpo: 2 processes against 1 device: largest weight difference {gap:.3e}");
    assert!(gap <= 1e-5, "grpo: weights differ by {gap}");
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn a_killed_node_fails_the_run_which_resumes_exactly() {
    let d = tmp("dp-kill");
    let steps = "max_steps = 60\nsave_steps = 4\n";
    let body = |out: &str| {
        config(&d.join(out), "sft", 2, "[distributed]\ntimeout_s = 60\n")
            .replace("max_steps = 5\nlogging_steps = 1\nsave_steps = 2\n", &format!("{steps}logging_steps = 1\n"))
    };
    let (whole, cut) = (d.join("whole.toml"), d.join("cut.toml"));
    std::fs::write(&whole, body("whole")).unwrap();
    std::fs::write(&cut, body("cut")).unwrap();
    assert!(std::fs::read_to_string(&cut).unwrap().contains("max_steps = 60"));
    two_nodes("sft", &whole, false);

    let port = free_port();
    let (rank0, mut rank1) = (node("sft", &cut, 0, port, false), node("sft", &cut, 1, port, false));
    let started = std::time::Instant::now();
    while !d.join("cut/checkpoints/step-8/trainer_state.json").exists() {
        assert!(started.elapsed().as_secs() < 120, "no checkpoint at step 8");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    rank1.kill().unwrap();
    rank1.wait().unwrap();
    let killed = std::time::Instant::now();
    let out = rank0.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "node 0 went on without node 1");
    assert!(log.contains("node 1 left the run"), "node 0's error: {log}");
    eprintln!("node 0 stopped {:.2} s after node 1 was killed", killed.elapsed().as_secs_f64());
    assert!(killed.elapsed().as_secs() < 30);
    assert!(!d.join("cut/final").exists());

    two_nodes("sft", &cut, true);
    let (a, b) = (adapter(&d.join("whole/final")), adapter(&d.join("cut/final")));
    assert!(a == b, "the resumed run ends with other weights");
    let (ma, mb) = (metrics(&d.join("whole")), metrics(&d.join("cut")));
    assert_eq!(ma.len(), 60);
    assert_eq!(ma.len(), mb.len());
    for (x, y) in ma.iter().zip(&mb) {
        assert_eq!((x.step, x.loss, x.grad_norm), (y.step, y.loss, y.grad_norm));
    }
    std::fs::remove_dir_all(&d).ok();
}

/// GRPO with batch-scaled rewards, DAPO's normaliser, a KL term and two iterations.
const GRPO: &str = "num_generations = 4\nmax_completion_length = 8\nstop_strings = [\"e\"]\nbeta = 0.04\n\
                    num_iterations = 2\nscale_rewards = \"batch\"\nloss_type = \"dapo\"\n\
                    rewards = [{ kind = \"length\", max_tokens = 8, cache_tokens = 8 }]";

/// RLOO with batch-normalised advantages and a KL penalty.
const RLOO: &str = "num_generations = 4\nmax_completion_length = 8\nstop_strings = [\"e\"]\nbeta = 0.05\n\
                    normalize_advantages = true\nrewards = [{ kind = \"length\", max_tokens = 8, cache_tokens = 8 }]";

/// `[training]` of the online stages: 4 completions per micro-batch, full fine-tuning.
fn online_training(accumulation: usize) -> String {
    format!(
        "per_device_train_batch_size = 4\ngradient_accumulation_steps = {accumulation}\nlearning_rate = 1e-2\n\
         max_steps = 5\nseed = 3"
    )
}

/// GRPO (batch-scaled rewards, DAPO's token normaliser, a KL term, two iterations per
/// generation) and RLOO (batch-normalised advantages, a KL penalty) on 2 CPU replicas, each
/// generating for its own prompts, against one device generating for all of them.
#[test]
fn online_stages_on_two_cpu_replicas_match_one_device() {
    let d = tmp("dp-online");
    let data = d.join("prompts.jsonl");
    let rows: String =
        (0..16).map(|i| format!("{{\"prompt\": \"Question {i}: what comes next?\", \"answer\": \"{i}\"}}\n")).collect();
    std::fs::write(&data, rows).unwrap();
    // PPO: a reward model, a separate critic, whitened rewards and adaptive KL; its batch is
    // gathered after generation and each update's micro-batches split.
    let ppo = format!(
        "max_completion_length = 8\nrewards = [{{ kind = \"model\", path = \"{}\" }}]\nkl_coef = 0.05\n\
         adaptive_kl = true\nwhiten_rewards = true\nnum_ppo_epochs = 2",
        root().join("fixtures/models/llama-tied").display()
    );
    let sections = [("grpo", GRPO), ("rloo", RLOO), ("ppo", ppo.as_str())];
    for (stage, body) in sections {
        let one = rl_config(&d.join(format!("{stage}-one")), &data, &online_training(4), stage, body, "");
        let two = rl_config(
            &d.join(format!("{stage}-two")),
            &data,
            &online_training(2),
            stage,
            body,
            "[distributed]\ndevices = 2",
        );
        let run = |cfg: &StageConfig| match stage {
            "grpo" => align_pipeline::grpo::run_grpo::<Cpu>(cfg, false, &Default::default()).unwrap(),
            "ppo" => align_pipeline::ppo::run_ppo::<Cpu>(cfg, false, &Default::default()).unwrap(),
            _ => align_pipeline::rloo::run_rloo::<Cpu>(cfg, false, &Default::default()).unwrap(),
        };
        let (a, b) = (run(&one), run(&two));
        let gap = weight_gap(&a, &b);
        eprintln!("{stage}: 2 thread replicas against 1 device: largest weight difference {gap:.3e}");
        assert!(gap <= 1e-5, "{stage}: weights differ by {gap}");
        let (ma, mb) = (metrics(&d.join(format!("{stage}-one"))), metrics(&d.join(format!("{stage}-two"))));
        assert_same_metrics(&ma, &mb, 1e-5, stage);
    }
    std::fs::remove_dir_all(&d).ok();
}

/// LoRA dropout on 2 replicas sharing the CPU's random generator: each replica's masks come
/// from its own seeded stream, so two runs end with the same weights (and dropout is on:
/// without it they end elsewhere).
#[test]
fn dropout_on_thread_replicas_is_reproducible() {
    let d = tmp("dp-dropout");
    let dp = "[distributed]\ndevices = 2\n";
    let cfg = |name: &str, dropout: &str| -> StageConfig {
        toml::from_str(&config(&d.join(name), "sft", 2, dp).replace("lora_dropout = 0.0", dropout)).unwrap()
    };
    let a = run("sft", &cfg("a", "lora_dropout = 0.1"));
    let b = run("sft", &cfg("b", "lora_dropout = 0.1"));
    let none = run("sft", &cfg("none", "lora_dropout = 0.0"));
    assert!(adapter(&a) == adapter(&b), "two runs with dropout differ");
    assert!(weight_gap(&a, &none) > 1e-4, "dropout changed nothing");
    std::fs::remove_dir_all(&d).ok();
}

/// A pipeline runs in one process: replicas on its devices, never nodes (each would write the
/// run's directory).
#[test]
fn pipelines_refuse_nodes() {
    let d = tmp("dp-pipeline");
    let file = d.join("p.toml");
    let text = |section: &str| {
        format!(
            "name = \"p\"\n[base]\npath = \"{model}\"\n{section}\n[[stages]]\nname = \"sft\"\nkind = \"sft\"\n\
             model = \"@base\"\ndata = {{ path = \"{data}\", adapter = \"gsm8k_sft\" }}\n",
            model = root().join("fixtures/models/llama-tied").display(),
            data = root().join("fixtures/data/gsm8k_train_head.jsonl").display(),
        )
    };
    let opts = align_pipeline::recipe::Options { sets: vec![], smoke: false, fetch: None };
    std::fs::write(&file, text("[defaults.distributed]\nnodes = 2\ncoordinator = \"127.0.0.1:1\"")).unwrap();
    let err = format!("{:#}", align_pipeline::recipe::load(&file, &opts).expect_err("nodes refused"));
    assert!(err.contains("a pipeline runs in one process"), "{err}");
    std::fs::write(&file, text("[defaults.distributed]\ndevices = 2")).unwrap();
    align_pipeline::recipe::load(&file, &opts).unwrap();
    std::fs::remove_dir_all(&d).ok();
}
