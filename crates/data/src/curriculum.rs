//! Curriculum learning: examples ordered by a difficulty, and a pacing function saying how
//! much of the easiest data training may draw from at each step.
//!
//! Competence-based pacing is Platanios et al. 2019 ("Competence-based Curriculum Learning
//! for Neural Machine Translation"): at step t of a curriculum of T steps the model may see
//! the easiest c(t) fraction of the data, with c(t) = min(1, sqrt(t·(1 − c0²)/T + c0²)), and
//! each batch is drawn uniformly from it.

use serde::{Deserialize, Serialize};

/// How the admitted fraction of the data grows over the curriculum's steps.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pacing {
    /// Platanios et al. 2019, their square-root competence: c(t) = min(1, sqrt(t·(1 − c0²)/T + c0²)).
    Competence,
    /// c(t) = min(1, c0 + (1 − c0)·t/T).
    Linear,
    /// `stages` equal steps from c0 to 1: c(t) = c0 + (1 − c0)·min(1, ⌊t·stages/T⌋ / (stages − 1)).
    Step,
}

/// The fraction of the data (easiest first) batch `t` of a curriculum of `horizon` batches
/// may draw from, starting at `initial` (c0, in (0, 1]).
pub fn competence(pacing: Pacing, t: usize, horizon: usize, initial: f64, stages: usize) -> f64 {
    let c0 = initial.clamp(f64::MIN_POSITIVE, 1.0);
    if horizon == 0 {
        return 1.0;
    }
    let x = t as f64 / horizon as f64;
    let c = match pacing {
        Pacing::Competence => (x * (1.0 - c0 * c0) + c0 * c0).sqrt(),
        Pacing::Linear => c0 + (1.0 - c0) * x,
        Pacing::Step => {
            let stages = stages.max(2);
            let stage = ((t * stages) / horizon).min(stages - 1);
            c0 + (1.0 - c0) * stage as f64 / (stages - 1) as f64
        }
    };
    c.min(1.0)
}

/// Example indices from easiest to hardest (ties by index: a stable order).
pub fn easiest_first(difficulty: &[f64]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..difficulty.len()).collect();
    order.sort_by(|&a, &b| difficulty[a].total_cmp(&difficulty[b]).then(a.cmp(&b)));
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn competence_follows_platanios() {
        // c(0) = c0, c(T) = 1, and the square root in between.
        let c0: f64 = 0.01;
        assert!((competence(Pacing::Competence, 0, 100, c0, 0) - c0).abs() < 1e-12);
        assert_eq!(competence(Pacing::Competence, 100, 100, c0, 0), 1.0);
        assert_eq!(competence(Pacing::Competence, 250, 100, c0, 0), 1.0);
        let want = (0.25f64 * (1.0 - c0 * c0) + c0 * c0).sqrt();
        assert!((competence(Pacing::Competence, 25, 100, c0, 0) - want).abs() < 1e-12);
        // Linear and step pacing.
        assert!((competence(Pacing::Linear, 50, 100, 0.2, 0) - 0.6).abs() < 1e-12);
        let steps: Vec<f64> =
            [0, 24, 25, 50, 75, 99].iter().map(|&t| competence(Pacing::Step, t, 100, 0.25, 4)).collect();
        assert_eq!(steps, vec![0.25, 0.25, 0.5, 0.75, 1.0, 1.0]);
    }

    #[test]
    fn easiest_first_is_stable() {
        assert_eq!(easiest_first(&[3.0, 1.0, 2.0, 1.0]), vec![1, 3, 2, 0]);
    }
}
