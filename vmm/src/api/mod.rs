//! Firecracker's HTTP API: the request model (which method and path mean what, with which
//! body). The server that serves it over `--api-sock` builds on this.

pub mod controller;
pub mod request;
pub mod server;

pub use request::{parse, Action, ApiError, ApiRequest, VmStateChange};
