//! The vSwarm function suite as the REAP paper ran it, and what each function answers.

/// One function of the suite.
pub struct SuiteFunction {
    pub name: &'static str,
    /// Guest memory: the paper's 256 MiB, more where the runtime needs it.
    pub mem_mib: u64,
    /// The request body (empty: the handler's build-time default input).
    pub body: &'static [u8],
    /// What a correct answer starts with. Handlers check their own results and answer
    /// 500 when wrong, so this only tells one function's answer from another's.
    pub answer_prefix: &'static str,
}

const fn f(name: &'static str, mem_mib: u64, answer_prefix: &'static str) -> SuiteFunction {
    SuiteFunction {
        name,
        mem_mib,
        body: b"",
        answer_prefix,
    }
}

/// The paper's ten functions, in its table's order.
pub const SUITE: &[SuiteFunction] = &[
    SuiteFunction {
        name: "helloworld",
        mem_mib: 256,
        body: b"reapvm",
        answer_prefix: "Hello, reapvm!",
    },
    f("chameleon", 256, "ok chameleon "),
    f("pyaes", 256, "ok pyaes "),
    f("image_rotate", 256, "ok image_rotate "),
    f("json_serdes", 256, "ok json_serdes "),
    f("lr_serving", 256, "ok lr_serving "),
    f("cnn_serving", 512, "ok cnn_serving "),
    f("rnn_serving", 512, "ok rnn_serving "),
    f("lr_training", 256, "ok lr_training "),
    f("video_processing", 256, "ok video_processing "),
];

pub fn find(name: &str) -> Option<&'static SuiteFunction> {
    SUITE.iter().find(|f| f.name == name)
}

/// The REAP paper's table (1 vCPU, 256 MiB, page cache flushed, SATA SSD): warm, cold
/// (Firecracker snapshot, lazy file mapping) and REAP latencies in ms, and its speedup.
pub fn paper(name: &str) -> Option<(f64, f64, f64, f64)> {
    Some(match name {
        "helloworld" => (1.0, 232.0, 60.0, 3.9),
        "chameleon" => (29.0, 437.0, 97.0, 4.5),
        "pyaes" => (3.0, 309.0, 55.0, 5.6),
        "image_rotate" => (37.0, 594.0, 207.0, 2.9),
        "json_serdes" => (27.0, 535.0, 127.0, 4.2),
        "lr_serving" => (2.0, 647.0, 66.0, 9.8),
        "cnn_serving" => (192.0, 1424.0, 237.0, 6.0),
        "rnn_serving" => (25.0, 503.0, 82.0, 6.1),
        "lr_training" => (4991.0, 8057.0, 6090.0, 1.3),
        "video_processing" => (1476.0, 2642.0, 2540.0, 1.04),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_suite_function_has_a_folder_and_a_paper_row() {
        let root = test_support::repo_root().join("resources/functions");
        for f in SUITE {
            assert!(root.join(f.name).join("handler.py").is_file(), "{}", f.name);
            assert!(paper(f.name).is_some(), "{}", f.name);
        }
    }
}
