//! A test-only `kubeadm` stand-in (the binary is named `kubeadm`).
//!
//! kubeadm cannot be installed on the test machine, yet the agent's value is
//! in how it drives kubeadm: init once, join as learner then voter, reset and
//! remove the member, refresh tokens and uploaded certificates. So this
//! binary answers the argv the agent uses as kubeadm 1.31 would, with the
//! same *effects*: real `etcd` processes that outlive it (like static Pods),
//! cluster state in the Kubernetes API (the [`kubeapi`](kubeboot_tests::kubeapi) double, over plain
//! HTTP), files where kubeadm writes them, kubeadm's progress lines on
//! stdout, and kubeadm's error texts on stderr with exit code 1.
//!
//! What it reads: the `--config` file's documents (JSON objects separated by
//! `---` lines, `kubeadm.k8s.io/v1beta4`), only the fields the agent
//! renders. What it does NOT do: kube-apiserver / controller-manager /
//! scheduler / kubelet processes (their manifests are written, their effects
//! on the API are simulated), CoreDNS/kube-proxy, TLS to the API double.
//!
//! ## What it refuses, as kubeadm does (each cites its upstream source)
//!
//! - etcd is https with client-certificate auth, with kubeadm's PKI
//!   (`kubeboot_tests::pki`): no etcd call without this node's
//!   `apiserver-etcd-client` identity, so a worker, or a control plane
//!   before `download-certs`, cannot reach etcd;
//! - a joining control plane has no `pki/` until `download-certs` opened the
//!   shared CAs with the right certificate key (AES-256-GCM: a wrong key
//!   fails and writes nothing) and `certs` issued its own certificates;
//! - a joiner's etcd runs with the cluster's `etcd.local.extraArgs` (from
//!   the `kubeadm-config` ConfigMap) over its own defaults, so node-specific
//!   URLs there break every later join;
//! - preflight: existing manifests, kubelet.conf, a used etcd data dir or
//!   port, a worker's existing CA (not a control plane's:
//!   `preflight/checks.go` `JoinNodeChecks`);
//! - discovery: an unknown or expired token, a wrong CA pin, expired
//!   uploaded certificates; a stale learner or an unstarted voter in etcd
//!   (`check-etcd`, `member add`: one learner at a time);
//! - `kubelet-start`: with `KUBEADM_STANDIN_INIT_SYSTEM=systemd`, `systemctl
//!   restart kubelet`, blocking, as kubeadm does under systemd.
//!
//! Knobs (environment): `KBTEST_PID_DIR`, `KBTEST_OWNER_PID`,
//! `KBTEST_KUBEADM_LOG` (see `kubeboot_tests::standin`), `KBTEST_ETCD_BIN`,
//! and timeouts in milliseconds: `KBTEST_KUBEADM_WAIT_TIMEOUT_MS` (etcd and
//! API healthy, default 20 000), `KBTEST_KUBEADM_API_TIMEOUT_MS` (retrying an
//! unreachable API, default 10 000), `KBTEST_KUBEADM_DISCOVERY_TIMEOUT_MS`
//! (waiting for a token's signature in cluster-info, default 3 000),
//! `KBTEST_KUBEADM_PROMOTE_TIMEOUT_MS` (learner promotion, default 120 000),
//! `KBTEST_KUBEADM_RECONFIG_TIMEOUT_MS` (etcd refusing membership changes as
//! "unhealthy cluster", default 30 000).
//!
//! ## No-op mode (`KBTEST_KUBEADM_NOOP=1`)
//!
//! For measuring the agent's own overhead (`bench/bootstrap.sh`), `init` and
//! `join` can do only what the agent reads after they return, and nothing
//! slow: no etcd, no waits, no discovery, no preflight.
//!
//! - `init --config F`: writes a fresh self-signed CA to
//!   `<certificatesDir>/ca.crt` and `ca.key` (the agent pins the CA's SPKI)
//!   and nothing else. The etcd member the agent then confirms (peer URL
//!   `http://<advertiseAddress>:2380`, started, voting, healthy) is the
//!   caller's to provide: the benchmark starts a one-member etcd at the
//!   node's IP before timing.
//! - `join --config F` (worker or control plane): writes `kubelet.conf`
//!   next to `caCertPath`'s `pki/`, pointing at
//!   `discovery.bootstrapToken.apiServerEndpoint` over plain HTTP with the
//!   cluster CA read from `cluster-info` (a throwaway CA if there is none),
//!   and registers the Node (`nodeRegistration.name`, `--node-ip`) already
//!   `Ready` in the API double: two requests, no kubelet delay. No
//!   discovery checks: the token, its signature and the CA pin are not
//!   verified. A control plane's etcd member is, again, the caller's.
//!
//! The config documents are still parsed (so an agent rendering bug still
//! fails), system paths are still refused, and every run is still logged to
//! `KBTEST_KUBEADM_LOG`. `reset`, `token` and `version` behave as without the
//! knob.

// One module per banner of the former single file: `cli` dispatches to the
// commands (`init`, `join`, `reset`, `token`, `certs`, `noop`), which use the
// effects (`api`, `etcd`, `kubelet`, `certificates`, `preflight`) and the
// shared pieces (`config`, `helpers`, `log`).
mod api;
mod certificates;
mod certs;
mod cli;
mod config;
mod etcd;
mod helpers;
mod init;
mod join;
mod kubelet;
mod log;
mod noop;
mod preflight;
mod reset;
#[cfg(test)]
mod tests;
mod token;

use crate::cli::run;
use crate::etcd::watchdog;
use crate::log::log_invocation;
use std::process::ExitCode;
use std::time::Duration;

/// The kubeadm release this stand-in imitates.
const VERSION: &str = "v1.31.2";
/// The only config API version modelled.
const CONFIG_API: &str = "kubeadm.k8s.io/v1beta4";
/// Where kubeadm keeps things on a real node, refused unless allowed.
const SYSTEM_PATHS: &[&str] = &["/etc/kubernetes", "/var/lib/etcd"];
/// kubeadm's default `--cert-dir`.
const DEFAULT_CERT_DIR: &str = "/etc/kubernetes/pki";
/// Lifetime of the uploaded control-plane certificates (kubeadm: 2 h).
const CERTS_TTL: Duration = Duration::from_secs(2 * 3600);
/// Annotation on `kubeadm-certs`: hex SHA-256 of the certificate key.
const KEY_HASH_ANNOTATION: &str = "kbtest.kubeboot.dev/certificate-key-sha256";
/// Annotation on `kubeadm-certs`: RFC 3339 expiry (now + 2 h at upload).
const CERTS_EXPIRY_ANNOTATION: &str = "kbtest.kubeboot.dev/expires";
/// Annotation on an etcd mirror Pod that real kubeadm reads etcd members from.
const ETCD_URL_ANNOTATION: &str = "kubeadm.kubernetes.io/etcd.advertise-client-urls";
const CONTROL_PLANE_LABEL: &str = "node-role.kubernetes.io/control-plane";
const EXCLUDE_LB_LABEL: &str = "node.kubernetes.io/exclude-from-external-load-balancers";
const DEFAULT_TOKEN_GROUP: &str = "system:bootstrappers:kubeadm:default-node-token";
const TOKEN_FORM: &str = r"^([a-z0-9]{6})\.([a-z0-9]{16})$";
const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;
/// `1` selects the no-op `init` and `join` (see the module docs).
const NOOP_ENV: &str = "KBTEST_KUBEADM_NOOP";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("__kbtest-watchdog") {
        watchdog(&args[1..]);
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start a tokio runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let code = match runtime.block_on(run(&args)) {
        Ok(()) => 0,
        Err(f) => {
            eprintln!("{}", f.0);
            eprintln!("To see the stack trace of this error execute with --v=5 or higher");
            1
        }
    };
    log_invocation(&args, code);
    ExitCode::from(code)
}
