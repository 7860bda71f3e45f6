//! `kubeboot bootstrap`: runs [`crate::bootstrap`] on this node's context,
//! signals the stack when the node is in, and reports the outcome to
//! systemd and the metrics.

use super::{node_context, stop_on_signal, BootstrapArgs, Cli, LOG_TARGET};
use crate::error::Error;
use std::process::ExitCode;

pub(super) async fn run(cli: &Cli, args: &BootstrapArgs) -> Result<ExitCode, Error> {
    let started = std::time::Instant::now();
    let ctx = node_context(cli, &args.sources).await?;
    let stop = stop_on_signal()?;
    let bootstrap = crate::bootstrap::Bootstrap {
        ctx: ctx.with_stop(stop.clone()),
    };
    crate::systemd::status("bootstrapping");
    let mut stopped = stop.clone();
    let outcome = until_stopped(bootstrap.run(), stop, &bootstrap.ctx.kubeadm).await;
    if outcome.is_ok() {
        // Only now, the member confirmed and recorded (or found so by an
        // earlier run): the stack's rolling update may take the next one.
        let signal = crate::cloudformation::signal_in_service(
            &bootstrap.ctx.aws,
            &bootstrap.ctx.cfg,
            &bootstrap.ctx.identity.instance_id,
        );
        tokio::select! {
            () = signal => {}
            _ = stopped.wait_for(|s| *s) => tracing::warn!(target: LOG_TARGET, "stopped before the stack signal was answered; the next start signals again"),
        }
    }
    let elapsed = crate::metrics::ms(started.elapsed());
    let path = match &outcome {
        Ok(done) => done.path,
        Err(_) => bootstrap.attempted_path(),
    }
    .map(crate::bootstrap::Path::as_str)
    .unwrap_or("unknown");
    let result = match outcome {
        Ok(done) => {
            crate::metrics::emit(
                &[
                    (crate::metrics::BOOTSTRAP_SUCCESS, 1.0),
                    (crate::metrics::BOOTSTRAP_DURATION, elapsed),
                ],
                &[("Path", path)],
            );
            tracing::info!(target: LOG_TARGET, run_id = %done.run_id, path, "node bootstrapped");
            crate::systemd::ready(&format!("bootstrapped ({path})"));
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            crate::metrics::emit(
                &[
                    (crate::metrics::BOOTSTRAP_FAILURE, 1.0),
                    (crate::metrics::BOOTSTRAP_DURATION, elapsed),
                ],
                &[("Path", path)],
            );
            let code = crate::catalogue::Coded::code(&e);
            crate::systemd::status(&format!("bootstrap failed ({path}): [{code}] {e}"));
            Err(e.into())
        }
    };
    crate::metrics::global()
        .flush(crate::metrics::FLUSH_GRACE)
        .await;
    result
}

/// How long a stopped bootstrap gets to end a running kubeadm step
/// (kubeadm's SIGTERM-to-SIGKILL grace, then releasing its lock) before the
/// process exits anyway; below the unit's `TimeoutStopSec`.
const BOOTSTRAP_STOP_WAIT: std::time::Duration = std::time::Duration::from_secs(20);

/// Runs bootstrap until it ends or a stop is asked. Then a running kubeadm
/// is stopped by the flag and its step given [`BOOTSTRAP_STOP_WAIT`] to fail
/// and release its lock; any other wait (a lock, join material, etcd) is
/// abandoned at once (a lease held then expires on its own).
async fn until_stopped<T>(
    work: impl std::future::Future<Output = Result<T, crate::bootstrap::Error>>,
    mut stop: tokio::sync::watch::Receiver<bool>,
    kubeadm: &crate::kubeadm::Kubeadm,
) -> Result<T, crate::bootstrap::Error> {
    tokio::pin!(work);
    tokio::select! {
        done = &mut work => return done,
        _ = stop.wait_for(|s| *s) => {}
    }
    if !kubeadm.is_running() {
        return Err(crate::bootstrap::Error::Stopped);
    }
    match tokio::time::timeout(BOOTSTRAP_STOP_WAIT, work).await {
        Ok(done) => done,
        Err(_) => Err(crate::bootstrap::Error::Stopped),
    }
}
