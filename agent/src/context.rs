//! The node context: what `kubeboot bootstrap` and `kubeboot daemon` both
//! work with (this node's configuration, identity and clients), built in one
//! place, [`Context::for_node`], and handed to the command that runs, the
//! way a kube-rs controller hands its `Context` to every reconcile.

use crate::config::{Config, MetricsSink};
use crate::identity::Identity;
use crate::join_material::JoinStore;
use crate::kubeadm::Kubeadm;
use crate::lock::dynamo::DynamoLockStore;
use crate::lock::{LockStore, Locker, Owner};
use crate::registry::dynamo::DynamoRegistryStore;
use crate::registry::{Registry, RegistryStore};
use crate::telemetry::{self, ContextKey};
use std::sync::Arc;

/// One node's shared parts; generic over the stores so tests can inject faults.
pub struct Context<L: LockStore, R: RegistryStore> {
    pub cfg: Config,
    pub identity: Identity,
    pub locker: Locker<L>,
    pub registry: Registry<R>,
    pub join: JoinStore,
    pub kubeadm: Kubeadm,
    /// Region, endpoints and credentials: further AWS clients (SQS, EC2,
    /// CloudFormation...) are made from it by the command that needs them.
    pub aws: aws_config::SdkConfig,
}

/// The context of a real node: its stores are DynamoDB.
pub type NodeContext = Context<DynamoLockStore, DynamoRegistryStore>;

impl NodeContext {
    /// Builds this node's parts from its configuration: the logging context
    /// and the metrics first (so what follows is reported), then the
    /// identity from instance metadata, then the AWS clients in its region.
    /// Generic over the caller's error so this module stays below it.
    pub async fn for_node<E>(cfg: Config) -> Result<Self, E>
    where
        E: From<crate::identity::Error> + From<crate::aws::Error>,
    {
        telemetry::set_context(ContextKey::Cluster, cfg.cluster.name.clone());
        telemetry::set_context(ContextKey::Role, cfg.node.role.as_str());
        let metrics = crate::metrics::Metrics::start(
            crate::metrics::Origin {
                namespace: cfg.metrics.namespace.clone(),
                cluster: cfg.cluster.name.clone(),
                role: cfg.node.role.as_str().to_string(),
                instance_id: None,
                log_group: (cfg.metrics.sink == MetricsSink::Agent)
                    .then(|| cfg.metrics.log_group.clone())
                    .flatten(),
            },
            crate::metrics::Destination::from_config(&cfg.metrics),
            cfg.metrics.buffer,
        );
        crate::metrics::install(metrics.clone());
        let identity = crate::identity::Imds::new(&cfg.imds)?.identity().await?;
        metrics.set_instance_id(&identity.instance_id);
        telemetry::set_context(ContextKey::InstanceId, identity.instance_id.clone());
        let region = cfg
            .aws
            .region
            .clone()
            .unwrap_or_else(|| identity.region.clone());
        let aws = crate::aws::sdk_config(&cfg, &region).await?;
        let ddb = crate::aws::dynamodb_client(&aws, &cfg);
        let locks = Arc::new(DynamoLockStore::new(
            ddb.clone(),
            &cfg.aws.table,
            &cfg.cluster.name,
        ));
        let registry = Registry::new(Arc::new(DynamoRegistryStore::new(
            ddb,
            &cfg.aws.table,
            &cfg.cluster.name,
        )));
        Ok(Context {
            locker: Locker::new(
                locks,
                Owner::new(&identity.instance_id),
                crate::lock::Settings::from_config(&cfg.lock),
            ),
            registry,
            join: JoinStore::from_config(&aws, &cfg),
            kubeadm: Kubeadm::from_config(&cfg),
            identity,
            cfg,
            aws,
        })
    }
}

impl<L: LockStore, R: RegistryStore> Context<L, R> {
    /// The same context with its kubeadm stopped when `stop` turns true
    /// (SIGTERM): a command's stop reaches a running kubeadm step.
    pub fn with_stop(mut self, stop: tokio::sync::watch::Receiver<bool>) -> Self {
        self.kubeadm = self.kubeadm.with_stop(stop);
        self
    }
}
