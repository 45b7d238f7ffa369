//! The microVM metadata service (Firecracker's MMDS): a JSON document the host sets through
//! the API and the guest reads over HTTP at a link-local address (169.254.169.254 unless
//! configured), through the network interfaces `PUT /mmds/config` names.
//!
//! - [`store`]: the document, its size limit, merge patches, IMDS text, the version.
//! - [`token`]: V2's session tokens.
//! - [`http`]: the guest's HTTP requests and their answers.
//! - [`stack`]: the frames: ARP and a smoltcp TCP/IP interface.

pub mod http;
pub mod stack;
pub mod store;
pub mod token;

pub use stack::{is_valid_mmds_ipv4, MmdsCounts, MmdsStack, DEFAULT_IPV4, MMDS_MAC};
pub use store::{MmdsStore, MmdsVersion, StoreError, DEFAULT_SIZE_LIMIT};
