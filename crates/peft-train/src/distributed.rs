//! Data parallelism across processes: what the trainer needs of a process group (PyTorch's
//! `torch.distributed`, reduced to one collective), and the single-process group.
//!
//! Every rank holds the whole model and takes its own micro-batches of each global batch; the
//! trainable gradients (and the step's loss, token count and stop flag) are summed with one
//! all-reduce per optimizer step, and every rank then applies the same AdamW step. The transport
//! is an existing engine (MPI in the `peft` binary's `mpi` feature), never a home-made one.

use crate::trainer::TrainError;

/// A group of processes training one model together.
pub trait Collective {
    /// This process's index, `0..world_size()`; rank 0 writes checkpoints, metrics and results.
    fn rank(&self) -> usize;

    /// How many processes train together.
    fn world_size(&self) -> usize;

    /// Sums `values` element-wise over every rank, in place: afterwards every rank holds the
    /// same sums. A rank that does not take part within the group's timeout is an error, never a
    /// hang.
    fn all_reduce_sum(&self, values: &mut [f32]) -> Result<(), TrainError>;
}

/// One process training alone: the sums are the values themselves.
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleProcess;

impl Collective for SingleProcess {
    fn rank(&self) -> usize {
        0
    }

    fn world_size(&self) -> usize {
        1
    }

    fn all_reduce_sum(&self, _values: &mut [f32]) -> Result<(), TrainError> {
        Ok(())
    }
}

/// Rank `rank` of `world_size`'s micro-batches among the `per_step` of the optimizer step that
/// starts at global micro-batch `first`: a contiguous block, `per_step / world_size` long.
///
/// A single-process run with `per_step` micro-batches per step draws the same micro-batches in
/// the same order, so the ranks together see exactly its data.
pub fn rank_micro_batches(
    first: usize,
    per_step: usize,
    rank: usize,
    world_size: usize,
) -> std::ops::Range<usize> {
    let per_rank = per_step / world_size.max(1);
    let start = first + rank * per_rank;
    start..start + per_rank
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_split_a_step_into_contiguous_blocks() {
        // Step 3 of a run with 2 ranks × 2 micro-batches each: global micro-batches 12..16.
        assert_eq!(rank_micro_batches(12, 4, 0, 2), 12..14);
        assert_eq!(rank_micro_batches(12, 4, 1, 2), 14..16);
        assert_eq!(rank_micro_batches(5, 1, 0, 1), 5..6);
        let mut values = [1.0, 2.0];
        SingleProcess.all_reduce_sum(&mut values).unwrap();
        assert_eq!(values, [1.0, 2.0]);
    }
}
