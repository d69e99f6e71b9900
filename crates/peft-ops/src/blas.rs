//! f32 matrix products through the system's OpenBLAS, when it is installed, for the CPU backend.
//!
//! burn's CPU backend multiplies with the `gemm` crate, at about half the f32 rate of OpenBLAS
//! (Debian's `libopenblas0`) and PyTorch (docs/BENCHMARKS.md, "Design measurements"). A training step is mostly the frozen linear layers' products, so those go through
//! OpenBLAS's `cblas_sgemm` where it is loaded ([`crate::matmul`] chooses). This module holds
//! the library and its calls only: opening it, the layout of an operand as BLAS reads it, and
//! the per-thread products of the attention kernels (`sgemm_on_this_thread`).
//!
//! OpenBLAS is opened at run time (`dlopen`), never linked: a build needs nothing installed, and a
//! machine without it computes exactly as before. `PEFT_BLAS=off` turns it off; `PEFT_BLAS=PATH`
//! names the library to open (default: `libopenblas.so.0`, then `libopenblas.so`).
//!
//! OpenBLAS's worker threads spin (`sched_yield`) for a long while after each product, taking a
//! core from the backend's own threads between products: a quarter of a training step's samples
//! on 2 cores. Binaries call [`crate::process::prepare`] first thing, which shortens that wait
//! (`OPENBLAS_THREAD_TIMEOUT=4`).

use std::sync::OnceLock;

/// `cblas_sgemm`'s C signature (enums are C ints).
type SgemmFn = unsafe extern "C" fn(
    layout: i32,
    trans_a: i32,
    trans_b: i32,
    m: i32,
    n: i32,
    k: i32,
    alpha: f32,
    a: *const f32,
    lda: i32,
    b: *const f32,
    ldb: i32,
    beta: f32,
    c: *mut f32,
    ldc: i32,
) -> ();

pub(crate) const ROW_MAJOR: i32 = 101;
pub(crate) const NO_TRANS: i32 = 111;
pub(crate) const TRANS: i32 = 112;

/// An opened BLAS library.
pub struct Blas {
    // Keeps the library mapped for as long as `sgemm` may be called.
    _library: libloading::Library,
    pub(crate) sgemm: SgemmFn,
    /// The file that was opened.
    pub name: String,
}

impl std::fmt::Debug for Blas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Blas({})", self.name)
    }
}

/// The BLAS library in use, opened on first call; `None` when there is none or `PEFT_BLAS=off`.
pub fn blas() -> Option<&'static Blas> {
    static BLAS: OnceLock<Option<Blas>> = OnceLock::new();
    BLAS.get_or_init(|| {
        let names = match std::env::var("PEFT_BLAS") {
            Ok(v) if matches!(v.as_str(), "off" | "0" | "none" | "") => return None,
            Ok(path) => vec![path],
            Err(_) => vec!["libopenblas.so.0".into(), "libopenblas.so".into()],
        };
        names.into_iter().find_map(|name| open(&name))
    })
    .as_ref()
}

fn open(name: &str) -> Option<Blas> {
    // SAFETY: opening OpenBLAS runs its initialisers, which only set up its thread pool.
    let library = unsafe { libloading::Library::new(name) }.ok()?;
    // SAFETY: `cblas_sgemm` has this signature in every CBLAS.
    let sgemm = unsafe { library.get::<SgemmFn>(b"cblas_sgemm\0") }
        .ok()
        .map(|f| *f)?;
    tracing::debug!("matrix products through {name}");
    Some(Blas {
        _library: library,
        sgemm,
        name: name.to_string(),
    })
}

/// How a 2-D `[rows, cols]` operand with element strides `[row, column]` is laid out for BLAS:
/// `(transposed, leading dimension)`, row-major with a leading dimension or transposed. The
/// stride of a dimension of size 1 is never followed, so any value does. `None` for a layout BLAS
/// cannot read (neither stride 1, or a leading dimension beyond `i32`), which a tensor is made
/// contiguous for first.
pub(crate) fn blas_view(strides: &[isize], rows: usize, cols: usize) -> Option<(i32, i32)> {
    let (rs, cs) = (strides[0], strides[1]);
    let ld = |ld: usize| i32::try_from(ld).ok();
    if cs == 1 && (rows <= 1 || rs >= cols.max(1) as isize) {
        Some((
            NO_TRANS,
            ld(if rows <= 1 { cols.max(1) } else { rs as usize })?,
        ))
    } else if rs == 1 && (cols <= 1 || cs >= rows.max(1) as isize) {
        Some((
            TRANS,
            ld(if cols <= 1 { rows.max(1) } else { cs as usize })?,
        ))
    } else {
        None
    }
}

/// The largest `m · n · k` that OpenBLAS computes on the calling thread: its `interface/gemm.c`
/// runs products up to `65536 · GEMM_MULTITHREAD_THRESHOLD` (4 by default) single-threaded.
const SINGLE_THREAD_MNK: usize = 1 << 18;

/// `dst[m, n] (+)= lhs[m, k] · rhs[k, n]` for strided matrices (`(pointer, row stride, column
/// stride)`) through BLAS on the calling thread, as products small enough that OpenBLAS does
/// not hand them to its own threads: for the attention kernels' many small products, which
/// run in parallel tasks of their own (OpenBLAS computes them about three times as fast as the
/// `gemm` crate, whose packing dominates at these sizes). `false`, with nothing written, when
/// there is no BLAS or an operand has neither stride 1.
///
/// # Safety
/// Each pointer with its strides must address a matrix of the given size inside one live
/// allocation, and `dst` must not overlap `lhs` or `rhs` or be accessed by another thread.
pub(crate) unsafe fn sgemm_on_this_thread(
    (m, n, k): (usize, usize, usize),
    dst: (*mut f32, isize, isize),
    accumulate: bool,
    lhs: (*const f32, isize, isize),
    rhs: (*const f32, isize, isize),
) -> bool {
    let Some(blas) = blas() else {
        return false;
    };
    if m == 0 || n == 0 || k == 0 || k > SINGLE_THREAD_MNK {
        return false;
    }
    let (dst_ptr, dst_rs, dst_cs) = dst;
    if dst_cs != 1 && dst_rs == 1 {
        // A column-major destination: `dstᵀ = rhsᵀ · lhsᵀ`, row-major.
        // SAFETY: the same elements, described transposed.
        return unsafe {
            sgemm_on_this_thread(
                (n, m, k),
                (dst_ptr, dst_cs, dst_rs),
                accumulate,
                (rhs.0, rhs.2, rhs.1),
                (lhs.0, lhs.2, lhs.1),
            )
        };
    }
    let (Some((NO_TRANS, ldc)), Some((trans_a, lda)), Some((trans_b, ldb))) = (
        blas_view(&[dst_rs, dst_cs], m, n),
        blas_view(&[lhs.1, lhs.2], m, k),
        blas_view(&[rhs.1, rhs.2], k, n),
    ) else {
        return false;
    };
    let m_chunk = m.min((SINGLE_THREAD_MNK / k).max(1));
    let n_chunk = n.min((SINGLE_THREAD_MNK / (m_chunk * k)).max(1));
    let beta = if accumulate { 1.0 } else { 0.0 };
    for i0 in (0..m).step_by(m_chunk) {
        for j0 in (0..n).step_by(n_chunk) {
            let (rows, cols) = (m_chunk.min(m - i0), n_chunk.min(n - j0));
            // SAFETY: each sub-matrix lies inside the caller's matrices; the sizes fit i32
            // (each factor is at most SINGLE_THREAD_MNK).
            unsafe {
                (blas.sgemm)(
                    ROW_MAJOR,
                    trans_a,
                    trans_b,
                    rows as i32,
                    cols as i32,
                    k as i32,
                    1.0,
                    lhs.0.wrapping_offset(i0 as isize * lhs.1),
                    lda,
                    rhs.0.wrapping_offset(j0 as isize * rhs.2),
                    ldb,
                    beta,
                    dst_ptr.wrapping_offset(i0 as isize * dst_rs + j0 as isize),
                    ldc,
                );
            }
        }
    }
    true
}
