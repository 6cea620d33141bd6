//! Pure tensor math of every alignment objective: functions of tensors in, tensors out, no
//! I/O and no model. Each function names the paper it implements and the TRL (1.16) code
//! it matches (for an objective TRL lacks, the reference code it follows);
//! `tests/reference.rs` checks every case of `fixtures/reference/losses/*.json` (TRL's own
//! outputs; torch's for [`contrastive`]) to 1e-6 relative in f64 and 1e-4 in f32.
//!
//! Conventions (`docs/conventions.md`): a sequence log-prob is the *sum* of its
//! completion tokens' log-probs unless a function says "averaged"; masks are float tensors
//! of 0/1 in the dtype of the values (what TRL multiplies by), and values at masked
//! positions are ignored whatever they are (finite).
//!
//! - [`logprobs`]: per-token log-prob gathering (with temperature), masked sum/mean,
//!   sequence log-probs, SFT cross-entropy, entropy.
//! - [`preference`]: Bradley–Terry reward loss, DPO (`sigmoid`, `cdpo`, `robust`, `hinge`,
//!   `ipo`), ORPO, SimPO.
//! - [`kl`]: the k1/k2/k3 estimators.
//! - [`grpo`]: group advantages and the clipped GRPO/DAPO/Dr. GRPO objectives, with the
//!   CS336 ablation variants.
//! - [`kto`]: KTO and unpaired APO-zero on labelled completions.
//! - [`rloo`]: leave-one-out advantages and the sequence-level clipped surrogate.
//! - [`ppo`]: RLHF rewards with a KL penalty, GAE, whitening, clipped policy and value
//!   losses, the adaptive KL controller.
//! - [`contrastive`]: InfoNCE with in-batch negatives on pooled (prompt, response)
//!   representations, CLIP's symmetric loss or the one-directional one, and its retrieval
//!   accuracy (SFT's auxiliary `--use_contrastive`); checked against torch's loss and
//!   autograd gradients.

pub mod contrastive;
pub mod grpo;
pub mod kl;
pub mod kto;
pub mod logprobs;
pub mod ppo;
pub mod preference;
pub mod rloo;

pub use burn;
pub use kl::{KlEstimator, kl_per_token};
pub use logprobs::{masked_mean, masked_sum, sequence_logprobs, sft_loss, token_entropy, token_logprobs};
