//! Process-wide settings that make training faster on the CPU, applied once by the binaries.
//!
//! Two costs outside the tensor kernels showed up in `perf` on a LoRA training step:
//! - OpenBLAS's idle worker threads spin (`sched_yield`) for a long while after each product,
//!   taking a core from burn's threads between products (a quarter of the samples on 2 cores):
//!   `OPENBLAS_THREAD_TIMEOUT=4`, its shortest spin.
//! - oneDNN's OpenMP threads (libgomp, [`crate::onednn`]) spin the same way after each bf16
//!   product. `OMP_WAIT_POLICY=passive` puts them to sleep at once (without it oneDNN's faster
//!   products bought nothing).
//! - Several ranks of a data-parallel run on one machine (`mpirun -np N`) each start a thread per
//!   core by default, N × cores threads fighting for the cores: each rank gets its share
//!   (`cores / ranks on this node`, at least one) unless the environment sets the counts.
//! - A step allocates and frees the same few dozen large buffers (activations, gradients,
//!   logits) every time. glibc's malloc serves large blocks with `mmap` and hands freed memory
//!   back to the OS, so each step faults in and zeroes fresh pages: freed blocks are kept in the
//!   heap for reuse (as PyTorch's caching allocator does).
//!
//! What each setting measured: docs/BENCHMARKS.md, "Design measurements".

/// The largest block glibc may serve from its heap instead of `mmap` (glibc's own upper limit
/// for this setting on 64-bit systems).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: libc::c_int = 32 << 20;

/// Free memory at the top of the heap kept rather than returned to the OS.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TRIM_THRESHOLD: libc::c_int = 512 << 20;

/// Applies the settings above: sets `OPENBLAS_THREAD_TIMEOUT=4` and `OMP_WAIT_POLICY=passive`
/// unless the environment sets them already (they take effect when OpenBLAS / oneDNN are opened),
/// and on glibc raises malloc's `mmap` and trim thresholds. `PEFT_MALLOC=default` leaves malloc as
/// it is.
///
/// # Safety
///
/// Changes the process environment: call it before any other thread exists (first thing in
/// `main`), as [`std::env::set_var`] requires.
pub unsafe fn prepare() {
    if std::env::var_os("OPENBLAS_THREAD_TIMEOUT").is_none() {
        // SAFETY: the caller guarantees that no other thread is running.
        unsafe { std::env::set_var("OPENBLAS_THREAD_TIMEOUT", "4") };
    }
    if std::env::var_os("OMP_WAIT_POLICY").is_none() {
        // SAFETY: as above.
        unsafe { std::env::set_var("OMP_WAIT_POLICY", "passive") };
    }
    if let Some(threads) = threads_per_local_rank() {
        for key in [
            "RAYON_NUM_THREADS",
            "OPENBLAS_NUM_THREADS",
            "OMP_NUM_THREADS",
        ] {
            if std::env::var_os(key).is_none() {
                // SAFETY: as above.
                unsafe { std::env::set_var(key, threads.to_string()) };
            }
        }
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var("PEFT_MALLOC").as_deref() != Ok("default") {
        // SAFETY: mallopt only changes allocator parameters; no other thread is allocating yet.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
            libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
        }
    }
}

/// This process's share of the cores when an MPI launcher started several ranks on this node
/// (Open MPI's `OMPI_COMM_WORLD_LOCAL_SIZE`, MPICH's `MPI_LOCALNRANKS`); `None` otherwise.
pub fn threads_per_local_rank() -> Option<usize> {
    let local: usize = ["OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS"]
        .iter()
        .find_map(|key| std::env::var(key).ok()?.parse().ok())?;
    if local < 2 {
        return None;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    Some((cores / local).max(1))
}
