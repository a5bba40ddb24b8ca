//! A lock that small updates never wait for (flat combining), for backends.
//!
//! A subscription keeps its bookkeeping behind one lock that the fetching
//! side, the stream and every ack take. Acks come from lanes on several
//! cores; if each waited for the lock, they would queue up on it (seen in
//! the benchmark as throughput halving from one run to the next). Here an
//! update that finds the lock taken is left for the holder, who applies it
//! before letting go: every update takes effect before the lock is next
//! free, and no updater blocks.
//!
//! ```
//! use broker_core::combining::{Apply, Combining};
//!
//! #[derive(Default)]
//! struct Finished(Vec<u64>);
//! impl Apply<u64> for Finished {
//!     fn apply(&mut self, updates: std::vec::Drain<'_, u64>) {
//!         self.0.extend(updates);
//!     }
//! }
//!
//! let state = Combining::new(Finished::default());
//! state.update(7); // the lock is free: applied at once
//! let held = state.lock();
//! assert_eq!(held.0, vec![7]);
//! ```

use std::sync::{Mutex, MutexGuard, TryLockError};

/// State that applies updates to itself.
pub trait Apply<U> {
    /// Applies `updates`, in the order they were made (a drain of a buffer
    /// that is used again: no allocation per update).
    fn apply(&mut self, updates: std::vec::Drain<'_, U>);
}

/// A mutex around `S` plus the updates left for its holder.
#[derive(Debug, Default)]
pub struct Combining<S, U> {
    /// The state, and the buffer the holder applies updates from (swapped
    /// with `left`, so neither is allocated again per update).
    state: Mutex<(S, Vec<U>)>,
    left: Mutex<Vec<U>>,
}

impl<S: Apply<U>, U> Combining<S, U> {
    /// Wraps `state`.
    pub fn new(state: S) -> Self {
        Combining {
            state: Mutex::new((state, Vec::new())),
            left: Mutex::new(Vec::new()),
        }
    }

    /// Locks the state, with every update made so far applied.
    pub fn lock(&self) -> Guard<'_, S, U> {
        let mut state = unpoisoned(self.state.lock());
        self.apply_left(&mut state);
        Guard {
            owner: self,
            state: Some(state),
        }
    }

    /// Applies `update` now if the state is free, else leaves it for the
    /// holder (who applies it before letting go).
    pub fn update(&self, update: U) {
        unpoisoned(self.left.lock()).push(update);
        self.flush();
    }

    /// Applies the updates left, unless another thread holds the state:
    /// that one applies them when it lets go.
    fn flush(&self) {
        while !unpoisoned(self.left.lock()).is_empty() {
            let mut state = match self.state.try_lock() {
                Ok(state) => state,
                Err(TryLockError::Poisoned(e)) => e.into_inner(),
                Err(TryLockError::WouldBlock) => return,
            };
            self.apply_left(&mut state);
        }
    }

    fn apply_left(&self, state: &mut (S, Vec<U>)) {
        let (state, updates) = state;
        std::mem::swap(&mut *unpoisoned(self.left.lock()), updates);
        if !updates.is_empty() {
            state.apply(updates.drain(..));
        }
    }
}

// A panic while holding a lock leaves plain collections behind; carrying
// on is safer than failing every later update.
fn unpoisoned<G>(result: std::sync::LockResult<G>) -> G {
    result.unwrap_or_else(|e| e.into_inner())
}

/// The locked state; on drop, the updates left meanwhile are applied.
pub struct Guard<'a, S: Apply<U>, U> {
    owner: &'a Combining<S, U>,
    state: Option<MutexGuard<'a, (S, Vec<U>)>>,
}

impl<S: Apply<U>, U> std::ops::Deref for Guard<'_, S, U> {
    type Target = S;
    fn deref(&self) -> &S {
        &self.state.as_ref().expect("held until drop").0
    }
}

impl<S: Apply<U>, U> std::ops::DerefMut for Guard<'_, S, U> {
    fn deref_mut(&mut self) -> &mut S {
        &mut self.state.as_mut().expect("held until drop").0
    }
}

impl<S: Apply<U>, U> Drop for Guard<'_, S, U> {
    fn drop(&mut self) {
        if let Some(mut state) = self.state.take() {
            self.owner.apply_left(&mut state);
        }
        // Those left between the last look and the unlock.
        self.owner.flush();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[derive(Default)]
    struct Sum(u64);
    impl Apply<u64> for Sum {
        fn apply(&mut self, updates: std::vec::Drain<'_, u64>) {
            self.0 += updates.sum::<u64>();
        }
    }

    #[test]
    fn an_update_made_while_locked_is_applied_when_the_holder_lets_go() {
        let state = Arc::new(Combining::new(Sum(0)));
        let held = state.lock();
        let other = state.clone();
        std::thread::spawn(move || other.update(5)).join().unwrap();
        assert_eq!(held.0, 0, "left for the holder, not applied under it");
        drop(held);
        assert_eq!(state.lock().0, 5);
    }

    #[test]
    fn no_update_is_lost_under_contention() {
        let state = Arc::new(Combining::new(Sum(0)));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let state = state.clone();
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        state.update(1);
                    }
                })
            })
            .collect();
        for _ in 0..1_000 {
            let _held = state.lock();
        }
        for t in threads {
            t.join().unwrap();
        }
        // Every updater finished: nothing may be waiting for a later lock.
        assert_eq!(unpoisoned(state.state.lock()).0 .0, 40_000);
    }
}
