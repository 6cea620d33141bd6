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
    Ok(pack_placed(seqs, capacity, pad_id)?.0)
}

/// [`pack`], also returning where each sequence starts in the flattened `[rows, capacity]`
/// grid.
pub fn pack_placed(seqs: &[&TokenizedSequence], capacity: usize, pad_id: u32) -> Result<(HostBatch, Vec<usize>)> {
    let lengths: Vec<usize> = seqs.iter().map(|s| s.len()).collect();
    let bins = pack_best_fit_decreasing(&lengths, capacity)?;
    let mut out = empty(bins.len(), capacity, pad_id);
    let mut starts = vec![0; seqs.len()];
    for (r, members) in bins.iter().enumerate() {
        let mut at = r * capacity;
        for (k, &i) in members.iter().enumerate() {
            place(&mut out, at, seqs[i], k as i64 + 1);
            starts[i] = at;
            at += seqs[i].len();
        }
    }
    Ok((out, starts))
}

/// The rows a forward pass runs for a batch, and where each of the batch's cells went:
/// the batch itself, or its sequences packed (see [`HostBatch::repacked`]).
#[derive(Debug, Clone, PartialEq)]
pub struct ForwardLayout {
    /// The rows the model runs.
    pub batch: HostBatch,
    /// For each cell of the original flattened `[batch, seq]` grid, its cell in `batch`
    /// (`usize::MAX` for a padding cell that packing dropped).
    pub cell: Vec<usize>,
}

impl ForwardLayout {
    /// The batch as it is.
    pub fn padded(batch: &HostBatch) -> Self {
        ForwardLayout { batch: batch.clone(), cell: (0..batch.input_ids.len()).collect() }
    }

    /// Flattened rows of the forward's hidden states for rows of the original grid.
    pub fn rows(&self, original: &[usize]) -> Vec<usize> {
        original.iter().map(|&i| self.cell[i]).collect()
    }
}

impl HostBatch {
    /// The same sequences packed best-fit decreasing into rows as wide as this batch, when
    /// that takes fewer rows; `None` when it would not, or when a row is not one sequence
    /// from column 0 (as [`pad_right`] lays them out). The model computes the same values
    /// either way (positions restart and attention stays in each segment), on fewer tokens:
    /// DPO pairs and RL completions of uneven length pad much of a batch.
    pub fn repacked(&self, pad_id: u32) -> Option<ForwardLayout> {
        let [b, t] = self.shape;
        let mut seqs = Vec::with_capacity(b);
        for r in 0..b {
            let seg = &self.segments[r * t..(r + 1) * t];
            let len = seg.iter().take_while(|&&s| s == 1).count();
            if len == 0
                || self.positions[r * t..r * t + len].iter().zip(0..).any(|(&p, j)| p != j)
                || seg[len..].iter().any(|&s| s != 0)
            {
                return None;
            }
            let row = r * t..r * t + len;
            seqs.push(TokenizedSequence {
                input_ids: self.input_ids[row.clone()].iter().map(|&i| i as u32).collect(),
                loss_mask: self.loss_mask[row].to_vec(),
            });
        }
        let refs: Vec<&TokenizedSequence> = seqs.iter().collect();
        let (batch, starts) = pack_placed(&refs, t, pad_id).ok()?;
        if batch.shape[0] >= b {
            return None;
        }
        let mut cell = vec![usize::MAX; b * t];
        for (r, (s, start)) in seqs.iter().zip(starts).enumerate() {
            for j in 0..s.len() {
                cell[r * t + j] = start + j;
            }
        }
        Some(ForwardLayout { batch, cell })
    }

    /// [`HostBatch::repacked`] when packing saves rows, else the batch as it is.
    pub fn forward_layout(&self, pad_id: u32) -> ForwardLayout {
        self.repacked(pad_id).unwrap_or_else(|| ForwardLayout::padded(self))
    }
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

    #[test]
    fn repacking_moves_every_token_with_its_mask_and_saves_rows() {
        let seq = |ids: &[u32], from: usize| TokenizedSequence {
            input_ids: ids.to_vec(),
            loss_mask: (0..ids.len()).map(|i| i >= from).collect(),
        };
        let rows = [seq(&[1, 2, 3, 4, 5, 6], 2), seq(&[7, 8], 1), seq(&[9, 10, 11], 1), seq(&[12], 0)];
        let refs: Vec<&TokenizedSequence> = rows.iter().collect();
        let padded = pad_right(&refs, 99);
        let r = padded.repacked(99).expect("4 rows of 6 pack into 2");
        assert_eq!(r.batch.shape, [2, 6]);
        for (i, &c) in r.cell.iter().enumerate() {
            if padded.segments[i] == 0 {
                assert_eq!(c, usize::MAX);
                continue;
            }
            assert_eq!(r.batch.input_ids[c], padded.input_ids[i]);
            assert_eq!(r.batch.loss_mask[c], padded.loss_mask[i]);
            assert_eq!(r.batch.positions[c], padded.positions[i]);
        }
        // Each shifted target the padded batch trains on is one the packed batch trains on.
        let (pt, pm) = padded.shifted_targets();
        let (rt, rm) = r.batch.shifted_targets();
        let (w, rw) = (5, 5);
        for (k, _) in pm.iter().enumerate().filter(|(_, m)| **m) {
            let (row, j) = (k / w, k % w);
            let c = r.cell[row * 6 + j + 1] - 1;
            let rk = c / 6 * rw + c % 6;
            assert!(rm[rk] && rt[rk] == pt[k], "target {k}");
        }
        assert_eq!(pm.iter().filter(|m| **m).count(), rm.iter().filter(|m| **m).count());
        // Nothing to save: every row full.
        assert!(pad_right(&[&rows[0], &rows[0]], 0).repacked(0).is_none());
        // Not one sequence per row.
        assert!(pack(&refs, 6, 0).unwrap().repacked(0).is_none());
    }
}
