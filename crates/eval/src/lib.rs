//! Benchmarks and reports, so every stage is measured by the same tool:
//!
//! - [`multiple_choice`]: log-likelihood multiple choice exactly as lm-eval defines it
//!   (PIQA built in; other sets from a TOML task of Jinja templates), `acc`, `acc_norm`,
//!   `acc_bytes` with standard errors.
//! - [`math`]: GSM8K with the r1_zero prompt and grader (format rate, accuracy, mean
//!   reward, per-sample file), and lm-eval's 5-shot GSM8K (strict and flexible match).
//! - [`perplexity`]: rolling-window perplexity (token, word, byte; bits per byte).
//! - [`win_rate`]: model A against model B on prompts, judged by a reward model.
//! - [`report`]: Markdown tables, PNG curves and JSON of metrics across runs and stages.

pub mod generation;
pub mod math;
pub mod multiple_choice;
pub mod perplexity;
pub mod report;
pub mod runs;
pub mod win_rate;

pub use generation::{best_of_n, best_of_n_listing, evaluate_prompts};
pub use multiple_choice::{McItem, McResult, McSummary, McTask, WithStderr, load_items, score_items, summarize};
pub use runs::{progress, run_gsm8k, run_multiple_choice, run_r1_zero, write_jsonl};
