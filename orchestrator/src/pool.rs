//! A function's instances: which are idle, how many run, and who waits for one.
//!
//! `acquire` hands out the most recently used idle instance (the warmest) or, while fewer
//! than `max_instances` run, a slot to cold-start a new one; otherwise the caller waits in
//! a bounded queue. Every slot handed out is given back exactly once, with `slot_ended`
//! when its instance is gone (or was never made).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PoolError {
    #[error(
        "{waiting} requests already wait for an instance (at most {limit} may): try again later"
    )]
    QueueFull { waiting: usize, limit: usize },
    #[error("the function was removed")]
    Closed,
}

/// What `acquire` gives.
#[derive(Debug, PartialEq, Eq)]
pub enum Lease<I> {
    /// An idle instance, now the caller's until `release` or `slot_ended`.
    Warm(I),
    /// Permission to cold-start one instance.
    Cold,
}

struct State<I> {
    /// Idle instances with the time each became idle, most recent last.
    idle: Vec<(I, Instant)>,
    /// Instances running or being started (idle ones included).
    running: u32,
    waiting: usize,
    closed: bool,
}

pub struct Pool<I> {
    state: Mutex<State<I>>,
    changed: Notify,
    max_instances: u32,
    queue_limit: usize,
}

/// Counts a waiter out when its wait ends, however it ends (a client that goes away drops
/// the future mid-wait).
struct Waiting<'a, I>(&'a Pool<I>);

impl<I> Drop for Waiting<'_, I> {
    fn drop(&mut self) {
        self.0.lock().waiting -= 1;
    }
}

impl<I> Pool<I> {
    pub fn new(max_instances: u32, queue_limit: usize) -> Self {
        Self {
            state: Mutex::new(State {
                idle: Vec::new(),
                running: 0,
                waiting: 0,
                closed: false,
            }),
            changed: Notify::new(),
            max_instances,
            queue_limit,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State<I>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub async fn acquire(&self) -> Result<Lease<I>, PoolError> {
        let mut waiting: Option<Waiting<'_, I>> = None;
        loop {
            // Registered before the state is read, so a change made after the read wakes us.
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut state = self.lock();
                if state.closed {
                    return Err(PoolError::Closed);
                }
                if let Some((instance, _)) = state.idle.pop() {
                    return Ok(Lease::Warm(instance));
                }
                if state.running < self.max_instances {
                    state.running += 1;
                    return Ok(Lease::Cold);
                }
                if waiting.is_none() {
                    if state.waiting >= self.queue_limit {
                        return Err(PoolError::QueueFull {
                            waiting: state.waiting,
                            limit: self.queue_limit,
                        });
                    }
                    state.waiting += 1;
                    drop(state);
                    waiting = Some(Waiting(self));
                }
            }
            notified.await;
        }
    }

    /// Gives an instance back as idle.
    pub fn release(&self, instance: I) {
        self.lock().idle.push((instance, Instant::now()));
        self.changed.notify_waiters();
    }

    /// An instance (or a cold start that made none) is gone: its slot is free.
    pub fn slot_ended(&self) {
        let mut state = self.lock();
        state.running = state.running.saturating_sub(1);
        drop(state);
        self.changed.notify_waiters();
    }

    /// Takes the idle instance `matches` picks out of the idle list, if it is there.
    pub fn take_idle(&self, matches: impl Fn(&I) -> bool) -> Option<I> {
        let mut state = self.lock();
        let at = state.idle.iter().position(|(i, _)| matches(i))?;
        Some(state.idle.remove(at).0)
    }

    /// Takes the instances idle for `keep_alive` or more (all of them with zero).
    pub fn take_idle_for(&self, keep_alive: Duration) -> Vec<I> {
        let mut state = self.lock();
        let (expired, kept) = std::mem::take(&mut state.idle)
            .into_iter()
            .partition(|(_, since)| since.elapsed() >= keep_alive);
        state.idle = kept;
        expired.into_iter().map(|(i, _)| i).collect()
    }

    /// No more leases; waiters get `Closed`. Returns the idle instances.
    pub fn close(&self) -> Vec<I> {
        let mut state = self.lock();
        state.closed = true;
        let idle = std::mem::take(&mut state.idle);
        drop(state);
        self.changed.notify_waiters();
        idle.into_iter().map(|(i, _)| i).collect()
    }

    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// (running, idle, waiting) now.
    pub fn counts(&self) -> (u32, usize, usize) {
        let state = self.lock();
        (state.running, state.idle.len(), state.waiting)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[tokio::test]
    async fn warm_instances_first_then_cold_slots_up_to_the_limit() {
        let pool = Pool::new(2, 4);
        assert_eq!(pool.acquire().await, Ok(Lease::Cold));
        pool.release("a");
        assert_eq!(pool.acquire().await, Ok(Lease::Warm("a")));
        assert_eq!(pool.acquire().await, Ok(Lease::Cold));
        assert_eq!(pool.counts(), (2, 0, 0));
        pool.release("a");
        pool.release("b");
        // The most recently used comes first.
        assert_eq!(pool.acquire().await, Ok(Lease::Warm("b")));
    }

    #[tokio::test]
    async fn a_full_pool_queues_then_refuses() {
        let pool = Arc::new(Pool::new(2, 2));
        assert_eq!(pool.acquire().await, Ok(Lease::Cold));
        assert_eq!(pool.acquire().await, Ok(Lease::Cold));
        let w1 = tokio::spawn({
            let pool = pool.clone();
            async move { pool.acquire().await }
        });
        let w2 = tokio::spawn({
            let pool = pool.clone();
            async move { pool.acquire().await }
        });
        while pool.counts().2 < 2 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            pool.acquire().await,
            Err(PoolError::QueueFull {
                waiting: 2,
                limit: 2
            })
        );
        // Of the two instances, one is released and the other ends: one waiter gets the
        // first warm, the other may cold-start in the freed slot.
        pool.release("a");
        pool.slot_ended();
        let mut got = vec![w1.await.unwrap().unwrap(), w2.await.unwrap().unwrap()];
        got.sort_by_key(|l| matches!(l, Lease::Cold));
        assert_eq!(got, vec![Lease::Warm("a"), Lease::Cold]);
        assert_eq!(pool.counts(), (2, 0, 0));
    }

    #[tokio::test]
    async fn a_waiter_that_goes_away_leaves_the_queue() {
        let pool = Pool::<&str>::new(1, 1);
        assert_eq!(pool.acquire().await, Ok(Lease::Cold));
        let gave_up = tokio::time::timeout(Duration::from_millis(20), pool.acquire()).await;
        assert!(gave_up.is_err());
        assert_eq!(pool.counts().2, 0, "the queue has room again");
        pool.slot_ended();
        assert_eq!(pool.acquire().await, Ok(Lease::Cold));
    }

    #[tokio::test]
    async fn closing_wakes_waiters_and_returns_idle_instances() {
        let pool = Arc::new(Pool::new(1, 4));
        assert_eq!(pool.acquire().await, Ok(Lease::Cold));
        let waiter = tokio::spawn({
            let pool = pool.clone();
            async move { pool.acquire().await }
        });
        while pool.counts().2 < 1 {
            tokio::task::yield_now().await;
        }
        pool.release("a");
        // The waiter may take "a" before the close; either way nothing is lost.
        let idle = pool.close();
        match waiter.await.unwrap() {
            Ok(Lease::Warm("a")) => assert!(idle.is_empty()),
            Err(PoolError::Closed) => assert_eq!(idle, vec!["a"]),
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(pool.acquire().await, Err(PoolError::Closed));
    }

    #[test]
    fn idle_instances_expire_after_keep_alive() {
        let pool = Pool::new(3, 0);
        pool.release("old");
        std::thread::sleep(Duration::from_millis(30));
        pool.release("new");
        assert_eq!(pool.take_idle_for(Duration::from_millis(25)), vec!["old"]);
        assert_eq!(pool.take_idle(|i| *i == "new"), Some("new"));
        assert_eq!(pool.take_idle(|i| *i == "new"), None);
        pool.release("x");
        assert_eq!(pool.take_idle_for(Duration::ZERO), vec!["x"]);
    }
}
