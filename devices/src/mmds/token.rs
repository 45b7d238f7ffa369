//! MMDS V2 session tokens: random strings the guest gets from `PUT /latest/api/token` and
//! sends back on every GET until they expire. Firecracker encrypts the expiry into the
//! token; here the VMM remembers what it handed out, so a token is valid only if this
//! process issued it (a restored VM's old tokens are not, as in Firecracker). The table is
//! bounded: a guest asking for tokens without end loses its oldest, never the VMM's memory.

use std::collections::HashMap;
use std::time::{Duration, Instant};

pub const MIN_TTL_SECONDS: u32 = 1;
pub const MAX_TTL_SECONDS: u32 = 21_600;
/// Tokens remembered at once (about 100 bytes each).
const MAX_TOKENS: usize = 4096;
const TOKEN_BYTES: usize = 24;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("Invalid time to live value provided for token: {0}. Please provide a value between {MIN_TTL_SECONDS} and {MAX_TTL_SECONDS}.")]
    InvalidTtl(u32),
    #[error("cannot draw random bytes for an MMDS token: {0}")]
    Random(String),
}

#[derive(Debug, Default)]
pub struct Tokens {
    expiry: HashMap<String, Instant>,
}

impl Tokens {
    pub fn issue(&mut self, ttl_seconds: u32, now: Instant) -> Result<String, TokenError> {
        if !(MIN_TTL_SECONDS..=MAX_TTL_SECONDS).contains(&ttl_seconds) {
            return Err(TokenError::InvalidTtl(ttl_seconds));
        }
        let mut bytes = [0u8; TOKEN_BYTES];
        getrandom::fill(&mut bytes).map_err(|e| TokenError::Random(e.to_string()))?;
        let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        if self.expiry.len() >= MAX_TOKENS {
            self.expiry.retain(|_, at| *at > now);
        }
        if self.expiry.len() >= MAX_TOKENS {
            if let Some(oldest) = self
                .expiry
                .iter()
                .min_by_key(|(_, at)| **at)
                .map(|(t, _)| t.clone())
            {
                self.expiry.remove(&oldest);
            }
        }
        self.expiry.insert(
            token.clone(),
            now + Duration::from_secs(u64::from(ttl_seconds)),
        );
        Ok(token)
    }

    pub fn is_valid(&self, token: &str, now: Instant) -> bool {
        self.expiry.get(token).is_some_and(|at| *at > now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_expire_and_only_issued_ones_count() {
        let mut tokens = Tokens::default();
        let now = Instant::now();
        assert_eq!(tokens.issue(0, now), Err(TokenError::InvalidTtl(0)));
        assert_eq!(
            tokens.issue(21_601, now),
            Err(TokenError::InvalidTtl(21_601))
        );
        let t = tokens.issue(2, now).unwrap();
        assert_eq!(t.len(), 2 * TOKEN_BYTES);
        assert!(tokens.is_valid(&t, now + Duration::from_secs(1)));
        assert!(!tokens.is_valid(&t, now + Duration::from_secs(2)));
        assert!(!tokens.is_valid("not-a-token", now));
        let other = tokens.issue(2, now).unwrap();
        assert_ne!(t, other);
    }

    #[test]
    fn the_table_is_bounded() {
        let mut tokens = Tokens::default();
        let now = Instant::now();
        let first = tokens.issue(10, now).unwrap();
        for i in 0..MAX_TOKENS {
            tokens
                .issue(100, now + Duration::from_millis(i as u64))
                .unwrap();
        }
        assert_eq!(tokens.expiry.len(), MAX_TOKENS);
        assert!(
            !tokens.is_valid(&first, now),
            "the token expiring first made room"
        );
    }
}
