//! The fused kernels against the compositions of Burn ops they replace: values and every
//! input gradient, on the f64 reference backend, on the CPU backend, and on each GPU backend
//! compiled in (`--features wgpu` / `cuda`: the generic forms and their backward passes).
//! One test binary, so a bundle built for a GPU machine carries one file.

mod common;

mod attention;
mod elementwise;
mod lm_head;
mod lora;
mod matmul;
mod packed;
mod rope;
mod sampling;
