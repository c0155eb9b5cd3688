//! How `candela roofline` and `examples/matmul_rows` time a packed matmul, in one place so the
//! two measure the same way: deterministic inputs, and calls made with the pool's workers kept
//! awake (`team::with_workers_awake`), as the engine makes them inside a forward pass. With
//! the workers asleep between calls, a woken worker often arrived after the caller had done
//! the call's second chunk, and two threads measured 1.4x one.

use std::time::Instant;

/// `len` deterministic values in [-1, 1) (`stride` varies the sequence): a matmul's rate does
/// not depend on them.
pub fn test_values(len: usize, stride: usize) -> Vec<f32> {
    (0..len)
        .map(|i| ((i * stride % 2000) as f32 / 1000.0) - 1.0)
        .collect()
}

/// Best seconds per call of `call` over `rounds` rounds of `calls` calls each, every round run
/// on the current rayon pool with its workers awake.
pub fn best_seconds_per_call<E: Send>(
    rounds: usize,
    calls: usize,
    mut call: impl FnMut() -> Result<(), E> + Send,
) -> Result<f64, E> {
    let calls = calls.max(1);
    let mut best = f64::INFINITY;
    for _ in 0..rounds.max(1) {
        let elapsed = crate::team::with_workers_awake(|| {
            let start = Instant::now();
            for _ in 0..calls {
                call()?;
            }
            Ok(start.elapsed())
        })?;
        best = best.min(elapsed.as_secs_f64() / calls as f64);
    }
    Ok(best)
}
