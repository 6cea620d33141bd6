//! The stage tests, one binary (a test binary per file would compile and link the training
//! loop once per file): each module is one stage or concern.

mod common;

mod best_of_n;
mod devices;
mod distributed;
mod grpo;
mod kto;
mod packing;
mod pipeline;
mod ppo;
mod preference;
mod quantized;
mod resume;
mod rloo;
mod robustness;
mod score;
mod scored;
mod sft;
mod tensorboard;
