//! PyTorch's f32 `sum` on CPU, reproduced operation for operation.
//!
//! Double quantisation subtracts `absmax.mean()` before quantising the block statistics, and the
//! offset is saved; matching bitsandbytes bit for bit therefore means adding up in PyTorch's order:
//! its cascade sum over 8-lane vectors with four interleaved accumulators and four levels of
//! partial sums, and above its parallel grain (32768 elements) one such sum per thread chunk.
//! Checked against torch 2.15 for lengths 1 … 100 000 (`tests/fixtures/reference/quant-*.json`).

/// `torch.sum(x)` for a contiguous f32 vector, with `threads` the intra-op thread count PyTorch
/// ran with (it only matters above 32768 elements).
pub fn torch_sum(x: &[f32], threads: usize) -> f32 {
    const GRAIN: usize = 32768;
    if x.len() <= GRAIN || threads <= 1 {
        return inner_sum(x);
    }
    let chunks = threads.min(x.len().div_ceil(GRAIN));
    let chunk = x.len().div_ceil(chunks);
    x.chunks(chunk)
        .fold(0.0f32, |total, part| total + inner_sum(part))
}

/// `torch.mean(x)`: the sum divided by the length, in f32.
pub fn torch_mean(x: &[f32], threads: usize) -> f32 {
    torch_sum(x, threads) / x.len() as f32
}

const LANES: usize = 8;

fn inner_sum(x: &[f32]) -> f32 {
    if x.len() < LANES {
        // Scalar path: four interleaved accumulators over single elements.
        let acc = row_sum::<1>(x.len(), |i| [x[i]]);
        return acc[0];
    }
    let vectors = x.len() / LANES;
    let acc = row_sum::<LANES>(vectors, |i| {
        let mut v = [0.0f32; LANES];
        v.copy_from_slice(&x[i * LANES..(i + 1) * LANES]);
        v
    });
    let mut total = 0.0f32;
    for &tail in &x[vectors * LANES..] {
        total += tail;
    }
    for lane in acc {
        total += lane;
    }
    total
}

fn add<const W: usize>(a: &mut [f32; W], b: &[f32; W]) {
    for (x, y) in a.iter_mut().zip(b) {
        *x += y;
    }
}

/// `row_sum`: the row viewed as `[-1, 4]`, each column summed by [`multi_row_sum`], the leftover
/// elements added to column 0, then the columns added in order.
fn row_sum<const W: usize>(len: usize, load: impl Fn(usize) -> [f32; W]) -> [f32; W] {
    const ILP: usize = 4;
    let rows = len / ILP;
    let mut partial = multi_row_sum::<W, ILP>(rows, |i, k| load(i * ILP + k));
    for i in rows * ILP..len {
        let v = load(i);
        add(&mut partial[0], &v);
    }
    let mut total = partial[0];
    for column in &partial[1..] {
        add(&mut total, column);
    }
    total
}

/// Cascade summation: level 0 accumulates `2^p` rows, then carries into level 1, and so on, so
/// that each addend meets partial sums of similar size.
fn multi_row_sum<const W: usize, const N: usize>(
    rows: usize,
    load: impl Fn(usize, usize) -> [f32; W],
) -> [[f32; W]; N] {
    const LEVELS: usize = 4;
    let ceil_log2 = if rows <= 2 {
        1
    } else {
        (usize::BITS - (rows - 1).leading_zeros()) as usize
    };
    let power = (ceil_log2 / LEVELS).max(4);
    let step = 1usize << power;
    let mask = step - 1;
    let mut acc = [[[0.0f32; W]; N]; LEVELS];
    let mut i = 0usize;
    while i + step <= rows {
        for _ in 0..step {
            for (k, slot) in acc[0].iter_mut().enumerate() {
                add(slot, &load(i, k));
            }
            i += 1;
        }
        for level in 1..LEVELS {
            let (lower, upper) = acc.split_at_mut(level);
            for (hi, lo) in upper[0].iter_mut().zip(lower[level - 1].iter_mut()) {
                add(hi, lo);
                *lo = [0.0; W];
            }
            if i & (mask << (level * power)) != 0 {
                break;
            }
        }
    }
    while i < rows {
        for (k, slot) in acc[0].iter_mut().enumerate() {
            add(slot, &load(i, k));
        }
        i += 1;
    }
    let (first, rest) = acc.split_at_mut(1);
    for upper in rest.iter() {
        for (sum, part) in first[0].iter_mut().zip(upper) {
            add(sum, part);
        }
    }
    acc[0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_for_small_integers() {
        let x: Vec<f32> = (1..=1000).map(|v| v as f32).collect();
        assert_eq!(torch_sum(&x, 2), 500_500.0);
        assert_eq!(torch_mean(&x[..4], 1), 2.5);
        assert_eq!(torch_sum(&[], 1), 0.0);
    }

    #[test]
    fn order_differs_from_a_sequential_sum() {
        // 1 + eight tiny values: sequentially each tiny value is lost against 1.0, in lanes they
        // first add up among themselves.
        let mut x = vec![1.0f32; 8];
        x.extend(vec![3e-8f32; 8 * 7]);
        let sequential: f32 = x.iter().sum();
        assert_eq!(sequential, 8.0);
        assert!(torch_sum(&x, 1) > 8.0);
    }
}
