//! `kubeboot lock release`: the operator's override for a dead holder.

use super::{dynamodb, load, operator_locker, print, Cli, ReleaseArgs, LOG_TARGET};
use crate::error::Error;
use std::process::ExitCode;

pub(super) async fn release(cli: &Cli, args: &ReleaseArgs) -> Result<ExitCode, Error> {
    if !args.force {
        return Err(Error::Usage(format!(
            "refusing to release the {} lock without --force; check `kubeboot status` first: \
             the holder must be dead or stuck",
            args.purpose
        )));
    }
    let loaded = load(cli, args.sources.user_data()).await?;
    let cfg = &loaded.config;
    let locker = operator_locker(cfg, dynamodb(cfg).await?);
    tracing::warn!(
        target: LOG_TARGET,
        lock = %args.purpose,
        "forcing a lock release: watching it for its lease plus lock.margin; refused if the holder renews meanwhile"
    );
    match locker.force_release(args.purpose).await {
        Ok(item) => {
            print(&format!(
                "released the {} lock held by {} (fence now {}: the old holder's writes are refused)\n",
                args.purpose, item.owner, item.fence
            ))?;
            Ok(ExitCode::SUCCESS)
        }
        Err(crate::lock::Error::NotHeld { .. }) => {
            print(&format!(
                "the {} lock is not held; nothing to release\n",
                args.purpose
            ))?;
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => Err(e.into()),
    }
}
