//! The order examples are visited in: a deterministic shuffle from (seed, epoch), optionally
//! grouped by length, with a position that checkpoints save so a resumed run sees exactly
//! the remaining batches.

use serde::{Deserialize, Serialize};

use crate::curriculum::{Pacing, competence};

/// Where a loader is; saved in checkpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoaderState {
    pub seed: u64,
    pub epoch: usize,
    /// Batches already handed out in this epoch.
    pub batch: usize,
}

/// Batches of example indices.
#[derive(Debug, Clone)]
pub struct Loader {
    state: LoaderState,
    batch_size: usize,
    shuffle: bool,
    /// Example lengths when batches are grouped by length.
    lengths: Option<Vec<usize>>,
    n: usize,
    batches: Vec<Vec<usize>>,
    curriculum: Option<Curriculum>,
}

/// A curriculum over a loader's examples ([`crate::curriculum`]): batch t is drawn uniformly
/// from the easiest `competence(t)` fraction, seeded by (seed, t), so a resumed run draws the
/// same batches. Steps and epochs are counted as without it.
#[derive(Debug, Clone, PartialEq)]
pub struct Curriculum {
    /// Example indices, easiest first.
    pub order: Vec<usize>,
    pub pacing: Pacing,
    /// The fraction admitted at the first batch (c0).
    pub initial: f64,
    /// Stages of step pacing.
    pub stages: usize,
    /// Batches until every example is admitted (T).
    pub horizon: usize,
}

/// The generator of (seed, epoch): the same order on every platform.
fn rng(seed: u64, epoch: usize) -> impl FnMut() -> u64 {
    let mut r = align_model::SplitMix64::new(seed ^ (epoch as u64).wrapping_mul(0xD1B5_4A32_D192_ED03));
    move || r.next_u64()
}

fn shuffle<T>(v: &mut [T], next: &mut impl FnMut() -> u64) {
    for i in (1..v.len()).rev() {
        let j = (next() % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
}

impl Loader {
    /// `n` examples in batches of `batch_size` (the last batch of an epoch may be smaller).
    pub fn new(n: usize, batch_size: usize, seed: u64, shuffle: bool) -> Self {
        let mut l = Loader {
            state: LoaderState { seed, epoch: 0, batch: 0 },
            batch_size: batch_size.max(1),
            shuffle,
            lengths: None,
            n,
            batches: vec![],
            curriculum: None,
        };
        l.plan();
        l
    }

    /// Group batches by length (HF's `group_by_length`): shuffled, then in mega-batches of
    /// 50 batches sorted longest first, so each batch holds similar lengths.
    pub fn group_by_length(mut self, lengths: Vec<usize>) -> Self {
        assert_eq!(lengths.len(), self.n, "one length per example");
        self.lengths = Some(lengths);
        self.plan();
        self
    }

    /// Draw batches by `curriculum` instead of epoch permutations.
    pub fn with_curriculum(mut self, curriculum: Curriculum) -> Self {
        assert_eq!(curriculum.order.len(), self.n, "one difficulty rank per example");
        self.curriculum = Some(curriculum);
        self
    }

    /// The fraction of the data the next batch may draw from (1 without a curriculum).
    pub fn competence(&self) -> f64 {
        match &self.curriculum {
            Some(c) => {
                let t = self.state.epoch * self.batches.len() + self.state.batch;
                competence(c.pacing, t, c.horizon, c.initial, c.stages)
            }
            None => 1.0,
        }
    }

    fn plan(&mut self) {
        let mut order: Vec<usize> = (0..self.n).collect();
        let mut next = rng(self.state.seed, self.state.epoch);
        if self.shuffle {
            shuffle(&mut order, &mut next);
        }
        if let Some(lengths) = &self.lengths {
            for mega in order.chunks_mut(self.batch_size * 50) {
                mega.sort_by(|&a, &b| lengths[b].cmp(&lengths[a]));
            }
        }
        self.batches = order.chunks(self.batch_size).map(<[usize]>::to_vec).collect();
        if self.lengths.is_some() && self.shuffle {
            // Keep the longest batch first (memory errors show at once), shuffle the rest.
            if let Some((_, rest)) = self.batches.split_first_mut() {
                shuffle(rest, &mut next);
            }
        }
    }

    pub fn batches_per_epoch(&self) -> usize {
        self.batches.len()
    }

    pub fn state(&self) -> LoaderState {
        self.state
    }

    /// Continue from a saved state.
    pub fn restore(&mut self, state: LoaderState) {
        self.state = state;
        self.plan();
    }

    /// The next batch, moving to the next epoch (reshuffled) after the last one.
    pub fn next_batch(&mut self) -> Vec<usize> {
        if self.batches.is_empty() {
            return vec![];
        }
        if self.state.batch >= self.batches.len() {
            self.state.epoch += 1;
            self.state.batch = 0;
            self.plan();
        }
        let b = match &self.curriculum {
            Some(c) => {
                // Distinct examples, uniform among the admitted ones: a partial shuffle of them.
                let admitted = ((self.competence() * self.n as f64).ceil() as usize).clamp(1, self.n);
                let mut pool: Vec<usize> = c.order[..admitted.max(self.batch_size.min(self.n))].to_vec();
                let t = self.state.epoch * self.batches.len() + self.state.batch;
                let mut next = rng(self.state.seed ^ 0x6375_7272_6963_756C, t);
                let take = self.batch_size.min(pool.len());
                for i in 0..take {
                    let j = i + (next() % (pool.len() - i) as u64) as usize;
                    pool.swap(i, j);
                }
                pool.truncate(take);
                pool
            }
            None => self.batches[self.state.batch].clone(),
        };
        self.state.batch += 1;
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_resumable() {
        let mut a = Loader::new(23, 4, 7, true);
        let first: Vec<Vec<usize>> = (0..10).map(|_| a.next_batch()).collect();
        let mut b = Loader::new(23, 4, 7, true);
        assert_eq!((0..10).map(|_| b.next_batch()).collect::<Vec<_>>(), first);
        // Each epoch is a permutation; epochs differ.
        let e0: Vec<usize> = first[..6].concat();
        let mut sorted = e0.clone();
        sorted.sort();
        assert_eq!(sorted, (0..23).collect::<Vec<_>>());
        assert_ne!(first[6], first[0]);
        // Resume from a saved state sees the same remaining batches.
        let mut c = Loader::new(23, 4, 7, true);
        for _ in 0..3 {
            c.next_batch();
        }
        let saved = c.state();
        let mut d = Loader::new(23, 4, 7, true);
        d.restore(saved);
        assert_eq!((3..10).map(|_| d.next_batch()).collect::<Vec<_>>(), first[3..].to_vec());
    }

    #[test]
    fn a_curriculum_starts_easy_widens_and_resumes() {
        let n = 100;
        // Difficulty = index reversed: example 99 is the easiest.
        let difficulty: Vec<f64> = (0..n).map(|i| (n - i) as f64).collect();
        let curriculum = Curriculum {
            order: crate::curriculum::easiest_first(&difficulty),
            pacing: Pacing::Competence,
            initial: 0.1,
            stages: 0,
            horizon: 20,
        };
        let mut l = Loader::new(n, 5, 3, true).with_curriculum(curriculum.clone());
        let batches: Vec<Vec<usize>> = (0..40).map(|_| l.next_batch()).collect();
        // Batch 0 draws from the easiest 10 % (indices 90..100), distinct within a batch.
        assert!(batches[0].iter().all(|&i| i >= 90), "{:?}", batches[0]);
        let mut b0 = batches[0].clone();
        b0.sort();
        b0.dedup();
        assert_eq!(b0.len(), 5);
        // Batch 5: c = sqrt(0.25·0.99 + 0.01) ≈ 0.51, so nothing harder than rank 51.
        assert!(batches[5].iter().all(|&i| i >= n - 51), "{:?}", batches[5]);
        // After the horizon the hardest examples appear.
        assert!(batches[20..].iter().flatten().any(|&i| i < 20));
        // Resumed from a saved state: the same batches.
        let mut a = Loader::new(n, 5, 3, true).with_curriculum(curriculum.clone());
        for _ in 0..7 {
            a.next_batch();
        }
        let mut b = Loader::new(n, 5, 3, true).with_curriculum(curriculum);
        b.restore(a.state());
        assert_eq!((7..40).map(|_| b.next_batch()).collect::<Vec<_>>(), batches[7..].to_vec());
    }

    #[test]
    fn length_grouping_keeps_similar_lengths_together() {
        let lengths: Vec<usize> = (0..400).map(|i| (i * 37) % 101).collect();
        let mut l = Loader::new(400, 8, 1, true).group_by_length(lengths.clone());
        let b = l.next_batch();
        let spread = b.iter().map(|&i| lengths[i]).max().unwrap() - b.iter().map(|&i| lengths[i]).min().unwrap();
        assert!(spread <= 10, "spread {spread}");
    }
}
