//! `kubeboot daemon`: runs [`crate::daemon`] on this node's context plus the
//! AWS clients only the daemon uses, until SIGTERM.

use super::{node_context, stop_on_signal, Cli, DaemonArgs};
use crate::error::Error;
use std::process::ExitCode;

pub(super) async fn run(cli: &Cli, args: &DaemonArgs) -> Result<ExitCode, Error> {
    let ctx = node_context(cli, &args.sources).await?;
    let rx = stop_on_signal()?;

    let queue =
        ctx.cfg.aws.lifecycle_queue_url.as_ref().map(|url| {
            crate::aws::sqs::Queue::new(crate::aws::sqs_client(&ctx.aws, &ctx.cfg), url)
        });
    let hooks =
        crate::aws::autoscaling::Hooks::new(crate::aws::autoscaling_client(&ctx.aws, &ctx.cfg));
    let imds = crate::identity::Imds::new(&ctx.cfg.imds)?;
    let instances = crate::aws::ec2::Instances::new(crate::aws::ec2_client(&ctx.aws, &ctx.cfg));
    // Configuration refuses a control plane with backups on and no bucket.
    let backups = (ctx.cfg.node.role == crate::config::Role::ControlPlane
        && ctx.cfg.backup.enabled)
        .then(|| crate::backup::Backups::from_config(&ctx.aws, &ctx.cfg).ok())
        .flatten();
    let issuer = (ctx.cfg.node.role == crate::config::Role::ControlPlane)
        .then(|| crate::issuer::Publisher::from_config(&ctx.aws, &ctx.cfg))
        .flatten();
    let daemon = crate::daemon::Daemon {
        backups,
        issuer,
        addons: Default::default(),
        leading: Default::default(),
        queue,
        hooks,
        imds,
        instances,
        suspects: Default::default(),
        etcd_leader: Default::default(),
        ctx: ctx.with_stop(rx.clone()),
    };
    crate::systemd::ready("daemon: loops running");
    let watchdog = tokio::spawn(crate::systemd::watchdog());
    daemon.run(rx).await;
    watchdog.abort();
    crate::metrics::global()
        .flush(crate::metrics::FLUSH_GRACE)
        .await;
    Ok(ExitCode::SUCCESS)
}
