//! bf16 products on the CPU's bf16 units through oneDNN, when it is installed.
//!
//! bf16 compute ([`crate::precision`]) multiplies bf16 operands with f32 accumulation. Without
//! this module that product is an f32 GEMM over the bf16 values widened to f32: the same
//! numbers, at f32 speed. CPUs with AVX512-BF16 (or AMX) multiply bf16 pairs at about twice the
//! f32 rate, and oneDNN — the library PyTorch's own CPU bf16 matmuls run through — reaches it
//! (measured against OpenBLAS's `sgemm`: docs/BENCHMARKS.md, "Design measurements").
//!
//! Like OpenBLAS ([`crate::blas`]), oneDNN is opened at run time (`dlopen` of Debian's
//! `libdnnl.so.2`, oneDNN 2.x), never linked: a build needs nothing installed, and a machine
//! without it — or whose CPU has no bf16 units — computes exactly as before (bf16 results then
//! differ only by the order of f32 accumulation). `PEFT_ONEDNN=off` turns it off, `PEFT_ONEDNN=PATH`
//! names the library to open. `PEFT_LOG=info` says once which path bf16 products take.
//!
//! The interface is one product, [`OneDnn::matmul_bf16`]; a matmul primitive is created once per
//! shape and kept (a small cache), and the weights are read in their plain row-major layout as
//! stored: oneDNN's blocked weight layout (`format_tag::any` and a reorder at load) bought
//! nothing measurable on the training shapes and would need a second copy of every weight
//! (docs/BENCHMARKS.md, "Design measurements").

use std::cell::Cell;
use std::collections::HashMap;
use std::ffi::{CStr, c_char, c_int, c_void};
use std::sync::{Mutex, OnceLock};

/// `dnnl_status_t`; 0 is success.
type Status = c_int;
/// Opaque handles (`dnnl_engine_t`, `dnnl_stream_t`, `dnnl_primitive_t`, …).
type Handle = *mut c_void;

/// `dnnl_memory_desc_t`, as opaque bytes: oneDNN 2.x's struct is 696 bytes; the buffer is larger
/// so that a patch release growing it cannot write past it. Only oneDNN's functions fill it.
#[repr(C, align(8))]
struct MemoryDesc([u8; 2048]);

/// `dnnl_matmul_desc_t` (2800 bytes in oneDNN 2.6), as opaque bytes with the same margin.
#[repr(C, align(8))]
struct MatmulDesc([u8; 8192]);

/// `dnnl_exec_arg_t`.
#[repr(C)]
struct ExecArg {
    arg: c_int,
    memory: Handle,
}

/// `dnnl_version_t`.
#[repr(C)]
struct Version {
    major: c_int,
    minor: c_int,
    patch: c_int,
    hash: *const c_char,
    cpu_runtime: u32,
    gpu_runtime: u32,
}

// oneDNN 2.x's enum values (dnnl_types.h).
const SUCCESS: Status = 0;
const DATA_TYPE_BF16: c_int = 2;
const DATA_TYPE_F32: c_int = 3;
const TAG_AB: c_int = 3;
const TAG_BA: c_int = 22;
const ENGINE_CPU: c_int = 1;
const STREAM_DEFAULT_FLAGS: u32 = 1;
const QUERY_IMPL_INFO_STR: c_int = 8;
const ARG_SRC: c_int = 1;
const ARG_WEIGHTS: c_int = 33;
const ARG_DST: c_int = 17;

/// The oneDNN functions used, resolved once.
struct Functions {
    engine_create: unsafe extern "C" fn(*mut Handle, c_int, usize) -> Status,
    stream_create: unsafe extern "C" fn(*mut Handle, Handle, u32) -> Status,
    memory_desc_init_by_tag:
        unsafe extern "C" fn(*mut MemoryDesc, c_int, *const i64, c_int, c_int) -> Status,
    matmul_desc_init: unsafe extern "C" fn(
        *mut MatmulDesc,
        *const MemoryDesc,
        *const MemoryDesc,
        *const MemoryDesc,
        *const MemoryDesc,
    ) -> Status,
    primitive_desc_create:
        unsafe extern "C" fn(*mut Handle, *const c_void, Handle, Handle, Handle) -> Status,
    primitive_desc_query: unsafe extern "C" fn(Handle, c_int, c_int, *mut c_void) -> Status,
    primitive_desc_destroy: unsafe extern "C" fn(Handle) -> Status,
    primitive_create: unsafe extern "C" fn(*mut Handle, Handle) -> Status,
    primitive_destroy: unsafe extern "C" fn(Handle) -> Status,
    primitive_execute: unsafe extern "C" fn(Handle, Handle, c_int, *const ExecArg) -> Status,
    memory_create: unsafe extern "C" fn(*mut Handle, *const MemoryDesc, Handle, Handle) -> Status,
    memory_destroy: unsafe extern "C" fn(Handle) -> Status,
    stream_wait: unsafe extern "C" fn(Handle) -> Status,
}

/// How the weight operand `B` of `A · B` is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WeightLayout {
    /// `B: [k, n]` row-major.
    KN,
    /// `Bᵀ: [n, k]` row-major: a linear layer's `[out, in]` weight in its forward product.
    NK,
}

/// One product shape's primitive and the descriptions of its operands.
struct Product {
    primitive: Handle,
    src: Box<MemoryDesc>,
    weights: Box<MemoryDesc>,
    dst: Box<MemoryDesc>,
}

/// `(m, k, n, layout)`.
type ShapeKey = (usize, usize, usize, WeightLayout);

/// Primitives are kept for at most this many shapes (training uses a handful; generation's
/// prompts vary in length); past it the cache is emptied and filled again.
const MAX_CACHED_SHAPES: usize = 64;

/// The opened library, its CPU engine and stream, and the primitive cache.
pub struct OneDnn {
    // Keeps the library mapped for as long as its functions may be called.
    _library: libloading::Library,
    functions: Functions,
    engine: Handle,
    stream: Handle,
    /// The primitives by shape; the lock also serialises execution on the one stream.
    products: Mutex<HashMap<ShapeKey, Product>>,
    /// The file that was opened and its version, e.g. `libdnnl.so.2 (oneDNN 2.6.3)`.
    pub name: String,
}

// SAFETY: the handles are oneDNN objects that may be used from any thread; every use of the
// stream and the primitives happens under the `products` lock.
unsafe impl Send for OneDnn {}
// SAFETY: as above.
unsafe impl Sync for OneDnn {}

impl std::fmt::Debug for OneDnn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "OneDnn({})", self.name)
    }
}

/// oneDNN, opened on first call; `None` when it is absent, turned off (`PEFT_ONEDNN=off`), not a
/// 2.x release, or the CPU has no bf16 units (AVX512-BF16; AMX CPUs have it too).
pub fn onednn() -> Option<&'static OneDnn> {
    static ONEDNN: OnceLock<Option<OneDnn>> = OnceLock::new();
    ONEDNN
        .get_or_init(|| {
            let found = find();
            match &found {
                Some(dnn) => tracing::info!("bf16 products through {}", dnn.name),
                None => tracing::info!(
                    "bf16 products as f32 GEMMs of bf16 values (no oneDNN 2.x, `PEFT_ONEDNN=off`, \
                     or no bf16 units in this CPU)"
                ),
            }
            found
        })
        .as_ref()
}

/// Whether this CPU multiplies bf16 in hardware.
pub fn cpu_has_bf16_units() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

fn find() -> Option<OneDnn> {
    let names = match std::env::var("PEFT_ONEDNN") {
        Ok(v) if matches!(v.as_str(), "off" | "0" | "none" | "") => return None,
        Ok(path) => vec![path],
        Err(_) => vec!["libdnnl.so.2".into()],
    };
    if !cpu_has_bf16_units() {
        return None;
    }
    names.into_iter().find_map(|name| open(&name))
}

/// Resolves `name` in `library` as a function pointer of type `T`.
///
/// # Safety
///
/// `T` must be the symbol's true C signature.
unsafe fn symbol<T: Copy>(library: &libloading::Library, name: &str) -> Option<T> {
    let name = format!("{name}\0");
    // SAFETY: the caller guarantees the signature.
    unsafe { library.get::<T>(name.as_bytes()) }
        .ok()
        .map(|f| *f)
}

fn open(name: &str) -> Option<OneDnn> {
    // SAFETY: opening oneDNN runs its initialisers, which only register its implementations.
    let library = unsafe { libloading::Library::new(name) }.ok()?;
    // SAFETY: `dnnl_version` takes nothing and returns a pointer to a static struct.
    let version: unsafe extern "C" fn() -> *const Version =
        unsafe { symbol(&library, "dnnl_version") }?;
    // SAFETY: the pointer is to a static `dnnl_version_t`.
    let version = unsafe { &*version() };
    if version.major != 2 {
        tracing::debug!(
            "{name} is oneDNN {}.{}: only 2.x is supported",
            version.major,
            version.minor
        );
        return None;
    }
    // SAFETY: each signature is oneDNN 2.x's (dnnl.h).
    let functions = unsafe {
        Functions {
            engine_create: symbol(&library, "dnnl_engine_create")?,
            stream_create: symbol(&library, "dnnl_stream_create")?,
            memory_desc_init_by_tag: symbol(&library, "dnnl_memory_desc_init_by_tag")?,
            matmul_desc_init: symbol(&library, "dnnl_matmul_desc_init")?,
            primitive_desc_create: symbol(&library, "dnnl_primitive_desc_create")?,
            primitive_desc_query: symbol(&library, "dnnl_primitive_desc_query")?,
            primitive_desc_destroy: symbol(&library, "dnnl_primitive_desc_destroy")?,
            primitive_create: symbol(&library, "dnnl_primitive_create")?,
            primitive_destroy: symbol(&library, "dnnl_primitive_destroy")?,
            primitive_execute: symbol(&library, "dnnl_primitive_execute")?,
            memory_create: symbol(&library, "dnnl_memory_create")?,
            memory_destroy: symbol(&library, "dnnl_memory_destroy")?,
            stream_wait: symbol(&library, "dnnl_stream_wait")?,
        }
    };
    let mut engine: Handle = std::ptr::null_mut();
    let mut stream: Handle = std::ptr::null_mut();
    // SAFETY: out-pointers to handles; the engine outlives the stream (both live as long as the
    // process).
    unsafe {
        if (functions.engine_create)(&mut engine, ENGINE_CPU, 0) != SUCCESS
            || (functions.stream_create)(&mut stream, engine, STREAM_DEFAULT_FLAGS) != SUCCESS
        {
            return None;
        }
    }
    let dnn = OneDnn {
        _library: library,
        functions,
        engine,
        stream,
        products: Mutex::new(HashMap::new()),
        name: format!(
            "{name} (oneDNN {}.{}.{})",
            version.major, version.minor, version.patch
        ),
    };
    // A library that cannot build a bf16 product with its optimised kernels (only oneDNN's slow
    // reference code) is not worth using.
    let probe = dnn.create_product((64, 64, 64, WeightLayout::NK)).ok()?;
    dnn.destroy(&probe);
    Some(dnn)
}

thread_local! {
    static PRODUCTS_RUN: Cell<usize> = const { Cell::new(0) };
}

/// How many products oneDNN has computed on this thread (tests check the path is taken).
pub fn products_run() -> usize {
    PRODUCTS_RUN.with(Cell::get)
}

impl OneDnn {
    fn memory_desc(
        &self,
        dims: [usize; 2],
        data_type: c_int,
        tag: c_int,
    ) -> Result<Box<MemoryDesc>, String> {
        let mut desc = Box::new(MemoryDesc([0; 2048]));
        let dims = [dims[0] as i64, dims[1] as i64];
        // SAFETY: `desc` is larger than the library's struct; `dims` holds `ndims` values.
        let status = unsafe {
            (self.functions.memory_desc_init_by_tag)(&mut *desc, 2, dims.as_ptr(), data_type, tag)
        };
        match status {
            SUCCESS => Ok(desc),
            s => Err(format!("dnnl_memory_desc_init_by_tag: status {s}")),
        }
    }

    /// A primitive for `[m, k] bf16 · B bf16 → [m, n] f32`, refused when oneDNN would run its
    /// reference (unoptimised) implementation.
    fn create_product(&self, (m, k, n, layout): ShapeKey) -> Result<Product, String> {
        let src = self.memory_desc([m, k], DATA_TYPE_BF16, TAG_AB)?;
        let tag = match layout {
            WeightLayout::KN => TAG_AB,
            WeightLayout::NK => TAG_BA,
        };
        let weights = self.memory_desc([k, n], DATA_TYPE_BF16, tag)?;
        let dst = self.memory_desc([m, n], DATA_TYPE_F32, TAG_AB)?;
        let mut op = Box::new(MatmulDesc([0; 8192]));
        let f = &self.functions;
        // SAFETY: every descriptor was initialised by oneDNN above; null bias and attributes are
        // allowed; out-pointers are to local handles.
        unsafe {
            let status = (f.matmul_desc_init)(&mut *op, &*src, &*weights, std::ptr::null(), &*dst);
            if status != SUCCESS {
                return Err(format!("dnnl_matmul_desc_init: status {status}"));
            }
            let mut pd: Handle = std::ptr::null_mut();
            let null = std::ptr::null_mut();
            let status = (f.primitive_desc_create)(
                &mut pd,
                (&*op as *const MatmulDesc).cast(),
                null,
                self.engine,
                null,
            );
            if status != SUCCESS {
                return Err(format!("dnnl_primitive_desc_create: status {status}"));
            }
            let mut info: *const c_char = std::ptr::null();
            let queried = (f.primitive_desc_query)(
                pd,
                QUERY_IMPL_INFO_STR,
                0,
                (&mut info as *mut *const c_char).cast(),
            );
            let implementation = match queried == SUCCESS && !info.is_null() {
                true => CStr::from_ptr(info).to_string_lossy().into_owned(),
                false => String::new(),
            };
            if implementation.is_empty() || implementation.starts_with("ref") {
                (f.primitive_desc_destroy)(pd);
                return Err(format!(
                    "no optimised bf16 matmul for this CPU (`{implementation}`)"
                ));
            }
            let mut primitive: Handle = std::ptr::null_mut();
            let status = (f.primitive_create)(&mut primitive, pd);
            (f.primitive_desc_destroy)(pd);
            if status != SUCCESS {
                return Err(format!("dnnl_primitive_create: status {status}"));
            }
            tracing::debug!("oneDNN bf16 matmul {m}×{k}·{k}×{n} ({layout:?}): {implementation}");
            Ok(Product {
                primitive,
                src,
                weights,
                dst,
            })
        }
    }

    fn destroy(&self, product: &Product) {
        // SAFETY: the primitive was created by this library and is not used again.
        unsafe { (self.functions.primitive_destroy)(product.primitive) };
    }

    /// `out[m, n] = a[m, k] · B` with `a` and `B` bf16 (as their bit patterns, row-major), the
    /// products accumulated in f32. `weights` is `B: [k, n]` or `Bᵀ: [n, k]` as `layout` says.
    /// An error (a shape oneDNN cannot compute here) leaves `out` unspecified; the caller then
    /// computes the product its own way.
    pub fn matmul_bf16(
        &self,
        a: &[u16],
        weights: &[u16],
        layout: WeightLayout,
        (m, k, n): (usize, usize, usize),
        out: &mut [f32],
    ) -> Result<(), String> {
        if out.len() != m * n {
            return Err(format!(
                "output length {} does not fit {m}×{k}·{k}×{n}",
                out.len()
            ));
        }
        if k == 0 {
            out.fill(0.0);
            return Ok(());
        }
        // SAFETY: `out` holds the `m · n` values the product writes.
        unsafe { self.matmul_bf16_into(a, weights, layout, (m, k, n), out.as_mut_ptr()) }
    }

    /// [`matmul_bf16`](Self::matmul_bf16) into a new vector, which oneDNN writes without its
    /// being zeroed first.
    pub fn matmul_bf16_vec(
        &self,
        a: &[u16],
        weights: &[u16],
        layout: WeightLayout,
        (m, k, n): (usize, usize, usize),
    ) -> Result<Vec<f32>, String> {
        if k == 0 {
            return Ok(vec![0.0; m * n]);
        }
        let mut out = Vec::<f32>::with_capacity(m * n);
        // SAFETY: `out` has room for the `m · n` values, which a successful product writes in
        // full (oneDNN's dst is dense `m × n`) before `set_len` makes them readable; on an error
        // the vector is dropped with length 0.
        unsafe {
            self.matmul_bf16_into(a, weights, layout, (m, k, n), out.as_mut_ptr())?;
            out.set_len(m * n);
        }
        Ok(out)
    }

    /// The product into `out`.
    ///
    /// # Safety
    /// `out` must be valid for writes of `m · n` f32 values.
    unsafe fn matmul_bf16_into(
        &self,
        a: &[u16],
        weights: &[u16],
        layout: WeightLayout,
        (m, k, n): (usize, usize, usize),
        out: *mut f32,
    ) -> Result<(), String> {
        if a.len() != m * k || weights.len() != k * n {
            return Err(format!(
                "operand lengths {}, {} do not fit {m}×{k}·{k}×{n}",
                a.len(),
                weights.len(),
            ));
        }
        if m == 0 || n == 0 {
            return Ok(());
        }
        let key = (m, k, n, layout);
        let mut products = self.products.lock().unwrap_or_else(|e| e.into_inner());
        if !products.contains_key(&key) {
            if products.len() >= MAX_CACHED_SHAPES {
                for (_, product) in products.drain() {
                    self.destroy(&product);
                }
            }
            let product = self.create_product(key)?;
            products.insert(key, product);
        }
        let Some(product) = products.get(&key) else {
            return Err("primitive cache lost an entry".into());
        };
        let f = &self.functions;
        let mut memories: [Handle; 3] = [std::ptr::null_mut(); 3];
        let operands = [
            (&*product.src, a.as_ptr() as *mut c_void),
            (&*product.weights, weights.as_ptr() as *mut c_void),
            (&*product.dst, out.cast::<c_void>()),
        ];
        // SAFETY: each memory object wraps a buffer whose length was checked against its
        // descriptor above (`out`'s by the caller's contract); oneDNN only reads `a` and `weights` (their descriptors are inputs) and
        // writes `out`; the memory objects are destroyed before the buffers can go away, and the
        // stream is waited on before returning.
        unsafe {
            let mut status = SUCCESS;
            for (memory, (desc, buffer)) in memories.iter_mut().zip(operands) {
                if status == SUCCESS {
                    status = (f.memory_create)(memory, desc, self.engine, buffer);
                }
            }
            if status == SUCCESS {
                let args = [ARG_SRC, ARG_WEIGHTS, ARG_DST]
                    .into_iter()
                    .zip(memories)
                    .map(|(arg, memory)| ExecArg { arg, memory })
                    .collect::<Vec<_>>();
                status = (f.primitive_execute)(product.primitive, self.stream, 3, args.as_ptr());
                let waited = (f.stream_wait)(self.stream);
                if status == SUCCESS {
                    status = waited;
                }
            }
            for memory in memories.into_iter().filter(|m| !m.is_null()) {
                (f.memory_destroy)(memory);
            }
            if status != SUCCESS {
                return Err(format!("oneDNN matmul {m}×{k}·{k}×{n}: status {status}"));
            }
        }
        PRODUCTS_RUN.with(|c| c.set(c.get() + 1));
        Ok(())
    }
}

/// `values` rounded to bf16 (to nearest, ties to even), as bit patterns.
pub fn to_bf16_bits(values: &[f32]) -> Vec<u16> {
    let mut bits = vec![0u16; values.len()];
    crate::kernels::round_to_bf16_bits(values, &mut bits);
    bits
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Small deterministic values that are exact in bf16 (a few mantissa bits, mixed signs).
    fn bf16_values(len: usize, seed: u32) -> Vec<f32> {
        (0..len as u32)
            .map(|i| {
                let h = i
                    .wrapping_mul(2_654_435_761)
                    .wrapping_add(seed.wrapping_mul(40503));
                ((h >> 7) % 61) as f32 / 16.0 - 1.875
            })
            .collect()
    }

    /// The product in f64: every term and (at these sizes) every partial sum is exact, so this is
    /// the true value, which an f32 accumulation of bf16 products reaches up to rounding.
    fn reference(a: &[f32], b_kn: &[f32], (m, k, n): (usize, usize, usize)) -> Vec<f32> {
        let mut out = vec![0.0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let s: f64 = (0..k)
                    .map(|p| f64::from(a[i * k + p]) * f64::from(b_kn[p * n + j]))
                    .sum();
                out[i * n + j] = s as f32;
            }
        }
        out
    }

    #[test]
    fn products_equal_the_exact_values_in_both_layouts() {
        let Some(dnn) = onednn() else {
            // Nothing to compare; the CI run with oneDNN installed requires it (below).
            return;
        };
        // Odd sizes: no dimension a multiple of the kernels' blocks.
        let (m, k, n) = (37, 129, 70);
        let a = bf16_values(m * k, 1);
        let b = bf16_values(k * n, 2);
        let expected = reference(&a, &b, (m, k, n));
        let b_nk: Vec<f32> = (0..n)
            .flat_map(|j| (0..k).map(move |p| (j, p)))
            .map(|(j, p)| b[p * n + j])
            .collect();
        let before = products_run();
        for (layout, weights) in [(WeightLayout::KN, &b), (WeightLayout::NK, &b_nk)] {
            let mut out = vec![f32::NAN; m * n];
            dnn.matmul_bf16(
                &to_bf16_bits(&a),
                &to_bf16_bits(weights),
                layout,
                (m, k, n),
                &mut out,
            )
            .unwrap();
            // Values are multiples of 1/256 below 2^13 in magnitude: every sum is exact in f32
            // too, so any order of accumulation gives exactly the reference.
            assert_eq!(out, expected, "{layout:?}");
        }
        assert_eq!(products_run(), before + 2);
    }

    #[test]
    fn wrong_lengths_are_refused_and_empty_products_are_zero() {
        let Some(dnn) = onednn() else { return };
        let err = dnn
            .matmul_bf16(&[0; 3], &[0; 4], WeightLayout::KN, (2, 2, 2), &mut [0.0; 4])
            .unwrap_err();
        assert!(err.contains("do not fit 2×2·2×2"), "{err}");
        let mut out = [1.0f32; 4];
        dnn.matmul_bf16(&[], &[], WeightLayout::KN, (2, 0, 2), &mut out)
            .unwrap();
        assert_eq!(out, [0.0; 4]);
    }

    /// CI installs oneDNN and sets `PEFT_REQUIRE_ONEDNN=1`: on a CPU with bf16 units the bf16
    /// tests must then really run through it.
    #[test]
    fn onednn_is_loaded_when_required() {
        if std::env::var("PEFT_REQUIRE_ONEDNN").as_deref() == Ok("1") && cpu_has_bf16_units() {
            let dnn = onednn().expect("PEFT_REQUIRE_ONEDNN=1 but oneDNN 2.x did not load");
            assert!(dnn.name.contains("oneDNN 2."), "{}", dnn.name);
        }
    }

    #[test]
    fn rounding_to_bf16_is_to_nearest_even() {
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to the even mantissa (1.0).
        let bits = to_bf16_bits(&[1.0, 1.0 + 1.0 / 256.0, 1.0 + 3.0 / 256.0, -2.5]);
        let back: Vec<f32> = bits
            .iter()
            .map(|b| f32::from_bits(u32::from(*b) << 16))
            .collect();
        assert_eq!(back, vec![1.0, 1.0, 1.0 + 4.0 / 256.0, -2.5]);
    }
}
