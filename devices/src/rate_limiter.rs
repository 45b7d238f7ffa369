//! Firecracker's rate limiter: two token buckets (bytes and operations), each with a size,
//! an optional one-time burst and the time it takes to refill from empty. A device asks
//! before each request; when a bucket is short, the request waits in its queue and a timer
//! wakes the device to try again. The configuration (`rate_limiter` of drives, network
//! interfaces and the entropy device), the semantics and the snapshot state follow
//! Firecracker's: a bucket of size 0 or refill time 0 does not limit; a request larger than
//! a bucket is let through once and the bucket blocks for as long as that took to earn.

use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vmm_sys_util::timerfd::TimerFd;

/// How long a device waits before it asks a short bucket again (Firecracker's figure).
const REFILL_RETRY: Duration = Duration::from_millis(100);
/// The longest a device is held back after one request larger than its bucket: however
/// many bucket-fulls a guest's request claims, the device serves again within this.
const MAX_OVERDRAWN_WAIT: Duration = Duration::from_secs(3600);

/// A monotonic timerfd whose reads never block: the event loop that reads it also serves the
/// API, and a timer cleared after epoll reported it must not stop the loop.
pub(crate) fn nonblocking_timer() -> std::io::Result<TimerFd> {
    // SAFETY: timerfd_create takes no pointers; the result is checked.
    let fd = unsafe {
        libc::timerfd_create(
            libc::CLOCK_MONOTONIC,
            libc::TFD_CLOEXEC | libc::TFD_NONBLOCK,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a timerfd just created and owned by nothing else.
    Ok(unsafe { TimerFd::from_raw_fd(fd) })
}

#[derive(Debug, thiserror::Error)]
pub enum RateLimiterError {
    #[error("cannot create the rate limiter's timer: {0}")]
    Timer(std::io::Error),
}

/// One bucket as the API gives it: `size` tokens, refilled from empty in `refill_time`
/// milliseconds, plus `one_time_burst` tokens spent first and never refilled.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenBucketConfig {
    pub size: u64,
    #[serde(default)]
    pub one_time_burst: Option<u64>,
    pub refill_time: u64,
}

/// `rate_limiter` as the API gives it: either bucket may be absent (or null).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimiterConfig {
    #[serde(default)]
    pub bandwidth: Option<TokenBucketConfig>,
    #[serde(default)]
    pub ops: Option<TokenBucketConfig>,
}

impl RateLimiterConfig {
    /// This configuration after a `PATCH` of `update`: the buckets given replace these,
    /// the others stay (as [`RateLimiter::update`] does to a running limiter).
    pub fn patched(self, update: RateLimiterConfig) -> Self {
        Self {
            bandwidth: update.bandwidth.or(self.bandwidth),
            ops: update.ops.or(self.ops),
        }
    }

    /// Whether either bucket limits anything.
    pub fn limits(&self) -> bool {
        [self.bandwidth, self.ops]
            .iter()
            .flatten()
            .any(|b| b.size > 0 && b.refill_time > 0)
    }
}

/// What asking a bucket for tokens came to.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Reduction {
    Granted,
    /// Not enough tokens: ask again later.
    Short,
    /// More than the bucket holds: granted, and the bucket earns nothing for this long (it
    /// pays the debt off first).
    Overdrawn(Duration),
}

/// A token bucket refilled continuously at `size` tokens per `refill_time`.
#[derive(Debug, Clone)]
struct TokenBucket {
    size: u64,
    one_time_burst: u64,
    /// The burst as configured (a snapshot keeps what is left in `one_time_burst`).
    initial_burst: Option<u64>,
    refill_time_ms: u64,
    budget: u64,
    last_refill: Instant,
}

impl TokenBucket {
    /// None when the bucket would not limit (size or refill time 0).
    fn new(config: TokenBucketConfig) -> Option<Self> {
        if config.size == 0 || config.refill_time == 0 {
            return None;
        }
        Some(Self {
            size: config.size,
            one_time_burst: config.one_time_burst.unwrap_or(0),
            initial_burst: config.one_time_burst,
            refill_time_ms: config.refill_time,
            budget: config.size,
            last_refill: Instant::now(),
        })
    }

    fn config(&self) -> TokenBucketConfig {
        TokenBucketConfig {
            size: self.size,
            one_time_burst: self.initial_burst,
            refill_time: self.refill_time_ms,
        }
    }

    /// Adds the tokens earned since the last refill, up to the size. Only whole tokens are
    /// added and the time they took is accounted for, so no fraction is lost by asking often.
    fn refill(&mut self) {
        let now = Instant::now();
        // Zero while a debt is paid off (`last_refill` then lies ahead).
        let elapsed_ns = now.saturating_duration_since(self.last_refill).as_nanos();
        if elapsed_ns == 0 {
            return;
        }
        let refill_ns = u128::from(self.refill_time_ms) * 1_000_000;
        // u64 sizes and nanoseconds: this product fits in u128.
        let earned = elapsed_ns.saturating_mul(u128::from(self.size)) / refill_ns;
        if earned == 0 {
            return;
        }
        if self.budget as u128 + earned >= u128::from(self.size) {
            self.budget = self.size;
            self.last_refill = now;
        } else {
            self.budget += earned as u64;
            // The time those whole tokens took; the rest carries over.
            let used_ns = earned
                .checked_mul(refill_ns)
                .map(|n| n / u128::from(self.size));
            match used_ns.and_then(|n| u64::try_from(n).ok()) {
                Some(n) => self.last_refill += Duration::from_nanos(n),
                None => self.last_refill = now,
            }
        }
    }

    fn reduce(&mut self, mut tokens: u64) -> Reduction {
        if self.one_time_burst > 0 {
            if self.one_time_burst >= tokens {
                self.one_time_burst -= tokens;
                // The burst's tokens come on top: the bucket keeps filling meanwhile.
                self.refill();
                return Reduction::Granted;
            }
            tokens -= self.one_time_burst;
            self.one_time_burst = 0;
        }
        self.refill();
        if tokens > self.size {
            // It could never fit: let it through, and the bucket earns nothing until the
            // time the rest would take has passed. (Refilling meanwhile too would let a
            // stream of large requests through faster than the rate.)
            let owed = u128::from(tokens - self.budget);
            self.budget = 0;
            let refill_ns = u128::from(self.refill_time_ms) * 1_000_000;
            let debt_ns = owed.saturating_mul(refill_ns) / u128::from(self.size);
            let debt = u64::try_from(debt_ns)
                .map(Duration::from_nanos)
                .unwrap_or(MAX_OVERDRAWN_WAIT)
                .clamp(Duration::from_millis(1), MAX_OVERDRAWN_WAIT);
            self.last_refill = Instant::now() + debt;
            return Reduction::Overdrawn(debt);
        }
        if tokens > self.budget {
            return Reduction::Short;
        }
        self.budget -= tokens;
        Reduction::Granted
    }

    /// Gives back tokens taken for a request that then did not go ahead.
    fn give_back(&mut self, tokens: u64) {
        self.budget = (self.budget + tokens).min(self.size);
    }
}

/// Which bucket a request draws on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenType {
    Bytes,
    Ops,
}

/// A bucket's state in a snapshot: its configuration and what it held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenBucketState {
    pub config: TokenBucketConfig,
    pub budget: u64,
    pub one_time_burst_left: u64,
}

/// A rate limiter's state in a snapshot (Firecracker keeps its limiters' buckets too).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateLimiterState {
    pub bandwidth: Option<TokenBucketState>,
    pub ops: Option<TokenBucketState>,
}

/// A device's rate limiter; without buckets it grants everything and never arms its timer.
pub struct RateLimiter {
    bandwidth: Option<TokenBucket>,
    ops: Option<TokenBucket>,
    timer: TimerFd,
    /// The timer runs: every request waits for it.
    blocked: bool,
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter")
            .field("bandwidth", &self.bandwidth)
            .field("ops", &self.ops)
            .field("blocked", &self.blocked)
            .finish()
    }
}

impl RateLimiter {
    pub fn new(config: RateLimiterConfig) -> Result<Self, RateLimiterError> {
        Ok(Self {
            bandwidth: config.bandwidth.and_then(TokenBucket::new),
            ops: config.ops.and_then(TokenBucket::new),
            timer: nonblocking_timer().map_err(RateLimiterError::Timer)?,
            blocked: false,
        })
    }

    /// A limiter that limits nothing.
    pub fn unlimited() -> Result<Self, RateLimiterError> {
        Self::new(RateLimiterConfig::default())
    }

    pub fn config(&self) -> RateLimiterConfig {
        RateLimiterConfig {
            bandwidth: self.bandwidth.as_ref().map(TokenBucket::config),
            ops: self.ops.as_ref().map(TokenBucket::config),
        }
    }

    pub fn is_unlimited(&self) -> bool {
        self.bandwidth.is_none() && self.ops.is_none()
    }

    /// The timer the device's event loop watches: readable when a blocked limiter may grant
    /// again (call [`RateLimiter::on_timer`] then).
    pub fn timer_fd(&self) -> RawFd {
        self.timer.as_raw_fd()
    }

    /// Takes `tokens` from the bucket of `kind`; false: the request must wait for the timer.
    pub fn consume(&mut self, tokens: u64, kind: TokenType) -> bool {
        if self.blocked {
            return false;
        }
        let bucket = match kind {
            TokenType::Bytes => self.bandwidth.as_mut(),
            TokenType::Ops => self.ops.as_mut(),
        };
        let Some(bucket) = bucket else {
            return true;
        };
        match bucket.reduce(tokens) {
            Reduction::Granted => true,
            // Without a timer nothing would wake the device: then it is not held back.
            Reduction::Short => !self.block_for(REFILL_RETRY),
            Reduction::Overdrawn(debt) => {
                self.block_for(debt);
                true
            }
        }
    }

    /// Takes a request's bytes and its one operation, or neither.
    pub fn consume_request(&mut self, bytes: u64) -> bool {
        if !self.consume(1, TokenType::Ops) {
            return false;
        }
        if bytes > 0 && !self.consume(bytes, TokenType::Bytes) {
            if let Some(ops) = &mut self.ops {
                ops.give_back(1);
            }
            return false;
        }
        true
    }

    /// Gives back what [`Self::consume_request`] took for a request that turned out not to
    /// count (a frame for MMDS, as Firecracker does not count them).
    pub fn give_back_request(&mut self, bytes: u64) {
        if let Some(ops) = &mut self.ops {
            ops.give_back(1);
        }
        if let Some(bandwidth) = &mut self.bandwidth {
            bandwidth.give_back(bytes);
        }
    }

    /// Holds every request back for `wait`; false if the timer cannot be armed.
    fn block_for(&mut self, wait: Duration) -> bool {
        if let Err(e) = self.timer.reset(wait, None) {
            log::error!("rate limiter: cannot arm the timer ({e}); not limiting this time");
            return false;
        }
        self.blocked = true;
        true
    }

    /// The timer's event fired: requests may be tried again. (A timer cleared since epoll
    /// reported it reads nothing, and changes nothing.)
    pub fn on_timer(&mut self) {
        match self.timer.wait() {
            Ok(_) => self.blocked = false,
            Err(e) if e.errno() == libc::EAGAIN => {}
            Err(e) => {
                log::error!("rate limiter: cannot read the timer ({e}); not holding back");
                self.blocked = false;
            }
        }
    }

    /// `PATCH`: the buckets given replace the current ones (a bucket of size 0 removes its
    /// limit); those not given stay as they are. A device held back is let go: the new
    /// buckets decide its next request at once.
    pub fn update(&mut self, config: RateLimiterConfig) {
        if config.bandwidth.is_none() && config.ops.is_none() {
            return;
        }
        if let Some(b) = config.bandwidth {
            self.bandwidth = TokenBucket::new(b);
        }
        if let Some(o) = config.ops {
            self.ops = TokenBucket::new(o);
        }
        if self.blocked {
            let _ = self.timer.clear();
            self.blocked = false;
        }
    }

    pub fn save(&self) -> RateLimiterState {
        let state = |b: &TokenBucket| TokenBucketState {
            config: b.config(),
            budget: b.budget,
            one_time_burst_left: b.one_time_burst,
        };
        RateLimiterState {
            bandwidth: self.bandwidth.as_ref().map(state),
            ops: self.ops.as_ref().map(state),
        }
    }

    pub fn restore(state: &RateLimiterState) -> Result<Self, RateLimiterError> {
        let bucket = |s: &TokenBucketState| {
            TokenBucket::new(s.config).map(|mut b| {
                b.budget = s.budget.min(b.size);
                b.one_time_burst = s.one_time_burst_left;
                b
            })
        };
        Ok(Self {
            bandwidth: state.bandwidth.as_ref().and_then(bucket),
            ops: state.ops.as_ref().and_then(bucket),
            timer: nonblocking_timer().map_err(RateLimiterError::Timer)?,
            blocked: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bucket(size: u64, burst: Option<u64>, refill_ms: u64) -> TokenBucketConfig {
        TokenBucketConfig {
            size,
            one_time_burst: burst,
            refill_time: refill_ms,
        }
    }

    fn limiter(
        bandwidth: Option<TokenBucketConfig>,
        ops: Option<TokenBucketConfig>,
    ) -> RateLimiter {
        RateLimiter::new(RateLimiterConfig { bandwidth, ops }).unwrap()
    }

    /// Waits (up to 5 s) for the limiter's timer to fire, as the event loop does, then
    /// hands it the event.
    fn wait_for_timer(l: &mut RateLimiter) {
        let mut fd = libc::pollfd {
            fd: l.timer_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the limiter's open timer.
        let n = unsafe { libc::poll(&mut fd, 1, 5000) };
        assert_eq!(n, 1, "the timer did not fire");
        l.on_timer();
    }

    #[test]
    fn zero_size_or_refill_time_does_not_limit() {
        let mut l = limiter(Some(bucket(0, None, 100)), Some(bucket(10, None, 0)));
        assert!(l.is_unlimited());
        for _ in 0..1000 {
            assert!(l.consume_request(1 << 20));
        }
        let config: RateLimiterConfig = serde_json::from_str(r#"{"bandwidth": null}"#).unwrap();
        assert!(!config.limits());
    }

    /// Tokens given back (an MMDS frame's) are there for the next request at once.
    #[test]
    fn a_request_given_back_costs_nothing() {
        let mut l = limiter(
            Some(bucket(1000, None, 60_000)),
            Some(bucket(2, None, 60_000)),
        );
        assert!(l.consume_request(1000));
        l.give_back_request(1000);
        assert!(
            l.consume_request(1000),
            "the bytes and the operation came back"
        );
        assert!(
            !l.consume_request(1),
            "without a give-back the buckets are empty"
        );
    }

    #[test]
    fn a_bucket_grants_its_size_then_blocks_until_refilled() {
        let mut l = limiter(Some(bucket(1000, None, 100)), None);
        assert!(l.consume(600, TokenType::Bytes));
        assert!(l.consume(400, TokenType::Bytes));
        assert!(!l.consume(100, TokenType::Bytes), "the bucket is empty");
        // Blocked: even the operations bucket (none here) waits for the timer.
        assert!(!l.consume(1, TokenType::Ops));
        let started = Instant::now();
        wait_for_timer(&mut l);
        // 100 ms of refill: the whole bucket again.
        assert!(started.elapsed() >= Duration::from_millis(90));
        assert!(l.consume(1000, TokenType::Bytes));
    }

    #[test]
    fn the_one_time_burst_is_spent_first_and_never_refilled() {
        let mut l = limiter(None, Some(bucket(10, Some(50), 1000)));
        for _ in 0..60 {
            assert!(l.consume(1, TokenType::Ops));
        }
        assert!(!l.consume(1, TokenType::Ops));
        let saved = l.save();
        assert_eq!(saved.ops.unwrap().one_time_burst_left, 0);
        assert_eq!(saved.ops.unwrap().config.one_time_burst, Some(50));
    }

    #[test]
    fn a_request_larger_than_the_bucket_passes_once_and_blocks_for_its_cost() {
        let mut l = limiter(Some(bucket(1000, None, 50)), None);
        // 3000 bytes: 2 bucket-fulls owed past the one there, 100 ms.
        assert!(l.consume(3000, TokenType::Bytes));
        assert!(!l.consume(1, TokenType::Bytes));
        let started = Instant::now();
        wait_for_timer(&mut l);
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(90) && waited < Duration::from_millis(300),
            "{waited:?}"
        );
    }

    #[test]
    fn the_rate_over_time_is_the_configured_one() {
        // 1 MB per 100 ms = 10 MB/s, asked in 64 KiB requests: 5 MB take the first 1 MB at
        // once and 0.4 s for the rest.
        let mut l = limiter(Some(bucket(1_000_000, None, 100)), None);
        let started = Instant::now();
        let mut granted = 0u64;
        while granted < 5_000_000 {
            if l.consume_request(65536) {
                granted += 65536;
            } else {
                wait_for_timer(&mut l);
            }
        }
        let took = started.elapsed();
        assert!(
            (Duration::from_millis(360)..Duration::from_millis(600)).contains(&took),
            "{took:?}"
        );
    }

    /// Requests larger than the bucket, one after another: each passes, and together they
    /// keep to the rate (the bucket earns nothing while it pays a debt off).
    #[test]
    fn large_requests_in_a_row_keep_to_the_rate() {
        // 100,000 bytes per 10 ms = 10 MB/s; ten requests of 400,000 bytes: the first
        // 100,000 at once, 3.9 MB at 10 MB/s = 0.39 s.
        let mut l = limiter(Some(bucket(100_000, None, 10)), None);
        let started = Instant::now();
        let mut granted = 0;
        while granted < 10 {
            if l.consume_request(400_000) {
                granted += 1;
            } else {
                wait_for_timer(&mut l);
            }
        }
        // The last request's debt is still to be waited out.
        wait_for_timer(&mut l);
        let took = started.elapsed();
        assert!(
            (Duration::from_millis(370)..Duration::from_millis(480)).contains(&took),
            "{took:?}"
        );
    }

    #[test]
    fn a_request_short_of_bytes_gives_its_operation_back() {
        let mut l = limiter(Some(bucket(100, None, 1000)), Some(bucket(5, None, 1000)));
        assert!(l.consume_request(100));
        assert!(!l.consume_request(50));
        assert_eq!(l.save().ops.unwrap().budget, 4);
    }

    #[test]
    fn patch_replaces_the_buckets_given_and_unblocks_an_unlimited_device() {
        let mut l = limiter(Some(bucket(10, None, 1000)), None);
        assert!(l.consume(10, TokenType::Bytes));
        assert!(!l.consume(1, TokenType::Bytes));
        l.update(RateLimiterConfig {
            bandwidth: Some(bucket(0, None, 0)),
            ops: None,
        });
        assert!(l.is_unlimited());
        assert!(l.consume(1 << 30, TokenType::Bytes));
        l.update(RateLimiterConfig {
            bandwidth: None,
            ops: Some(bucket(1, None, 1000)),
        });
        assert_eq!(l.config().ops, Some(bucket(1, None, 1000)));
        assert_eq!(l.config().bandwidth, None);
    }

    #[test]
    fn a_snapshot_keeps_the_buckets_and_what_they_held() {
        let mut l = limiter(
            Some(bucket(1000, Some(10), 100)),
            Some(bucket(7, None, 100)),
        );
        assert!(l.consume_request(400));
        let state = l.save();
        let json = serde_json::to_string(&state).unwrap();
        let back: RateLimiterState = serde_json::from_str(&json).unwrap();
        let restored = RateLimiter::restore(&back).unwrap();
        assert_eq!(restored.config(), l.config());
        let s = restored.save();
        assert_eq!(s, state, "the buckets and what they held");
        assert_eq!(s.bandwidth.unwrap().budget, 610);
        assert_eq!(s.bandwidth.unwrap().one_time_burst_left, 0);
        assert_eq!(s.ops.unwrap().budget, 6);
    }

    /// A PATCH lets a device held back go at once, and a timer event that was already on
    /// its way then reads nothing and changes nothing (it must not block the event loop).
    #[test]
    fn a_patch_lets_a_held_device_go_and_a_stale_timer_event_is_harmless() {
        let mut l = limiter(Some(bucket(100, None, 1000)), None);
        // 10 bucket-fulls owed: 10 s held back.
        assert!(l.consume(1100, TokenType::Bytes));
        assert!(!l.consume(1, TokenType::Bytes));
        l.update(RateLimiterConfig {
            bandwidth: Some(bucket(1 << 20, None, 1000)),
            ops: None,
        });
        assert!(
            l.consume(4096, TokenType::Bytes),
            "still held back after the PATCH"
        );
        let started = Instant::now();
        l.on_timer();
        assert!(
            started.elapsed() < Duration::from_millis(50),
            "on_timer blocked"
        );
        assert!(l.consume(4096, TokenType::Bytes));
    }

    #[test]
    fn absurd_sizes_and_refill_times_neither_panic_nor_hold_forever() {
        let mut l = limiter(Some(bucket(u64::MAX, None, u64::MAX)), None);
        assert!(l.consume(u64::MAX / 2, TokenType::Bytes));
        l.bandwidth.as_mut().unwrap().refill();
        let mut l = limiter(Some(bucket(1, None, u64::MAX)), None);
        // Overdrawn by ~2^64 bucket-fulls of ~2^64 ms: held back for the cap, no panic.
        assert!(l.consume(u64::MAX, TokenType::Bytes));
        assert!(!l.consume(1, TokenType::Bytes));
    }

    #[test]
    fn unknown_fields_are_refused() {
        let e = serde_json::from_str::<RateLimiterConfig>(r#"{"bandwith": {}}"#).unwrap_err();
        assert!(e.to_string().contains("bandwith"), "{e}");
        let e = serde_json::from_str::<RateLimiterConfig>(
            r#"{"bandwidth": {"size": 1, "refill_time": 1, "burst": 3}}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("burst"), "{e}");
    }
}
