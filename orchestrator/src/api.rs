//! reapd's HTTP/JSON API (axum). Errors are `{"error": "..."}` with 400 (bad input, naming
//! the field), 404 (unknown function), 409 (name taken), 413 (body over the limit), 429
//! (the function's queue is full) and 5xx (a VM or deploy that failed, with the reason).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use hyper::body::Bytes;
use serde::Deserialize;
use serde_json::json;

use crate::daemon::{Daemon, DaemonError};
use crate::spec::{check_name, DeploySpec};

/// The largest request body: a deploy's JSON or an invocation's data.
pub const MAX_BODY_BYTES: usize = 1 << 20;

pub const START_HEADER: &str = "x-reapd-start";
pub const MODE_HEADER: &str = "x-reapd-mode";
pub const INSTANCE_HEADER: &str = "x-reapd-instance";
pub const LATENCY_HEADER: &str = "x-reapd-latency-us";
pub const BREAKDOWN_HEADER: &str = "x-reapd-breakdown";

pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, axum::Json(json!({"error": self.1}))).into_response()
    }
}

impl From<DaemonError> for ApiError {
    fn from(e: DaemonError) -> Self {
        let status = match &e {
            DaemonError::NotFound(_) => StatusCode::NOT_FOUND,
            DaemonError::Exists(_) | DaemonError::InProgress(_) => StatusCode::CONFLICT,
            DaemonError::Stopping => StatusCode::SERVICE_UNAVAILABLE,
            DaemonError::Spec(_) => StatusCode::BAD_REQUEST,
            DaemonError::Busy(crate::pool::PoolError::QueueFull { .. }) => {
                StatusCode::TOO_MANY_REQUESTS
            }
            DaemonError::Busy(_) => StatusCode::NOT_FOUND,
            DaemonError::Instance { .. } | DaemonError::InstanceDied { .. } => {
                StatusCode::BAD_GATEWAY
            }
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self(status, e.to_string())
    }
}

fn bad_request(reason: String) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, reason)
}

/// JSON into `T`; an error names the field it is about (`keep_alive_s: invalid value ...`).
fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8], what: &str) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let at = if path == "." {
            String::new()
        } else {
            format!("field `{path}`: ")
        };
        bad_request(format!("{what}: {at}{}", e.into_inner()))
    })?;
    de.end().map_err(|e| bad_request(format!("{what}: {e}")))?;
    Ok(value)
}

fn checked_name(name: &str) -> Result<(), ApiError> {
    check_name("name", name).map_err(|e| bad_request(e.to_string()))
}

pub fn router(daemon: Arc<Daemon>) -> Router {
    Router::new()
        .route("/functions", get(list).post(deploy))
        .route("/functions/{name}", get(show).delete(remove))
        .route("/functions/{name}/invoke", post(invoke))
        .route("/functions/{name}/scale-to-zero", post(scale_to_zero))
        .route("/functions/{name}/invocations", get(invocations))
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError(StatusCode::NOT_FOUND, "no such endpoint".into()) })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(daemon)
}

/// `POST /functions` with a `DeploySpec`; answers once the function can be invoked.
async fn deploy(State(daemon): State<Arc<Daemon>>, body: Bytes) -> Result<Response, ApiError> {
    let spec: DeploySpec = parse_json(&body, "the deploy body")?;
    let view = daemon.deploy(spec, Vec::new()).await?;
    Ok((StatusCode::CREATED, axum::Json(view)).into_response())
}

async fn list(State(daemon): State<Arc<Daemon>>) -> Result<Response, ApiError> {
    Ok(axum::Json(daemon.list()?).into_response())
}

async fn show(
    State(daemon): State<Arc<Daemon>>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    checked_name(&name)?;
    Ok(axum::Json(daemon.show(&name)?).into_response())
}

async fn remove(
    State(daemon): State<Arc<Daemon>>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    checked_name(&name)?;
    let stopped = daemon.remove(&name).await?;
    Ok(axum::Json(json!({"removed": name, "instances_stopped": stopped})).into_response())
}

async fn scale_to_zero(
    State(daemon): State<Arc<Daemon>>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    checked_name(&name)?;
    let (stopped, busy) = daemon.scale_to_zero(&name).await?;
    Ok(axum::Json(json!({"instances_stopped": stopped, "instances_busy": busy})).into_response())
}

/// The function's answer is the body, as the function gave it; how it was served is in
/// the `x-reapd-*` headers.
async fn invoke(
    State(daemon): State<Arc<Daemon>>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    checked_name(&name)?;
    let outcome = daemon.invoke(&name, body).await?;
    let mut response = Response::new(Body::from(outcome.body));
    *response.status_mut() =
        StatusCode::from_u16(outcome.status).unwrap_or(StatusCode::BAD_GATEWAY);
    let headers = response.headers_mut();
    let mut put = |name: &'static str, value: String| {
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.insert(name, v);
        }
    };
    put(
        START_HEADER,
        if outcome.cold { "cold" } else { "warm" }.to_string(),
    );
    put(INSTANCE_HEADER, outcome.instance.to_string());
    put(LATENCY_HEADER, outcome.latency.as_micros().to_string());
    if let Some(mode) = outcome.mode {
        put(MODE_HEADER, mode.to_string());
    }
    if let Some(b) = &outcome.breakdown {
        put(BREAKDOWN_HEADER, b.line());
    }
    Ok(response)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InvocationsQuery {
    limit: Option<u32>,
}

async fn invocations(
    State(daemon): State<Arc<Daemon>>,
    Path(name): Path<String>,
    query: Result<Query<InvocationsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    checked_name(&name)?;
    let Query(query) = query.map_err(|e| bad_request(format!("the query: {e}")))?;
    let limit = query.limit.unwrap_or(1000).min(100_000);
    Ok(axum::Json(daemon.invocations(&name, limit)?).into_response())
}

async fn metrics(State(daemon): State<Arc<Daemon>>) -> Response {
    (
        [(
            "content-type",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        daemon.metrics.encode(),
    )
        .into_response()
}
