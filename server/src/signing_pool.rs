//! A fixed pool of signing threads, one per core, fed in arrival order.
//!
//! CSR verification and certificate signing are CPU work. Running them on
//! the async workers would stall every other connection; a thread per batch
//! would put more threads than cores on the CPU at once, so that concurrent
//! batches all finish late together. The pool runs at most one job per
//! core and takes jobs first come, first served: a batch that arrived first
//! is answered first, and the async workers stay free for I/O.

use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, mpsc};

type Job = Box<dyn FnOnce() + Send + 'static>;

/// Why a job did not run to completion.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum PoolError {
    /// The job panicked (the pool's thread survives it).
    #[error("signing job panicked")]
    Panicked,
    /// The pool has no threads left (shutting down).
    #[error("signing pool stopped")]
    Stopped,
}

/// Handle to the pool; cheap to clone.
#[derive(Clone)]
pub struct SigningPool {
    tx: mpsc::Sender<Job>,
    threads: usize,
}

impl std::fmt::Debug for SigningPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningPool")
            .field("threads", &self.threads)
            .finish()
    }
}

impl SigningPool {
    /// One thread per core.
    pub fn per_core() -> Self {
        Self::new(std::thread::available_parallelism().map_or(1, std::num::NonZero::get))
    }

    /// A pool of `threads` threads (at least one).
    pub fn new(threads: usize) -> Self {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let mut started = 0;
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("meshid-sign-{i}"))
                .spawn(move || {
                    loop {
                        // One thread waits on the queue at a time; the lock
                        // is released before the job runs.
                        let next = match rx.lock() {
                            Ok(q) => q.recv(),
                            Err(_) => return,
                        };
                        match next {
                            Ok(job) => job(),
                            Err(_) => return,
                        }
                    }
                });
            match spawned {
                Ok(_) => started += 1,
                Err(e) => tracing::error!(error = %e, "could not start a signing thread"),
            }
        }
        Self {
            tx,
            threads: started,
        }
    }

    /// Threads running.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Queues `f` and waits for its result. Jobs start in the order they
    /// were queued.
    pub async fn run<T, F>(&self, f: F) -> Result<T, PoolError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        self.submit(f)?.await
    }

    /// Queues `f` now; the returned future waits for its result. Queue
    /// several jobs before awaiting any of them to run them in parallel.
    pub fn submit<T, F>(
        &self,
        f: F,
    ) -> Result<impl Future<Output = Result<T, PoolError>> + use<T, F>, PoolError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        if self.threads == 0 {
            return Err(PoolError::Stopped);
        }
        let (done, wait) = tokio::sync::oneshot::channel();
        self.tx
            .send(Box::new(move || {
                let r =
                    std::panic::catch_unwind(AssertUnwindSafe(f)).map_err(|_| PoolError::Panicked);
                let _ = done.send(r);
            }))
            .map_err(|_| PoolError::Stopped)?;
        Ok(async move { wait.await.map_err(|_| PoolError::Stopped)? })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two jobs that each wait for the other: they finish only if two
    /// threads run them at once.
    async fn two_at_once(pool: &SigningPool) -> Vec<i32> {
        let barrier = Arc::new(std::sync::Barrier::new(2));
        let jobs: Vec<_> = (0..2)
            .map(|i| {
                let b = barrier.clone();
                pool.submit(move || {
                    b.wait();
                    i
                })
                .expect("queued")
            })
            .collect();
        let mut got = Vec::new();
        for j in jobs {
            let r = tokio::time::timeout(std::time::Duration::from_secs(10), j)
                .await
                .expect("both threads ran at once");
            got.push(r.expect("ran"));
        }
        got
    }

    #[tokio::test]
    async fn jobs_run_in_parallel_in_order_and_survive_a_panic() {
        let pool = SigningPool::new(2);
        assert_eq!(pool.threads(), 2);
        assert_eq!(two_at_once(&pool).await, vec![0, 1]);
        let panicked = pool.run(|| -> u8 { panic!("boom") }).await;
        assert!(matches!(panicked, Err(PoolError::Panicked)), "{panicked:?}");
        // Both threads are still there.
        assert_eq!(two_at_once(&pool).await, vec![0, 1]);
    }
}
