//! The metrics sinks: a listener plays the CloudWatch agent (TCP and UDP);
//! an agent endpoint that is down or stalled costs bootstrap nothing but
//! the metrics.

use kubeboot::metrics::{self, Destination, Metrics, Origin};
use kubeboot_tests::emf;
use kubeboot_tests::net::{closed_endpoint, stalled_endpoint};
use kubeboot_tests::simcluster::{tail, SimCluster};
use std::io::{BufRead, BufReader};
use std::time::Duration;

fn origin() -> Origin {
    Origin {
        namespace: "Kubeboot".into(),
        cluster: "sink-test".into(),
        role: "control-plane".into(),
        instance_id: Some("i-0123456789abcdef0".into()),
        log_group: Some("/kubeboot/sink-test/metrics".into()),
    }
}

/// What a short bootstrap and a health turn emit.
fn emit_some(m: &Metrics) {
    m.emit(
        &[
            (metrics::BOOTSTRAP_SUCCESS, 1.0),
            (metrics::BOOTSTRAP_DURATION, 228.0),
        ],
        &[("Path", "init")],
    );
    m.record(metrics::LOCK_WAIT, 6.5, &[("Purpose", "init")]);
    m.emit(
        &[
            (metrics::ETCD_MEMBERS, 3.0),
            (metrics::ETCD_HEALTHY_MEMBERS, 3.0),
            (metrics::ETCD_DB_SIZE, 20_480.0),
        ],
        &[],
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tcp_listener_playing_the_cloudwatch_agent_receives_one_valid_document_per_line() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let agent = std::thread::spawn(move || {
        let (conn, _) = listener.accept().expect("the agent connects");
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        BufReader::new(conn)
            .lines()
            .take(3)
            .map(|l| l.expect("a line"))
            .collect::<Vec<_>>()
    });
    let m = Metrics::start(origin(), Some(Destination::Tcp(addr)), 64);
    emit_some(&m);
    m.flush(Duration::from_secs(5)).await;
    let lines = agent.join().expect("listener");
    assert_eq!(lines.len(), 3);
    for line in &lines {
        let doc = emf::validate(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert_eq!(
            doc["_aws"]["LogGroupName"], "/kubeboot/sink-test/metrics",
            "the CloudWatch agent needs the log group"
        );
        assert_eq!(doc["InstanceId"], "i-0123456789abcdef0");
    }
    assert_eq!((m.sent(), m.dropped()), (3, 0));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_udp_listener_gets_one_document_per_datagram() {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let addr = socket.local_addr().expect("addr").to_string();
    let m = Metrics::start(origin(), Some(Destination::Udp(addr)), 64);
    emit_some(&m);
    m.flush(Duration::from_secs(5)).await;
    let mut buf = vec![0u8; 65_536];
    for _ in 0..3 {
        let n = socket.recv(&mut buf).expect("a datagram");
        let text = std::str::from_utf8(&buf[..n]).expect("utf-8");
        assert!(text.ends_with('\n'));
        emf::validate(text.trim_end()).unwrap_or_else(|e| panic!("{e}: {text}"));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn documents_dropped_while_the_agent_was_down_are_counted_once_it_is_back() {
    // Nobody listens yet: the first documents are dropped.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    let m = Metrics::start(origin(), Some(Destination::Tcp(addr.to_string())), 64);
    emit_some(&m);
    m.flush(Duration::from_secs(5)).await;
    assert_eq!(m.dropped(), 3, "down: every document dropped, none queued");

    // The agent comes back; after the reconnect pause the next document
    // goes out followed by a MetricsDropped document carrying the count.
    let listener = std::net::TcpListener::bind(addr).expect("rebind");
    let agent = std::thread::spawn(move || {
        let (conn, _) = listener.accept().expect("reconnect");
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        BufReader::new(conn)
            .lines()
            .take(2)
            .map(|l| l.expect("a line"))
            .collect::<Vec<_>>()
    });
    tokio::time::sleep(metrics::RECONNECT_AFTER + Duration::from_millis(200)).await;
    m.record(metrics::ETCD_MEMBERS, 3.0, &[]);
    m.flush(Duration::from_secs(5)).await;
    let lines = agent.join().expect("listener");
    let report = emf::validate(&lines[1]).expect("valid");
    assert_eq!(report["MetricsDropped"], 3, "{}", lines[1]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_down_or_stalled_metrics_agent_costs_bootstrap_only_its_metrics() {
    let sim = SimCluster::start(2, 0).await;
    let closed = closed_endpoint();
    let (_stalled, _held, stalled) = stalled_endpoint();
    for (index, endpoint) in [(0, closed), (1, stalled)] {
        let out = sim
            .bootstrap_command(&sim.nodes[index])
            .env("KUBEBOOT_METRICS_SINK", "agent")
            .env(
                "KUBEBOOT_METRICS_AGENT_ENDPOINT",
                format!("tcp://{endpoint}"),
            )
            .output()
            .await
            .expect("bootstrap runs");
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        sim.record_output(&stderr);
        assert_eq!(
            out.status.code(),
            Some(0),
            "node {index} with the agent at {endpoint}:\n{}",
            tail(&stderr)
        );
        assert!(
            stderr.contains("metrics sink unavailable"),
            "node {index} says its metrics are lost:\n{}",
            tail(&stderr)
        );
    }
    assert_eq!(sim.etcd_members(&[0, 1]).await.len(), 2, "both joined");
}
