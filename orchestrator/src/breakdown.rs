//! Where a cold start's time went, under vHive's names (its `metrics` package), so that
//! analysis scripts written for vHive's CSVs read reapd's. Times are microseconds; the
//! last two fields are page counts.

use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Breakdown {
    /// reapvm process start to the VM resumed (the snapshot load answered).
    #[serde(rename = "LoadVMM")]
    pub load_vmm_us: u64,
    /// Reading and checking the vmstate and the WS file (part of LoadVMM).
    #[serde(rename = "FetchState")]
    pub fetch_state_us: u64,
    /// Installing the WS into guest memory (part of LoadVMM).
    #[serde(rename = "InstallWS")]
    pub install_ws_us: u64,
    /// VM resumed to the first successful connection to the agent.
    #[serde(rename = "ConnectFuncClient")]
    pub connect_func_client_us: u64,
    /// The invocation, sent to answered.
    #[serde(rename = "FuncInvocation")]
    pub func_invocation_us: u64,
    /// Pages served one fault at a time after the restore (REAP's misses; every page
    /// touched for `lazy`; major faults for `file`).
    #[serde(rename = "ServeUnique")]
    pub serve_unique_pages: u64,
    /// Pages recorded into the WS (a recording cold start only).
    #[serde(rename = "RecPages")]
    pub rec_pages: u64,
    /// The cold start, reapd deciding to start an instance to the answer.
    #[serde(rename = "Total")]
    pub total_us: u64,
}

/// The fields' names (vHive's), in the CSV's column order.
pub const FIELD_NAMES: [&str; 8] = [
    "LoadVMM",
    "FetchState",
    "InstallWS",
    "ConnectFuncClient",
    "FuncInvocation",
    "ServeUnique",
    "RecPages",
    "Total",
];

/// The CSV's column order (vHive's names).
pub const CSV_HEADER: &str =
    "LoadVMM,FetchState,InstallWS,ConnectFuncClient,FuncInvocation,ServeUnique,RecPages,Total";

impl Breakdown {
    /// Fills the restore's own figures from reapvm's metrics line (`memory_restore`).
    pub fn take_restore_metrics(&mut self, metrics: &Value) {
        let restore = &metrics["memory_restore"];
        let field = |name: &str| restore[name].as_u64().unwrap_or(0);
        self.fetch_state_us = field("vmstate_load_us") + field("ws_fetch_us");
        self.install_ws_us = field("ws_install_us");
        self.serve_unique_pages = field("faults_on_demand");
        self.rec_pages = field("ws_pages_recorded");
    }

    /// The fields in the CSV's order: vHive's name, the value, and its unit in `line`
    /// (`us` for times, none for page counts).
    pub fn fields(&self) -> [(&'static str, u64, &'static str); 8] {
        [
            ("LoadVMM", self.load_vmm_us, "us"),
            ("FetchState", self.fetch_state_us, "us"),
            ("InstallWS", self.install_ws_us, "us"),
            ("ConnectFuncClient", self.connect_func_client_us, "us"),
            ("FuncInvocation", self.func_invocation_us, "us"),
            ("ServeUnique", self.serve_unique_pages, ""),
            ("RecPages", self.rec_pages, ""),
            ("Total", self.total_us, "us"),
        ]
    }

    pub fn csv_row(&self) -> String {
        let values: Vec<String> = self
            .fields()
            .iter()
            .map(|(_, v, _)| v.to_string())
            .collect();
        values.join(",")
    }

    /// One line for people and for the `x-reapd-breakdown` header: `LoadVMM=12345us ...`.
    pub fn line(&self) -> String {
        let words: Vec<String> = self
            .fields()
            .iter()
            .map(|(name, v, unit)| format!("{name}={v}{unit}"))
            .collect();
        words.join(" ")
    }

    /// Reads back what `line` wrote; None when a field is missing or not a number.
    pub fn parse_line(line: &str) -> Option<Self> {
        let field = |name: &str| -> Option<u64> {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))
                .map(|v| v.trim_end_matches("us"))
                .and_then(|v| v.parse().ok())
        };
        Some(Self {
            load_vmm_us: field("LoadVMM")?,
            fetch_state_us: field("FetchState")?,
            install_ws_us: field("InstallWS")?,
            connect_func_client_us: field("ConnectFuncClient")?,
            func_invocation_us: field("FuncInvocation")?,
            serve_unique_pages: field("ServeUnique")?,
            rec_pages: field("RecPages")?,
            total_us: field("Total")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restore_metrics_fill_the_vhive_fields() {
        let metrics = serde_json::json!({"memory_restore": {
            "vmstate_load_us": 300, "ws_fetch_us": 700, "ws_install_us": 250,
            "faults_on_demand": 12, "ws_pages_recorded": 0}});
        let mut b = Breakdown::default();
        b.take_restore_metrics(&metrics);
        assert_eq!((b.fetch_state_us, b.install_ws_us), (1000, 250));
        assert_eq!((b.serve_unique_pages, b.rec_pages), (12, 0));
    }

    #[test]
    fn csv_and_json_use_vhive_names_in_one_order() {
        let b = Breakdown {
            load_vmm_us: 1,
            fetch_state_us: 2,
            install_ws_us: 3,
            connect_func_client_us: 4,
            func_invocation_us: 5,
            serve_unique_pages: 6,
            rec_pages: 7,
            total_us: 8,
        };
        assert_eq!(b.csv_row(), "1,2,3,4,5,6,7,8");
        let json = serde_json::to_value(&b).unwrap();
        let names: Vec<&str> = CSV_HEADER.split(',').collect();
        for (i, name) in names.iter().enumerate() {
            assert_eq!(json[name], i as u64 + 1, "{name}");
        }
        assert!(b.line().starts_with("LoadVMM=1us FetchState=2us"));
        assert_eq!(Breakdown::parse_line(&b.line()), Some(b.clone()));
        assert_eq!(CSV_HEADER, FIELD_NAMES.join(","));
        let named: Vec<&str> = b.fields().iter().map(|(n, _, _)| *n).collect();
        assert_eq!(named, FIELD_NAMES);
        assert_eq!(Breakdown::parse_line("LoadVMM=1us"), None);
    }
}
