//! Host-side batches: right padding for training, left padding for generation, and
//! best-fit-decreasing packing, all as flat `[batch, seq]` arrays of ids, positions and
//! segment ids that `align_model::TokenBatch` takes as they are. Segment 0 is padding;
//! attention never crosses segments, and positions restart at 0 in each sequence.

use align_model::TokenBatch;
use align_model::burn::tensor::backend::Backend;
use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};
use crate::tokenize::TokenizedSequence;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostBatch {
    /// `[batch, seq]`
    pub shape: [usize; 2],
    pub input_ids: Vec<i64>,
    pub positions: Vec<i64>,
    pub segments: Vec<i64>,
    /// Token `t` is a training target (completion / assistant / text token).
    pub loss_mask: Vec<bool>,
}

impl HostBatch {
    /// Onto a device, for the model.
    pub fn to_device<B: Backend>(&self, device: &B::Device) -> TokenBatch<B> {
        TokenBatch::from_host(self.input_ids.clone(), self.positions.clone(), self.segments.clone(), self.shape, device)
    }

    /// Next-token targets `[batch, seq - 1]` and their mask: target `t + 1` is predicted at
    /// position `t`, counted only if it is in the loss and in the same sequence as `t` (so a
    /// packed sequence's first token is never predicted from its neighbour's last).
    pub fn shifted_targets(&self) -> (Vec<i64>, Vec<bool>) {
        let [b, t] = self.shape;
        let mut targets = Vec::with_capacity(b * t.saturating_sub(1));
        let mut mask = Vec::with_capacity(b * t.saturating_sub(1));
        for r in 0..b {
            for j in 1..t {
                let (i, p) = (r * t + j, r * t + j - 1);
                targets.push(self.input_ids[i]);
                mask.push(self.loss_mask[i] && self.segments[i] != 0 && self.segments[i] == self.segments[p]);
            }
        }
        (targets, mask)
    }

    /// Where a loss reads the model, for a mask over `shifted_targets` (`[batch, seq − 1]`):
    /// each `true` cell's index in that grid, the flattened `[batch, seq]` hidden-state row
    /// that predicts it, and its target id. The LM head then runs on these rows alone.
    pub fn loss_positions(&self, targets: &[i64], mask: &[bool]) -> LossPositions {
        let w = self.shape[1].saturating_sub(1);
        let mut out = LossPositions::default();
        for (i, _) in mask.iter().enumerate().filter(|(_, m)| **m) {
            out.cells.push(i);
            out.rows.push(i + i / w);
            out.targets.push(targets[i]);
        }
        out
    }

    /// Real (non-padding) tokens.
    pub fn real_tokens(&self) -> usize {
        self.segments.iter().filter(|&&s| s != 0).count()
    }
}

/// The positions of a batch a loss reads (see [`HostBatch::loss_positions`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LossPositions {
    /// Index in the `[batch, seq − 1]` grid of shifted targets.
    pub cells: Vec<usize>,
    /// Row of the flattened `[batch, seq]` hidden states predicting it.
    pub rows: Vec<usize>,
    /// The token predicted.
    pub targets: Vec<i64>,
}

/// Sequences padded on the right to the longest (training).
pub fn pad_right(seqs: &[&TokenizedSequence], pad_id: u32) -> HostBatch {
    let width = seqs.iter().map(|s| s.len()).max().unwrap_or(0);
    let mut out = empty(seqs.len(), width, pad_id);
    for (r, s) in seqs.iter().enumerate() {
        place(&mut out, r * width, s, 1);
    }
    out
}

/// Prompts padded on the left to the longest (generation).
pub fn pad_left(prompts: &[&[u32]], pad_id: u32) -> HostBatch {
    let width = prompts.iter().map(|s| s.len()).max().unwrap_or(0);
    let mut out = empty(prompts.len(), width, pad_id);
    for (r, p) in prompts.iter().enumerate() {
        let s = TokenizedSequence { input_ids: p.to_vec(), loss_mask: vec![false; p.len()] };
        place(&mut out, r * width + width - p.len(), &s, 1);
    }
    out
}

fn empty(b: usize, t: usize, pad_id: u32) -> HostBatch {
    HostBatch {
        shape: [b, t],
        input_ids: vec![pad_id as i64; b * t],
        positions: vec![0; b * t],
        segments: vec![0; b * t],
        loss_mask: vec![false; b * t],
    }
}

fn place(out: &mut HostBatch, at: usize, s: &TokenizedSequence, segment: i64) {
    for (k, (&id, &m)) in s.input_ids.iter().zip(&s.loss_mask).enumerate() {
        out.input_ids[at + k] = id as i64;
        out.positions[at + k] = k as i64;
        out.segments[at + k] = segment;
        out.loss_mask[at + k] = m;
    }
}

/// Best-fit decreasing: sequences (by index) sorted longest first, each into the open bin
/// with the least room that still fits it, else a new bin. Ties keep input order, so the
/// result is deterministic.
pub fn pack_best_fit_decreasing(lengths: &[usize], capacity: usize) -> Result<Vec<Vec<usize>>> {
    if let Some((i, &l)) = lengths.iter().enumerate().find(|(_, l)| **l > capacity) {
        return Err(DataError::Config(format!(
            "sequence {i} has {l} tokens, more than the packing length {capacity} (truncate with max_length)"
        )));
    }
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by(|&a, &b| lengths[b].cmp(&lengths[a]).then(a.cmp(&b)));
    let mut bins: Vec<(usize, Vec<usize>)> = Vec::new(); // (room, members)
    for i in order {
        let l = lengths[i];
        let best = bins.iter_mut().filter(|(room, _)| *room >= l).min_by_key(|(room, _)| *room);
        match best {
            Some((room, members)) => {
                *room -= l;
                members.push(i);
            }
            None => bins.push((capacity - l, vec![i])),
        }
    }
    Ok(bins.into_iter().map(|(_, m)| m).collect())
}

/// Rows of packed sequences, each row `capacity` wide (padding at the end).
pub fn pack(seqs: &[&TokenizedSequence], capacity: usize, pad_id: u32) -> Result<HostBatch> {
    let lengths: Vec<usize> = seqs.iter().map(|s| s.len()).collect();
    let bins = pack_best_fit_decreasing(&lengths, capacity)?;
    let mut out = empty(bins.len(), capacity, pad_id);
    for (r, members) in bins.iter().enumerate() {
        let mut at = r * capacity;
        for (k, &i) in members.iter().enumerate() {
            place(&mut out, at, seqs[i], k as i64 + 1);
            at += seqs[i].len();
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn best_fit_decreasing_fills_tightest_bin() {
        let bins = pack_best_fit_decreasing(&[5, 4, 3, 3, 2, 1], 8).unwrap();
        // 5 -> new; 4 -> new; 3 -> bin0 (room 3 -> 0); 3 -> bin1 (room 4 -> 1); 2 -> new; 1 -> bin1
        assert_eq!(bins, vec![vec![0, 2], vec![1, 3, 5], vec![4]]);
        assert!(pack_best_fit_decreasing(&[9], 8).is_err());
    }

    #[test]
    fn shifted_targets_never_cross_sequences() {
        let a = TokenizedSequence { input_ids: vec![1, 2, 3], loss_mask: vec![true; 3] };
        let b = TokenizedSequence { input_ids: vec![4, 5], loss_mask: vec![false, true] };
        let batch = pack(&[&a, &b], 6, 0).unwrap();
        assert_eq!(batch.segments, vec![1, 1, 1, 2, 2, 0]);
        assert_eq!(batch.positions, vec![0, 1, 2, 0, 1, 0]);
        let (t, m) = batch.shifted_targets();
        assert_eq!(t, vec![2, 3, 4, 5, 0]);
        assert_eq!(m, vec![true, true, false, true, false]);
        let at = batch.loss_positions(&t, &m);
        assert_eq!(at.cells, vec![0, 1, 3]);
        assert_eq!(at.rows, vec![0, 1, 3]);
        assert_eq!(at.targets, vec![2, 3, 5]);
        // Two rows of width 3: cell (1, 0) is grid index 2, hidden row 3.
        let two = pad_right(&[&b, &a], 0);
        let (t, m) = two.shifted_targets();
        let at = two.loss_positions(&t, &m);
        assert_eq!((at.cells, at.rows, at.targets), (vec![0, 2, 3], vec![0, 3, 4], vec![5, 2, 3]));
    }
}
