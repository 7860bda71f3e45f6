//! Log lines as CloudWatch Logs Insights will see them: one JSON object per
//! line, with the process context and the current phase on every line, and
//! secrets redacted. One test per file: the subscriber is process-global.
//! Events name a `kubeboot::` target: only our crate logs below warn.

use kubeboot::secret::Secret;
use kubeboot::telemetry::{self, ContextKey, LogFormat};
use std::sync::{Arc, Mutex};

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn json_lines_carry_context_phase_and_fields_but_never_secrets() {
    let capture = Capture::default();
    let sink = capture.clone();
    let handle =
        telemetry::init_with_writer(LogFormat::Json, "info", move || sink.clone()).unwrap();

    tracing::info!(target: "kubeboot::test", "before identity is known");
    telemetry::set_context(ContextKey::Cluster, "prod-a");
    telemetry::set_context(ContextKey::InstanceId, "i-0123456789abcdef0");
    telemetry::set_context(ContextKey::Role, "control-plane");
    telemetry::set_context(ContextKey::RunId, "run-42");
    let token = Secret::new("abcdef.0123456789abcdef".to_string());
    telemetry::phase("init-lock").in_scope(|| {
        tracing::info!(target: "kubeboot::lock", fence = 7, token = ?token, "lock acquired");
        tracing::debug!(target: "kubeboot::lock", "not at info level");
    });
    handle.set_level("debug").unwrap();
    tracing::debug!(target: "kubeboot::test", "debug after reload");

    let text = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    assert!(
        !text.contains("0123456789abcdef\""),
        "secret leaked: {text}"
    );
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect();
    assert_eq!(lines.len(), 3, "{text}");

    assert_eq!(lines[0]["message"], "before identity is known");
    assert!(lines[0].get("cluster").is_none());

    let acquired = &lines[1];
    assert_eq!(acquired["message"], "lock acquired");
    assert_eq!(acquired["level"], "INFO");
    assert_eq!(acquired["cluster"], "prod-a");
    assert_eq!(acquired["instance_id"], "i-0123456789abcdef0");
    assert_eq!(acquired["role"], "control-plane");
    assert_eq!(acquired["run_id"], "run-42");
    assert_eq!(acquired["phase"], "init-lock");
    assert_eq!(acquired["fence"], 7);
    assert_eq!(acquired["token"], "Secret(<redacted>)");
    assert!(acquired["timestamp"].as_str().unwrap().ends_with('Z'));

    assert_eq!(lines[2]["message"], "debug after reload");
    assert!(lines[2].get("phase").is_none(), "phase ends with its span");
    assert_eq!(lines[2]["run_id"], "run-42");
}
