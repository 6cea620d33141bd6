//! Trainers for each alignment stage and the `align` command.
//!
//! - [`train`]: the one loop every stage runs on (AdamW, schedules, accumulation, clipping,
//!   eval, metrics, atomic checkpoints, exact resume); [`optim`] its optimizer; [`stage`]
//!   what every stage does around it.
//! - Stages, all configured by [`config::StageConfig`]: [`sft`]; [`preference`] (reward
//!   model, DPO, ORPO, SimPO); the online RL stages [`grpo`] and [`ppo`], on [`rl`].
//! - [`recipe`]: pipelines of stages (`cargo xtask run-pipeline`): references, caching,
//!   resume, evals after each stage, the report.
//! - [`score`]: completion log-probs, comparable with the reference harness.

pub mod config;
pub mod distributed;
pub mod grpo;
pub mod kto;
pub mod logfmt;
pub mod optim;
pub mod ppo;
pub mod preference;
pub mod recipe;
pub mod rl;
pub mod rloo;
pub mod score;
pub mod sft;
pub mod stage;
pub mod train;
