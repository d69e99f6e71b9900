//! Data parallelism across processes: what the trainer needs of a process group (PyTorch's
//! `torch.distributed`, reduced to one collective), and the single-process group.
//!
//! Every rank holds the whole model and takes its own micro-batches of each global batch; the
//! trainable gradients (and the step's loss, token count and stop flag) are summed with one
//! all-reduce per optimizer step, and every rank then applies the same AdamW step. The transport
//! is an existing engine (MPI in the `peft` binary's `mpi` feature), never a home-made one.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::error::TrainError;

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

/// Ranks that are threads of one process, one per device (`peft train --devices
/// cuda:0,cuda:1`): each holds its own model on its device, and the all-reduce sums the ranks'
/// buffers in host memory, in rank order (so a run is deterministic). A rank that fails calls
/// [`ThreadRanks::abandon`], and every rank waiting at an all-reduce then fails too instead of
/// waiting forever; a rank that does not arrive within the timeout fails them the same way.
pub struct ThreadRanks {
    rank: usize,
    size: usize,
    timeout: Duration,
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<Round>,
    changed: Condvar,
}

#[derive(Default)]
struct Round {
    /// The sum being built in this round.
    sum: Vec<f32>,
    /// Ranks that have added their buffer in this round (they add in rank order).
    arrived: usize,
    /// Rounds completed.
    generation: u64,
    /// The last completed round's sum.
    result: Vec<f32>,
    /// Why the group stopped, once a rank failed.
    failed: Option<String>,
}

impl ThreadRanks {
    /// `size` ranks sharing one all-reduce, each waiting at most `timeout` for the others.
    pub fn group(size: usize, timeout: Duration) -> Vec<ThreadRanks> {
        let shared = Arc::new(Shared {
            state: Mutex::new(Round::default()),
            changed: Condvar::new(),
        });
        (0..size)
            .map(|rank| ThreadRanks {
                rank,
                size,
                timeout,
                shared: shared.clone(),
            })
            .collect()
    }

    /// Marks the group failed (this rank stops with `why`): every other rank's next or current
    /// all-reduce returns an error naming it.
    pub fn abandon(&self, why: &str) {
        let mut round = self.lock();
        round
            .failed
            .get_or_insert_with(|| format!("rank {} failed: {why}", self.rank));
        self.shared.changed.notify_all();
    }

    fn lock(&self) -> MutexGuard<'_, Round> {
        // A rank that panicked while holding the lock left a consistent round (every update is
        // a single assignment), so the data is still usable.
        self.shared
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Waits until `ready` holds, failing when the group failed or the timeout passes.
    fn wait_until<'a>(
        &self,
        mut round: MutexGuard<'a, Round>,
        started: Instant,
        ready: impl Fn(&Round) -> bool,
    ) -> Result<MutexGuard<'a, Round>, TrainError> {
        loop {
            if let Some(why) = &round.failed {
                return Err(TrainError::Distributed(why.clone()));
            }
            if ready(&round) {
                return Ok(round);
            }
            let left = self.timeout.saturating_sub(started.elapsed());
            if left.is_zero() {
                let why = format!(
                    "rank {} waited {} s for the other ranks' gradients (a rank hangs)",
                    self.rank,
                    self.timeout.as_secs()
                );
                round.failed = Some(why.clone());
                self.shared.changed.notify_all();
                return Err(TrainError::Distributed(why));
            }
            round = self
                .shared
                .changed
                .wait_timeout(round, left)
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0;
        }
    }
}

impl Collective for ThreadRanks {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.size
    }

    fn all_reduce_sum(&self, values: &mut [f32]) -> Result<(), TrainError> {
        let started = Instant::now();
        let rank = self.rank;
        let round = self.lock();
        let mut round = self.wait_until(round, started, |r| r.arrived == rank)?;
        let generation = round.generation;
        if rank == 0 {
            round.sum = values.to_vec();
        } else if round.sum.len() != values.len() {
            let why = format!(
                "rank {rank} reduces {} values, rank 0 {}",
                values.len(),
                round.sum.len()
            );
            round.failed = Some(why.clone());
            self.shared.changed.notify_all();
            return Err(TrainError::Distributed(why));
        } else {
            round
                .sum
                .iter_mut()
                .zip(values.iter())
                .for_each(|(a, b)| *a += b);
        }
        round.arrived += 1;
        if round.arrived == self.size {
            round.result = std::mem::take(&mut round.sum);
            round.arrived = 0;
            round.generation += 1;
        }
        self.shared.changed.notify_all();
        let round = self.wait_until(round, started, |r| r.generation != generation)?;
        values.copy_from_slice(&round.result);
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

    #[test]
    fn thread_ranks_sum_in_rank_order_round_after_round() {
        let ranks = ThreadRanks::group(3, Duration::from_secs(30));
        let sums: Vec<Vec<Vec<f32>>> = std::thread::scope(|s| {
            let handles: Vec<_> = ranks
                .iter()
                .map(|r| {
                    s.spawn(move || {
                        (0..4)
                            .map(|round| {
                                let mut v = vec![r.rank() as f32 + round as f32, 1.0];
                                r.all_reduce_sum(&mut v).unwrap();
                                v
                            })
                            .collect()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for per_rank in &sums {
            for (round, v) in per_rank.iter().enumerate() {
                // (0 + 1 + 2) + 3 · round, and three ones.
                assert_eq!(v, &vec![3.0 + 3.0 * round as f32, 3.0]);
            }
        }
    }

    #[test]
    fn a_failed_or_missing_rank_fails_the_others() {
        let ranks = ThreadRanks::group(2, Duration::from_secs(30));
        ranks[1].abandon("out of memory");
        let err = ranks[0].all_reduce_sum(&mut [1.0]).unwrap_err().to_string();
        assert!(err.contains("rank 1 failed: out of memory"), "{err}");

        let ranks = ThreadRanks::group(2, Duration::from_millis(50));
        let err = ranks[0].all_reduce_sum(&mut [1.0]).unwrap_err().to_string();
        assert!(err.contains("rank 0 waited 0 s"), "{err}");
        let err = ranks[1].all_reduce_sum(&mut [1.0]).unwrap_err().to_string();
        assert!(err.contains("a rank hangs"), "{err}");
    }
}
