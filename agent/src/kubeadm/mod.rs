//! Running kubeadm: never through a shell (I7). Every call is an argv, a
//! timeout from `[timeouts]`, and captured output that is scrubbed of
//! secrets before it goes anywhere; a failure carries kubeadm's last words
//! and a hint matched from them.

pub mod config;

use crate::secret::{scrub, Secret};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;

/// How much of each stream is kept (kubeadm's last words are what matter).
const KEEP_BYTES: usize = 64 * 1024;
/// How much of stderr goes into an error.
const TAIL_BYTES: usize = 4 * 1024;

/// What a finished kubeadm run printed, scrubbed.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

/// kubeadm failures.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot start {}: {source}", binary.display())]
    Spawn {
        binary: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write kubeadm configuration {}: {source}", path.display())]
    WriteConfig {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("`kubeadm {command}` did not finish within {}; it was killed. Last output:\n{tail}", crate::config::value::format_duration(*after))]
    TimedOut {
        command: &'static str,
        after: Duration,
        tail: String,
    },
    #[error("`kubeadm {command}` was stopped: the agent was asked to stop (SIGTERM). Last output:\n{tail}")]
    Stopped { command: &'static str, tail: String },
    #[error("`kubeadm {command}` failed (exit {}). Last output:\n{tail}", code.map_or("by signal".to_string(), |c| c.to_string()))]
    Failed {
        command: &'static str,
        code: Option<i32>,
        tail: String,
        hint: &'static str,
    },
    #[error("{} is kubeadm {found}, but cluster.kubernetes_version is {wanted}: this image was built for another Kubernetes version", binary.display())]
    VersionMismatch {
        binary: PathBuf,
        found: String,
        wanted: String,
    },
    #[error("cannot tell the version of {}: `kubeadm version -o short` printed {printed:?}", binary.display())]
    VersionUnknown { binary: PathBuf, printed: String },
}

/// Longest `kubeadm version` may take (it reads nothing but itself).
const VERSION_TIMEOUT: Duration = Duration::from_secs(30);

/// `v1.31.2` or `1.31.2` (a build suffix such as `-eks-1` or `+abc` is
/// not part of the release) as `1.31.2`; `None` for anything else.
pub fn release_of(version: &str) -> Option<String> {
    let bare = version.trim().trim_start_matches('v');
    let release = bare.split(['-', '+']).next().unwrap_or_default();
    let parts: Vec<&str> = release.split('.').collect();
    (parts.len() == 3
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit())))
    .then(|| release.to_string())
}

/// The `[timeouts]` key that bounds a kubeadm command (the leader's token
/// and upload-certs calls and the join phases share `kubeadm_join`).
fn timeout_key(command: &str) -> &'static str {
    match command {
        "init" => "kubeadm_init",
        "reset" => "kubeadm_reset",
        _ => "kubeadm_join",
    }
}

/// The one way the agent starts a process (I7): a binary and an argv, never
/// a shell; stdin closed, stdout and stderr captured, killed if dropped.
/// systemd's notify socket is this unit's: a child (or anything it starts)
/// must not say READY or feed the watchdog.
fn argv_command<S: AsRef<OsStr>>(binary: &Path, args: &[S]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(binary);
    cmd.args(args)
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .env_remove("WATCHDOG_PID")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

/// Runs another of the node's tools by argv (etcd's restore tool for
/// `kubeboot restore`) through [`argv_command`], with `env` added; its
/// output, or `None` when it ran past `timeout` and was killed.
pub async fn run_tool<S: AsRef<OsStr>>(
    binary: &Path,
    args: &[S],
    env: &[(&str, &str)],
    timeout: Duration,
) -> std::io::Result<Option<std::process::Output>> {
    let mut cmd = argv_command(binary, args);
    cmd.envs(env.iter().copied());
    match tokio::time::timeout(timeout, cmd.output()).await {
        Ok(out) => out.map(Some),
        Err(_) => Ok(None),
    }
}

/// Maps kubeadm's output to the likely cause; pure, so every pattern is tested.
pub fn diagnose(output: &str) -> &'static str {
    const PATTERNS: &[(&[&str], &str)] = &[
        (&["[ERROR Port-", "is in use"], "a previous attempt left components running on this node: it must be reset (`kubeadm reset -f`) before retrying"),
        // Token before pin: both start "couldn't validate the identity of the API Server".
        (&["could not find a JWS signature", "failed to verify JWS signature", "token id", "Unauthorized", "invalid bootstrap token"],
            "the bootstrap token is unknown or expired: the leader must refresh the join material"),
        (&["none of the public keys", "cluster CA found in cluster-info ConfigMap is invalid"],
            "the CA public-key pin does not match the cluster's CA: the join material is stale or belongs to another cluster"),
        (&["kubeadm-certs", "error downloading the secret", "couldn't download", "decrypt", "certificate key", "error decoding secret data"],
            "the uploaded control-plane certificates are gone (kubeadm deletes them after 2 h) or the certificate key is wrong: refresh the join material"),
        (&["check-etcd", "etcd cluster is not healthy", "etcdserver: unhealthy cluster", "too many learner members"],
            "etcd is not healthy or still holds a stale member/learner: stale members must be removed before a join"),
        (&["wait-control-plane", "timed out waiting for the condition", "context deadline exceeded"],
            "the control plane did not come up in time: check `journalctl -u kubelet` and `crictl ps -a`"),
        (&["connection refused", "no route to host", "i/o timeout"],
            "the API endpoint is unreachable: check the load balancer's target group health and the security groups"),
    ];
    PATTERNS
        .iter()
        .find(|(needles, _)| needles.iter().any(|n| output.contains(n)))
        .map_or(
            "see kubeadm's last output above and `journalctl -u kubelet`",
            |(_, hint)| hint,
        )
}

/// The kubeadm executable and where its configs go.
/// A rendered kubeadm configuration on disk. It may hold the bootstrap token
/// or the certificate key, so it lives exactly as long as the kubeadm run
/// that reads it: dropped (success, failure, timeout, a stopped agent's
/// cancelled future) means deleted.
#[derive(Debug)]
struct RenderedFile(PathBuf);

impl RenderedFile {
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for RenderedFile {
    fn drop(&mut self) {
        match std::fs::remove_file(&self.0) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %self.0.display(), error = %e, "cannot delete a rendered kubeadm configuration (it may hold a secret); delete it by hand")
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct Kubeadm {
    binary: PathBuf,
    run_dir: PathBuf,
    /// `paths.kubernetes_dir`; `reset` cleans its `pki/`.
    kubernetes_dir: PathBuf,
    pub init_timeout: Duration,
    pub join_timeout: Duration,
    pub reset_timeout: Duration,
    /// Set to `true` when the agent must stop: a running kubeadm gets
    /// SIGTERM (then SIGKILL after [`STOP_GRACE`]) instead of being left
    /// behind, and its step fails with [`Error::Stopped`].
    pub stop: Option<tokio::sync::watch::Receiver<bool>>,
    /// How many kubeadm processes this handle (and its clones) run now.
    running: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Kubeadm {
    /// From `[binaries]`, `[paths]` and `[timeouts]`.
    pub fn from_config(cfg: &crate::config::Config) -> Self {
        Kubeadm {
            binary: cfg.binaries.kubeadm.clone(),
            run_dir: cfg.paths.run_dir.clone(),
            kubernetes_dir: cfg.paths.kubernetes_dir.clone(),
            stop: None,
            running: Default::default(),
            init_timeout: cfg.timeouts.kubeadm_init,
            join_timeout: cfg.timeouts.kubeadm_join,
            reset_timeout: cfg.timeouts.kubeadm_reset,
        }
    }

    /// Explicit binary, directories and one timeout for every command.
    pub fn new(
        binary: PathBuf,
        run_dir: PathBuf,
        kubernetes_dir: PathBuf,
        timeout: Duration,
    ) -> Self {
        Kubeadm {
            binary,
            run_dir,
            kubernetes_dir,
            init_timeout: timeout,
            join_timeout: timeout,
            reset_timeout: timeout,
            stop: None,
            running: Default::default(),
        }
    }

    /// Whether a kubeadm started through this handle (or a clone) runs now.
    pub fn is_running(&self) -> bool {
        self.running.load(std::sync::atomic::Ordering::SeqCst) > 0
    }

    /// Stops running kubeadm when `stop` turns `true` (see [`Kubeadm::stop`]).
    pub fn with_stop(mut self, stop: tokio::sync::watch::Receiver<bool>) -> Self {
        self.stop = Some(stop);
        self
    }

    /// `kubeadm version -o short` must be the release `wanted`
    /// (`cluster.kubernetes_version`): a kubeadm of another version installs
    /// another control plane than the one the image pre-pulled, beside a
    /// kubelet of the image's version, and fails (or half-works) far from
    /// the cause. Returns what kubeadm printed.
    pub async fn check_version(&self, wanted: &str) -> Result<String, Error> {
        let timeout = self.join_timeout.min(VERSION_TIMEOUT);
        let out = self
            .run(
                "version",
                &["version".as_ref(), "-o".as_ref(), "short".as_ref()],
                timeout,
                &[],
            )
            .await?;
        let printed = out.stdout.trim().to_string();
        let found = release_of(&printed).ok_or_else(|| Error::VersionUnknown {
            binary: self.binary.clone(),
            printed: printed.clone(),
        })?;
        if release_of(wanted).as_deref() != Some(found.as_str()) {
            return Err(Error::VersionMismatch {
                binary: self.binary.clone(),
                found: printed,
                wanted: wanted.to_string(),
            });
        }
        Ok(printed)
    }

    /// `kubeadm init --config <file> --upload-certs`, with
    /// `--ignore-preflight-errors=<check>` when one is named (an init over
    /// a restored etcd data directory).
    pub async fn init(
        &self,
        rendered: &config::Rendered,
        secrets: &[&Secret<String>],
        ignore_preflight: Option<&str>,
    ) -> Result<Outcome, Error> {
        let file = self.write("kubeadm-init.yaml", rendered)?;
        let path = file.path();
        let ignore = ignore_preflight.map(|c| format!("--ignore-preflight-errors={c}"));
        let mut args = vec![
            "init".as_ref(),
            "--config".as_ref(),
            path.as_os_str(),
            "--upload-certs".as_ref(),
        ];
        if let Some(flag) = &ignore {
            args.push(flag.as_ref());
        }
        self.run("init", &args, self.init_timeout, secrets).await
    }

    /// `kubeadm join --config <file>`.
    pub async fn join(
        &self,
        rendered: &config::Rendered,
        secrets: &[&Secret<String>],
    ) -> Result<Outcome, Error> {
        let file = self.write("kubeadm-join.yaml", rendered)?;
        let path = file.path();
        let args = ["join".as_ref(), "--config".as_ref(), path.as_os_str()];
        self.run("join", &args, self.join_timeout, secrets).await
    }

    /// `kubeadm join phase control-plane-prepare download-certs` then
    /// `... certs`, with the join config: the shared CAs (opened with the
    /// certificate key) and this node's own certificates, among them the
    /// etcd client identity a joining control plane needs before it can
    /// check etcd's health or remove a stale member. Until then the node has
    /// no `pki/` at all. The full `kubeadm join` that follows reuses them
    /// (its control-plane preflight does not refuse an existing CA).
    pub async fn join_prepare_certs(
        &self,
        rendered: &config::Rendered,
        secrets: &[&Secret<String>],
    ) -> Result<(), Error> {
        let file = self.write("kubeadm-join.yaml", rendered)?;
        let path = file.path();
        for (command, phase) in [
            (
                "join phase control-plane-prepare download-certs",
                "download-certs",
            ),
            ("join phase control-plane-prepare certs", "certs"),
        ] {
            let args = [
                "join".as_ref(),
                "phase".as_ref(),
                "control-plane-prepare".as_ref(),
                phase.as_ref(),
                "--config".as_ref(),
                path.as_os_str(),
            ];
            self.run(command, &args, self.join_timeout, secrets).await?;
        }
        Ok(())
    }

    /// `kubeadm token create --config <file> --kubeconfig <admin.conf>`: a new
    /// bootstrap token (the leader's join-material refresh).
    pub async fn token_create(
        &self,
        rendered: &config::Rendered,
        secrets: &[&Secret<String>],
    ) -> Result<Outcome, Error> {
        self.run_as_admin(
            "token create",
            &["token", "create"],
            "kubeadm-token.yaml",
            rendered,
            secrets,
        )
        .await
    }

    /// `kubeadm init phase upload-certs --upload-certs --config <file>`:
    /// re-uploads the control-plane certificates under a new key.
    pub async fn upload_certs(
        &self,
        rendered: &config::Rendered,
        secrets: &[&Secret<String>],
    ) -> Result<Outcome, Error> {
        self.run_as_admin(
            "upload-certs",
            &["init", "phase", "upload-certs", "--upload-certs"],
            "kubeadm-upload-certs.yaml",
            rendered,
            secrets,
        )
        .await
    }

    /// `kubeadm <words> --config <file> --kubeconfig <admin.conf>`: a command
    /// the leader runs against the cluster with the admin credentials, its
    /// configuration written 0600 to `file_name` and gone afterwards.
    async fn run_as_admin(
        &self,
        command: &'static str,
        words: &[&str],
        file_name: &str,
        rendered: &config::Rendered,
        secrets: &[&Secret<String>],
    ) -> Result<Outcome, Error> {
        let file = self.write(file_name, rendered)?;
        let admin = self.kubernetes_dir.join("admin.conf");
        let mut args: Vec<&OsStr> = words.iter().map(OsStr::new).collect();
        args.extend([
            OsStr::new("--config"),
            file.path().as_os_str(),
            OsStr::new("--kubeconfig"),
            admin.as_os_str(),
        ]);
        self.run(command, &args, self.join_timeout, secrets).await
    }

    /// `kubeadm certs renew all --cert-dir <kubernetes_dir>/pki`: re-signs
    /// this node's leaf certificates and the kubeconfigs' client
    /// certificates with the local CAs, each keeping its names and usages.
    /// kubeadm reads the ClusterConfiguration from the cluster when it
    /// can and goes on without it (renewal must work on a broken control
    /// plane); the restart that loads them is the caller's.
    pub async fn certs_renew_all(&self) -> Result<Outcome, Error> {
        let cert_dir = self.kubernetes_dir.join("pki");
        let admin = self.kubernetes_dir.join("admin.conf");
        let args = [
            "certs".as_ref(),
            "renew".as_ref(),
            "all".as_ref(),
            "--cert-dir".as_ref(),
            cert_dir.as_os_str(),
            "--kubeconfig".as_ref(),
            admin.as_os_str(),
        ];
        self.run("certs renew", &args, self.join_timeout, &[]).await
    }

    /// `kubeadm reset --force --cert-dir <kubernetes_dir>/pki`: cleans up a
    /// failed local attempt (and removes this node's etcd member, as kubeadm does).
    pub async fn reset(&self) -> Result<Outcome, Error> {
        let cert_dir = self.kubernetes_dir.join("pki");
        let args = [
            "reset".as_ref(),
            "--force".as_ref(),
            "--cert-dir".as_ref(),
            cert_dir.as_os_str(),
        ];
        self.run("reset", &args, self.reset_timeout, &[]).await
    }

    /// Writes a rendered configuration (0600) for one kubeadm run; the file
    /// is deleted when the returned guard drops, however the run ends.
    fn write(&self, name: &str, rendered: &config::Rendered) -> Result<RenderedFile, Error> {
        let path = self.run_dir.join(name);
        config::write_private(&path, rendered).map_err(|source| Error::WriteConfig {
            path: path.clone(),
            source,
        })?;
        Ok(RenderedFile(path))
    }

    async fn run(
        &self,
        command: &'static str,
        args: &[&std::ffi::OsStr],
        timeout: Duration,
        secrets: &[&Secret<String>],
    ) -> Result<Outcome, Error> {
        let started = Instant::now();
        let _running = Running::new(&self.running);
        tracing::info!(command, binary = %self.binary.display(), timeout_s = timeout.as_secs(), "running kubeadm");
        let mut child =
            argv_command(&self.binary, args)
                .spawn()
                .map_err(|source| Error::Spawn {
                    binary: self.binary.clone(),
                    source,
                })?;
        let stdout = tokio::spawn(read_tail(child.stdout.take()));
        let stderr = tokio::spawn(read_tail(child.stderr.take()));
        let mut stopped = false;
        let status = tokio::select! {
            waited = tokio::time::timeout(timeout, child.wait()) => match waited {
                Ok(status) => Some(status.map_err(|source| Error::Spawn {
                    binary: self.binary.clone(),
                    source,
                })?),
                Err(_) => {
                    let _ = child.kill().await;
                    None
                }
            },
            () = stop_requested(self.stop.clone()) => {
                tracing::warn!(command, "stopping kubeadm: the agent was asked to stop");
                terminate(&mut child).await;
                stopped = true;
                None
            }
        };
        let clean = |bytes: Vec<u8>| scrub(&String::from_utf8_lossy(&bytes), secrets);
        let out = Outcome {
            stdout: clean(stdout.await.unwrap_or_default()),
            stderr: clean(stderr.await.unwrap_or_default()),
            elapsed: started.elapsed(),
        };
        let tail = tail_of(&format!("{}{}", out.stdout, out.stderr));
        match status {
            None if stopped => Err(Error::Stopped { command, tail }),
            None => Err(Error::TimedOut {
                command,
                after: timeout,
                tail,
            }),
            Some(s) if s.success() => {
                tracing::info!(
                    command,
                    elapsed_ms = out.elapsed.as_millis() as u64,
                    "kubeadm succeeded"
                );
                Ok(out)
            }
            Some(s) => Err(Error::Failed {
                command,
                code: s.code(),
                hint: diagnose(&out.stderr),
                tail,
            }),
        }
    }
}

/// Counts a kubeadm run for [`Kubeadm::is_running`] while it lives.
struct Running(std::sync::Arc<std::sync::atomic::AtomicUsize>);

impl Running {
    fn new(count: &std::sync::Arc<std::sync::atomic::AtomicUsize>) -> Self {
        count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Running(count.clone())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// How long a stopped kubeadm gets between SIGTERM and SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(10);

/// Resolves once `stop` turns `true`; never without one (or once its
/// sender is gone without asking).
async fn stop_requested(stop: Option<tokio::sync::watch::Receiver<bool>>) {
    if let Some(mut rx) = stop {
        if rx.wait_for(|s| *s).await.is_ok() {
            return;
        }
    }
    std::future::pending::<()>().await;
}

/// SIGTERM, then SIGKILL if kubeadm has not exited within [`STOP_GRACE`]:
/// a kubeadm stopped half-way is reset by the next start, one killed
/// without a chance would be too, but a clean stop lets it say why.
async fn terminate(child: &mut tokio::process::Child) {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    }
    if tokio::time::timeout(STOP_GRACE, child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
}

/// Reads a stream to the end, keeping its last [`KEEP_BYTES`].
async fn read_tail<R: tokio::io::AsyncRead + Unpin>(stream: Option<R>) -> Vec<u8> {
    let Some(mut stream) = stream else {
        return Vec::new();
    };
    let mut kept = Vec::new();
    let mut buf = [0u8; 8192];
    while let Ok(n) = stream.read(&mut buf).await {
        if n == 0 {
            break;
        }
        kept.extend_from_slice(&buf[..n]);
        if kept.len() > 2 * KEEP_BYTES {
            kept.drain(..kept.len() - KEEP_BYTES);
        }
    }
    if kept.len() > KEEP_BYTES {
        kept.drain(..kept.len() - KEEP_BYTES);
    }
    kept
}

fn tail_of(text: &str) -> String {
    let start = text.len().saturating_sub(TAIL_BYTES);
    let start = (start..text.len())
        .find(|i| text.is_char_boundary(*i))
        .unwrap_or(text.len());
    text[start..].trim_end().to_string()
}

/// Where a test or the bootstrap finds the configs kubeadm was given.
pub fn config_path(run_dir: &Path, command: &str) -> PathBuf {
    run_dir.join(format!("kubeadm-{command}.yaml"))
}

impl crate::catalogue::Coded for self::Error {
    fn entry(&self) -> &'static crate::catalogue::Entry {
        use self::Error as E;
        match self {
            E::Spawn { .. } => &crate::catalogue::KUBEADM_SPAWN,
            E::WriteConfig { .. } => &crate::catalogue::KUBEADM_WRITE_CONFIG,
            E::TimedOut { .. } => &crate::catalogue::KUBEADM_TIMED_OUT,
            E::Failed { .. } => &crate::catalogue::KUBEADM_FAILED,
            E::Stopped { .. } => &crate::catalogue::KUBEADM_STOPPED,
            E::VersionMismatch { .. } | E::VersionUnknown { .. } => {
                &crate::catalogue::KUBEADM_VERSION
            }
        }
    }

    fn detail(&self) -> Option<String> {
        match self {
            Error::TimedOut { command, .. } => {
                Some(format!("its timeout is timeouts.{}", timeout_key(command)))
            }
            Error::Failed { hint, .. } => Some((*hint).to_string()),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalogue::Coded;
    use std::os::unix::fs::PermissionsExt;

    /// A fake kubeadm for the runner's own tests (the e2e tests use the real stand-in).
    fn fake(dir: &Path, body: &str) -> PathBuf {
        let path = dir.join("kubeadm");
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    fn rendered() -> config::Rendered {
        Secret::new("{\"kind\":\"JoinConfiguration\"}\n".into())
    }

    #[tokio::test]
    async fn init_passes_an_argv_and_a_private_config_that_is_gone_afterwards() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("args");
        let mode = dir.path().join("mode");
        let bin = fake(
            dir.path(),
            &format!(
                "printf '%s\\n' \"$@\" > {}; stat -c %a \"$3\" > {}; echo ok",
                log.display(),
                mode.display()
            ),
        );
        let k = Kubeadm::new(
            bin,
            dir.path().join("run"),
            dir.path().join("k8s"),
            Duration::from_secs(10),
        );
        let out = k.init(&rendered(), &[], None).await.unwrap();
        assert_eq!(out.stdout.trim(), "ok");
        let config = config_path(&dir.path().join("run"), "init");
        let args = std::fs::read_to_string(&log).unwrap();
        assert_eq!(
            args,
            format!("init\n--config\n{}\n--upload-certs\n", config.display())
        );
        assert_eq!(std::fs::read_to_string(&mode).unwrap().trim(), "600");
        assert!(
            !config.exists(),
            "the config (it holds the token and the certificate key) outlived kubeadm"
        );
        // A failing or timed-out run leaves nothing behind either.
        let failing = Kubeadm::new(
            fake(dir.path(), "sleep 5"),
            dir.path().join("run"),
            dir.path().join("k8s"),
            Duration::from_millis(200),
        );
        failing.join(&rendered(), &[]).await.unwrap_err();
        assert!(!config_path(&dir.path().join("run"), "join").exists());
    }

    #[test]
    fn a_release_is_major_minor_patch_with_or_without_v_and_build_suffix() {
        assert_eq!(release_of("v1.31.2").as_deref(), Some("1.31.2"));
        assert_eq!(release_of("1.31.2\n").as_deref(), Some("1.31.2"));
        assert_eq!(release_of("v1.31.2-eks-1").as_deref(), Some("1.31.2"));
        assert_eq!(release_of("v1.31.2+abcdef").as_deref(), Some("1.31.2"));
        for bad in [
            "",
            "v1.31",
            "1.31.x",
            "kubeadm version: &version.Info{}",
            "v1..2",
        ] {
            assert_eq!(release_of(bad), None, "{bad:?}");
        }
    }

    /// kubeadm's `version -o short` against cluster.kubernetes_version:
    /// the same release passes, another one or an unreadable answer is
    /// KB-KUBEADM-006 (the process exits 2 for it: error/provoke.rs).
    #[tokio::test]
    async fn kubeadm_of_another_release_than_the_cluster_is_refused_before_anything_runs() {
        let dir = tempfile::tempdir().unwrap();
        let k = |body: &str| {
            Kubeadm::new(
                fake(dir.path(), body),
                dir.path().join("run"),
                dir.path().join("k8s"),
                Duration::from_secs(10),
            )
        };
        let ok = k("[ \"$*\" = 'version -o short' ] && echo v1.31.2");
        assert_eq!(ok.check_version("1.31.2").await.unwrap(), "v1.31.2");
        assert_eq!(ok.check_version("v1.31.2").await.unwrap(), "v1.31.2");
        let older = k("echo v1.31.1");
        let err = older.check_version("1.31.2").await.unwrap_err();
        assert!(matches!(err, Error::VersionMismatch { .. }), "{err}");
        assert_eq!(err.code(), "KB-KUBEADM-006");
        assert!(
            err.to_string().contains("v1.31.1") && err.to_string().contains("1.31.2"),
            "{err}"
        );
        let garbled = k("echo 'not a version'");
        let err = garbled.check_version("1.31.2").await.unwrap_err();
        assert!(matches!(err, Error::VersionUnknown { .. }), "{err}");
        assert_eq!(err.code(), "KB-KUBEADM-006");
        // A kubeadm that fails is its failure, not a version problem.
        let failing = k("exit 3");
        let err = failing.check_version("1.31.2").await.unwrap_err();
        assert!(matches!(err, Error::Failed { code: Some(3), .. }), "{err}");
    }

    #[tokio::test]
    async fn failures_carry_exit_code_scrubbed_output_and_a_hint() {
        let dir = tempfile::tempdir().unwrap();
        let token = Secret::new("abcdef.0123456789abcdef".to_string());
        let bin = fake(
            dir.path(),
            "echo 'using token abcdef.0123456789abcdef' >&2\n\
             echo 'error execution phase preflight: couldn'\"'\"'t validate the identity of the API Server: cluster CA found in cluster-info ConfigMap is invalid: none of the public keys are pinned' >&2\nexit 1",
        );
        let k = Kubeadm::new(
            bin,
            dir.path().join("run"),
            dir.path().join("k8s"),
            Duration::from_secs(10),
        );
        let err = k.join(&rendered(), &[&token]).await.unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, Error::Failed { code: Some(1), .. }), "{text}");
        assert_eq!(crate::catalogue::Coded::code(&err), "KB-KUBEADM-004");
        assert!(!text.contains("abcdef.0123456789abcdef"), "{text}");
        assert!(text.contains("couldn't validate the identity"), "{text}");
        assert!(err.hint().contains("CA public-key pin"), "{}", err.hint());
    }

    #[tokio::test]
    async fn reset_names_the_certificate_dir() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("args");
        let bin = fake(
            dir.path(),
            &format!("printf '%s\\n' \"$@\" > {}", log.display()),
        );
        let k = Kubeadm::new(
            bin,
            dir.path().join("run"),
            dir.path().join("k8s"),
            Duration::from_secs(10),
        );
        k.reset().await.unwrap();
        let args = std::fs::read_to_string(&log).unwrap();
        assert_eq!(
            args,
            format!(
                "reset\n--force\n--cert-dir\n{}\n",
                dir.path().join("k8s/pki").display()
            )
        );
    }

    #[tokio::test]
    async fn a_hung_kubeadm_is_killed_at_its_timeout_with_its_last_words() {
        let dir = tempfile::tempdir().unwrap();
        let bin = fake(
            dir.path(),
            "echo '[wait-control-plane] waiting'\nexec sleep 30",
        );
        let k = Kubeadm::new(
            bin,
            dir.path().join("run"),
            dir.path().join("k8s"),
            Duration::from_millis(500),
        );
        let started = Instant::now();
        let err = k.reset().await.unwrap_err();
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        assert!(
            matches!(
                err,
                Error::TimedOut {
                    command: "reset",
                    ..
                }
            ),
            "{err}"
        );
        assert!(
            err.to_string().contains("[wait-control-plane] waiting"),
            "{err}"
        );
        assert!(err.hint().contains("timeouts.kubeadm_reset"));
        assert_eq!(crate::catalogue::Coded::code(&err), "KB-KUBEADM-003");
    }

    #[tokio::test]
    async fn a_stop_request_terminates_a_running_kubeadm_and_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("got-sigterm");
        let bin = fake(
            dir.path(),
            &format!(
                "trap 'echo yes > {}; exit 143' TERM\necho '[kubelet-start] Starting the kubelet'\nsleep 30 >/dev/null 2>&1 &\nwait",
                marker.display()
            ),
        );
        let (tx, rx) = tokio::sync::watch::channel(false);
        let k = Kubeadm::new(
            bin,
            dir.path().join("run"),
            dir.path().join("k8s"),
            Duration::from_secs(60),
        )
        .with_stop(rx);
        let started = Instant::now();
        let stopper = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            tx.send(true).unwrap();
            tx
        });
        let err = k.reset().await.unwrap_err();
        drop(stopper.await);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        assert!(
            matches!(
                err,
                Error::Stopped {
                    command: "reset",
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("Starting the kubelet"), "{err}");
        assert_eq!(
            std::fs::read_to_string(&marker).unwrap_or_default().trim(),
            "yes",
            "kubeadm was sent SIGTERM, not killed outright"
        );
        assert_eq!(crate::catalogue::Coded::code(&err), "KB-KUBEADM-005");
    }

    #[tokio::test]
    async fn a_missing_binary_names_the_config_key() {
        let dir = tempfile::tempdir().unwrap();
        let k = Kubeadm::new(
            dir.path().join("nope"),
            dir.path().join("run"),
            dir.path().join("k8s"),
            Duration::from_secs(1),
        );
        let err = k.reset().await.unwrap_err();
        assert!(matches!(err, Error::Spawn { .. }));
        assert_eq!(crate::catalogue::Coded::code(&err), "KB-KUBEADM-001");
        assert!(err.hint().contains("binaries.kubeadm"));
    }

    #[test]
    fn diagnoses_cover_the_common_failures() {
        for (output, expected) in [
            ("[ERROR Port-6443]: Port 6443 is in use", "reset"),
            ("error execution phase preflight: couldn't validate the identity of the API Server: could not find a JWS signature in the cluster-info ConfigMap for token ID \"abcdef\"", "bootstrap token"),
            ("error execution phase preflight: couldn't validate the identity of the API Server: cluster CA found in cluster-info ConfigMap is invalid: none of the public keys \"sha256:00\" are pinned", "CA public-key pin"),
            ("error downloading the secret: Secret \"kubeadm-certs\" was not found", "certificates are gone"),
            ("error execution phase check-etcd: etcd cluster is not healthy", "stale member"),
            ("[wait-control-plane] timed out waiting for the condition", "journalctl -u kubelet"),
            ("dial tcp 10.0.0.1:6443: connect: connection refused", "load balancer"),
            ("something new", "last output"),
        ] {
            assert!(diagnose(output).contains(expected), "{output} -> {}", diagnose(output));
        }
    }
}
