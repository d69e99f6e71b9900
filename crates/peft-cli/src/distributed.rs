//! `peft train` across processes: which group a run joins — one process, or the ranks of an MPI
//! job (`mpirun -np N peft train …`, the `mpi` feature) — and the MPI group itself.

use std::time::Duration;

use anyhow::{Result, bail};
use peft_train::{Collective, SingleProcess};

/// The ranks of the MPI job this process was started in, from the launcher's environment
/// (Open MPI's `OMPI_COMM_WORLD_SIZE`, MPICH / Intel MPI's `PMI_SIZE`); `None` outside one.
pub fn launched_ranks() -> Option<usize> {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE"]
        .iter()
        .find_map(|key| std::env::var(key).ok()?.parse().ok())
}

/// The group this run trains in: `--distributed mpi`, or automatically when an MPI launcher
/// started several ranks; otherwise one process (`--distributed none` forces it).
pub fn group(choice: Option<&str>, timeout: Duration) -> Result<Box<dyn Collective>> {
    let launched = launched_ranks().filter(|&n| n > 1);
    let use_mpi = match choice {
        None => launched.is_some(),
        Some("mpi") => true,
        Some("none") => false,
        Some(other) => bail!("--distributed: unknown `{other}` (none, mpi)"),
    };
    if !use_mpi {
        return Ok(Box::new(SingleProcess));
    }
    mpi_group(timeout, launched)
}

#[cfg(not(feature = "mpi"))]
fn mpi_group(_timeout: Duration, launched: Option<usize>) -> Result<Box<dyn Collective>> {
    let how = launched.map_or(String::new(), |n| {
        format!(" (this process is one of {n} ranks started by mpirun)")
    });
    bail!(
        "distributed training needs a peft built with MPI{how}: install Open MPI \
         (apt-get install openmpi-bin libopenmpi-dev libclang-dev) and build with \
         `cargo build --release -p peft-cli --features mpi`"
    )
}

#[cfg(feature = "mpi")]
fn mpi_group(timeout: Duration, _launched: Option<usize>) -> Result<Box<dyn Collective>> {
    Ok(Box::new(mpi_ranks::MpiGroup::start(timeout)?))
}

#[cfg(feature = "mpi")]
mod mpi_ranks {
    use std::time::{Duration, Instant};

    use anyhow::{Result, anyhow};
    use mpi::collective::SystemOperation;
    use mpi::environment::Universe;
    use mpi::topology::SimpleCommunicator;
    use mpi::traits::{Communicator, CommunicatorCollectives};
    use peft_train::{Collective, TrainError};

    /// The ranks of `MPI_COMM_WORLD`. Dropping it finalises MPI.
    pub struct MpiGroup {
        world: SimpleCommunicator,
        timeout: Duration,
        // Last: MPI is finalised after the communicator is released.
        _universe: Universe,
    }

    impl MpiGroup {
        /// Initialises MPI (once per process).
        pub fn start(timeout: Duration) -> Result<Self> {
            let universe = mpi::initialize()
                .ok_or_else(|| anyhow!("MPI was already initialised in this process"))?;
            Ok(Self {
                world: universe.world(),
                timeout,
                _universe: universe,
            })
        }
    }

    impl Collective for MpiGroup {
        fn rank(&self) -> usize {
            self.world.rank() as usize
        }

        fn world_size(&self) -> usize {
            self.world.size() as usize
        }

        /// `MPI_Iallreduce` (sum), polled until done. A rank that does not join within the
        /// timeout (it died without the launcher noticing, or hangs) aborts the whole job with
        /// a message naming the wait, instead of blocking forever: an unfinished MPI request
        /// cannot be cancelled, so aborting is the only clean exit.
        fn all_reduce_sum(&self, values: &mut [f32]) -> Result<(), TrainError> {
            let send = values.to_vec();
            let started = Instant::now();
            let (rank, timeout) = (self.rank(), self.timeout);
            let world = &self.world;
            mpi::request::scope(|scope| {
                let mut request = world.immediate_all_reduce_into(
                    scope,
                    &send[..],
                    values,
                    SystemOperation::sum(),
                );
                let mut pause = Duration::from_micros(20);
                loop {
                    match request.test() {
                        Ok(_) => return,
                        Err(pending) => request = pending,
                    }
                    if started.elapsed() > timeout {
                        eprintln!(
                            "error: distributed training: rank {rank} waited {} s for the other \
                             ranks' gradients (a rank died or hangs; --distributed-timeout); \
                             aborting every rank",
                            timeout.as_secs()
                        );
                        world.abort(3);
                    }
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(2));
                }
            });
            Ok(())
        }
    }
}
