//! How many threads the simulator's heavy loops may use: the large products ([`crate::matmul`],
//! [`crate::sparse`]) and the drawing of a chunk's directions ([`crate::direction_cache`]).
//!
//! Work is cut into parts by its shape alone, never by the thread count, and each part is
//! computed as it would be alone; the count only decides how many parts run at once. So results
//! are bit-identical whatever the count: it is a speed setting only.

use std::sync::atomic::{AtomicUsize, Ordering};

/// 0: not set, see [`threads`].
static THREADS: AtomicUsize = AtomicUsize::new(0);

/// Sets the thread count (at least 1) for every layer in this process.
pub fn set_threads(n: usize) {
    THREADS.store(n.max(1), Ordering::Relaxed);
}

/// The thread count: as set by [`set_threads`], else `PNN_THREADS` from the environment, else
/// the machine's logical cores.
pub fn threads() -> usize {
    match THREADS.load(Ordering::Relaxed) {
        0 => {
            let n = std::env::var("PNN_THREADS")
                .ok()
                .and_then(|s| s.parse::<usize>().ok())
                .filter(|&n| n > 0)
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
            THREADS.store(n, Ordering::Relaxed);
            n
        }
        n => n,
    }
}

/// Runs `work(part)` for every part in `0..parts`, on up to [`threads`] threads (this one and
/// workers of a pool kept for the process, each taking every `threads`-th part), and returns
/// when all are done.
pub(crate) fn for_each_part(parts: usize, work: impl Fn(usize) + Sync) {
    let threads = threads().min(parts);
    if threads <= 1 {
        (0..parts).for_each(work);
        return;
    }
    let work = &work;
    // A pool of waiting workers: starting a thread per call costs ~90 us here, waking a
    // worker ~15 us (both measured), against products of a few hundred.
    pool().in_place_scope(|scope| {
        for t in 1..threads {
            scope.spawn(move |_| (t..parts).step_by(threads).for_each(work));
        }
        (0..parts).step_by(threads).for_each(work);
    });
}

/// Runs `work(i)` for every `i` in `0..count`: with `split`, each on its own part (see
/// [`for_each_part`]), else all in order on this thread. Callers split by the work's size alone.
pub(crate) fn for_each(count: usize, split: bool, work: impl Fn(usize) + Sync) {
    if split {
        for_each_part(count, work);
    } else {
        (0..count).for_each(work);
    }
}

/// Runs `task` on a worker, returning at once (for work whose result is collected later).
pub(crate) fn spawn(task: impl FnOnce() + Send + 'static) {
    pool().spawn(task);
}

/// The workers beside the calling thread: one fewer than the machine's logical cores.
fn pool() -> &'static rayon::ThreadPool {
    static POOL: std::sync::OnceLock<rayon::ThreadPool> = std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        rayon::ThreadPoolBuilder::new()
            .num_threads(cores.max(2) - 1)
            .thread_name(|i| format!("pnn-sim-{i}"))
            .build()
            .expect("a thread pool starts")
    })
}

/// The operations (2 per multiply-add) from which a product is cut into parts that can run on
/// threads: ~0.4 ms of work at ~80 GFLOP/s. Waking a waiting worker and waiting for it costs
/// tens of microseconds here (a virtual machine's idle core is woken through the hypervisor), and
/// smaller products (MNIST's) ran slower on two threads than on one. The cut depends on this
/// size alone, never on the thread count, so that the bits do not.
pub(crate) const WORTH_A_THREAD: usize = 1 << 25;

/// A pointer that may cross to the threads of [`for_each_part`], for parts that write
/// disjoint places of one buffer (each use says why they are disjoint).
#[derive(Clone, Copy)]
pub(crate) struct SharedMut<T>(pub *mut T);

impl<T> SharedMut<T> {
    /// The pointer (a method, so that closures capture the whole `SharedMut`, which may cross
    /// threads, rather than its field, which may not).
    pub(crate) fn ptr(self) -> *mut T {
        self.0
    }
}

// SAFETY: only used for writes to disjoint elements, one part each, while the buffer is
// borrowed mutably by the caller of `for_each_part`, which outlives every part.
unsafe impl<T: Send> Send for SharedMut<T> {}
unsafe impl<T: Send> Sync for SharedMut<T> {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn every_part_runs_once() {
        for parts in [0, 1, 2, 5] {
            let seen = Mutex::new(Vec::new());
            for_each_part(parts, |p| seen.lock().unwrap().push(p));
            let mut seen = seen.into_inner().unwrap();
            seen.sort();
            assert_eq!(seen, (0..parts).collect::<Vec<_>>());
        }
    }
}
