//! Keeps the rayon pool's workers awake for the length of one CPU forward pass.
//!
//! A decode step runs a few hundred short parallel regions (matmuls, attention), with serial
//! work between them. Between two regions rayon's idle workers yield a few dozen times and
//! then sleep on a futex, so most regions of a small-batch step began by waking a worker: on
//! a 2-vCPU VM `perf` put a quarter of a batch-1 step in `futex_wake` / `futex_wait` and the
//! worker's late start. `with_workers_awake` parks one spinning job on every other worker
//! for the whole pass instead: each spinner steals the pass's jobs as they appear
//! (`rayon::yield_now`) and only returns when the pass is over.
//!
//! Why no deadlock: a spinner that ran on top of a job the pass waits for would hold that job
//! up until the pass ends. The spinners are pushed before the pass starts, so they are the
//! oldest jobs in the owner's deque and thieves (who take the oldest first) get them before
//! any job of the pass; the owner itself may pop a spinner nobody stole (waiting on a join
//! inside the pass, or at the scope's end), and a spinner run by the owner returns at once.
//! With three or more workers a thief can still meet a spinner while inside a pass job (it
//! stole that job from another thief's deque), and a second pass in the same pool can nest in
//! a spinner; so a spinner also returns after `IDLE_MAX` without finding work: what was a
//! wait becomes a short delay, never a hang.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// How long a spinner stays without finding work before it hands its worker back to rayon:
/// longer than the serial gaps between a step's parallel regions (tens of microseconds).
const IDLE_MAX: Duration = Duration::from_millis(2);

/// Idle spins between `sched_yield`s in a spinner: lets the server's I/O threads run on this
/// core when they have work, without giving the core up to a futex sleep.
const SPINS_PER_OS_YIELD: u32 = 64;

/// Passes running under [`with_workers_awake`] now, process-wide.
static PASSES_AWAKE: AtomicUsize = AtomicUsize::new(0);

/// Whether some pass keeps the pool's workers awake now: then a parallel region costs a steal
/// (about a microsecond), not a wake-up, and much smaller work is worth splitting.
pub fn workers_awake() -> bool {
    PASSES_AWAKE.load(Ordering::Relaxed) > 0
}

/// Runs `f` on a worker of the current rayon pool with every other worker of the pool
/// spinning (and stealing `f`'s parallel jobs) until `f` returns. Called from outside the
/// pool, the caller blocks until `f` is done, as with `rayon::scope`.
pub fn with_workers_awake<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    let others = rayon::current_num_threads().saturating_sub(1);
    let done = AtomicBool::new(false);
    PASSES_AWAKE.fetch_add(1, Ordering::Relaxed);
    let _awake = DecrementOnDrop(&PASSES_AWAKE);
    rayon::scope(|s| {
        let owner = rayon::current_thread_index();
        for _ in 0..others {
            let done = &done;
            s.spawn(move |_| spin_until(done, owner));
        }
        // Set even if `f` unwinds, so that the spinners return and the scope can rethrow.
        let _done = SetOnDrop(&done);
        f()
    })
}

fn spin_until(done: &AtomicBool, owner: Option<usize>) {
    if rayon::current_thread_index() == owner {
        return;
    }
    let mut idle = 0u32;
    let mut idle_since = Instant::now();
    while !done.load(Ordering::Acquire) {
        match rayon::yield_now() {
            Some(rayon::Yield::Executed) => idle = 0,
            Some(rayon::Yield::Idle) => {
                if idle == 0 {
                    idle_since = Instant::now();
                }
                idle += 1;
                if idle.is_multiple_of(SPINS_PER_OS_YIELD) {
                    if idle_since.elapsed() > IDLE_MAX {
                        return;
                    }
                    std::thread::yield_now();
                } else {
                    std::hint::spin_loop();
                }
            }
            // Not on a pool thread: cannot happen inside `rayon::scope`, but never spin.
            None => return,
        }
    }
}

/// Sets the flag when dropped (the pass is over, however it ended).
struct SetOnDrop<'a>(&'a AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// Counts a pass out of `PASSES_AWAKE` when dropped.
struct DecrementOnDrop<'a>(&'a AtomicUsize);

impl Drop for DecrementOnDrop<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;

    #[test]
    fn nested_parallel_work_completes_on_every_pool_size() {
        for threads in [1, 2, 3, 4] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("pool");
            for _ in 0..50 {
                let sum: u64 = pool.install(|| {
                    with_workers_awake(|| {
                        (0..64u64)
                            .into_par_iter()
                            .map(|i| (0..i).into_par_iter().sum::<u64>())
                            .sum()
                    })
                });
                assert_eq!(
                    sum,
                    (0..64u64).map(|i| i * i.saturating_sub(1) / 2).sum::<u64>()
                );
            }
        }
    }

    #[test]
    fn inside_a_pass_the_workers_count_as_awake() {
        // Only the positive side: other tests may run a pass concurrently in this process.
        assert!(with_workers_awake(workers_awake));
    }

    #[test]
    fn called_from_outside_the_pool_it_runs_on_a_worker() {
        let on_worker = with_workers_awake(|| rayon::current_thread_index().is_some());
        assert!(on_worker);
    }

    #[test]
    fn a_panic_in_the_pass_reaches_the_caller_and_frees_the_workers() {
        let caught = std::panic::catch_unwind(|| with_workers_awake(|| panic!("pass failed")));
        assert!(caught.is_err());
        // The pool still works afterwards: no spinner was left behind.
        assert_eq!(
            with_workers_awake(|| (0..100u32).into_par_iter().sum::<u32>()),
            4950
        );
    }
}
