//! SplitMix64: the one small deterministic generator the project uses where results must
//! not depend on global RNG state (head and adapter init, data order, sampling).

/// Same stream on every platform for a seed.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64; // (0, 1): ln is finite
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

/// Dropout masks drawn reproducibly per thread: the training loop seeds each update's
/// stream ([`seed_dropout`]), and each dropout call then reseeds the backend's generator from
/// the stream's next value for its one draw, under a process-wide lock. Replicas on threads
/// of one process share the backend's generator; this keeps each replica's masks a function
/// of its own seed and calls, not of how the threads interleave.
pub mod dropout {
    use std::cell::Cell;
    use std::sync::Mutex;

    use burn::tensor::backend::Backend;
    use burn::tensor::{Distribution, Tensor};

    thread_local! {
        /// The stream's seed and the draws made from it.
        static STREAM: Cell<Option<(u64, u64)>> = const { Cell::new(None) };
    }

    static DRAW: Mutex<()> = Mutex::new(());

    /// Start this thread's dropout stream at `seed` (the loop: once per optimizer update).
    pub fn seed(seed: u64) {
        STREAM.with(|s| s.set(Some((seed, 0))));
    }

    /// Inverted dropout of `x` with drop probability `prob`, in training (autodiff) only.
    /// Outside a seeded stream the backend's generator draws as it stands.
    pub fn apply<B: Backend, const D: usize>(x: Tensor<B, D>, prob: f64) -> Tensor<B, D> {
        if prob == 0.0 || !B::ad_enabled(&x.device()) {
            return x;
        }
        let keep = Distribution::Bernoulli(1.0 - prob);
        let mask = match STREAM.with(Cell::get) {
            Some((seed, calls)) => {
                STREAM.with(|s| s.set(Some((seed, calls + 1))));
                let _one_draw_at_a_time = DRAW.lock().unwrap_or_else(|e| e.into_inner());
                B::seed(
                    &x.device(),
                    super::SplitMix64::new(seed ^ calls.wrapping_mul(0xA24B_AED4_963E_E407)).next_u64(),
                );
                x.random_like(keep)
            }
            None => x.random_like(keep),
        };
        x * mask / (1.0 - prob)
    }
}
