//! Prometheus metrics at `GET /metrics` (text exposition format).

use std::sync::Mutex;

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StartLabels {
    pub function: String,
    /// `cold` or `warm`.
    pub start: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FunctionLabels {
    pub function: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    pub function: String,
    /// A breakdown field (vHive's name).
    pub phase: String,
}

pub struct Metrics {
    registry: Mutex<Registry>,
    pub invocations: Family<StartLabels, Counter>,
    pub failed_invocations: Family<FunctionLabels, Counter>,
    pub latency: Family<StartLabels, Histogram>,
    pub cold_start_phases: Family<PhaseLabels, Histogram>,
    pub instances: Family<FunctionLabels, Gauge>,
}

fn seconds_histogram() -> Histogram {
    // 100 us to ~15 min: warm invocations on hardware to cold starts in the KVM lab.
    Histogram::new(exponential_buckets(0.0001, 2.5, 18))
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("reapd");
        let invocations = Family::<StartLabels, Counter>::default();
        let failed_invocations = Family::<FunctionLabels, Counter>::default();
        let latency = Family::<StartLabels, Histogram>::new_with_constructor(
            seconds_histogram as fn() -> Histogram,
        );
        let cold_start_phases = Family::<PhaseLabels, Histogram>::new_with_constructor(
            seconds_histogram as fn() -> Histogram,
        );
        let instances = Family::<FunctionLabels, Gauge>::default();
        registry.register(
            "invocations",
            "Invocations answered, by cold or warm start",
            invocations.clone(),
        );
        registry.register(
            "failed_invocations",
            "Invocations that got no answer from the function",
            failed_invocations.clone(),
        );
        registry.register(
            "invocation_latency_seconds",
            "Invocation latency as reapd saw it, by cold or warm start",
            latency.clone(),
        );
        registry.register(
            "cold_start_phase_seconds",
            "Cold-start breakdown phases (vHive's names)",
            cold_start_phases.clone(),
        );
        registry.register(
            "instances",
            "Instances running (started and not yet stopped)",
            instances.clone(),
        );
        Self {
            registry: Mutex::new(registry),
            invocations,
            failed_invocations,
            latency,
            cold_start_phases,
            instances,
        }
    }

    pub fn encode(&self) -> String {
        let mut text = String::new();
        let registry = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        encode(&mut text, &registry).expect("writing to a String cannot fail");
        text
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_show_in_the_text_format() {
        let m = Metrics::new();
        let labels = StartLabels {
            function: "hello".into(),
            start: "cold".into(),
        };
        m.invocations.get_or_create(&labels).inc();
        m.latency.get_or_create(&labels).observe(0.5);
        m.instances
            .get_or_create(&FunctionLabels {
                function: "hello".into(),
            })
            .set(2);
        let text = m.encode();
        assert!(
            text.contains(r#"reapd_invocations_total{function="hello",start="cold"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"reapd_instances{function="hello"} 2"#),
            "{text}"
        );
        assert!(
            text.contains("reapd_invocation_latency_seconds_count"),
            "{text}"
        );
    }
}
