//! The templates in infra/ against the agent: a stack that deploys but
//! disagrees with the binary (another table key, a secret name the role cannot
//! read, an alarm on a metric nobody emits, a permission nobody uses) fails
//! here, not at 3 a.m.
//!
//! Each check returns the problems it finds instead of panicking, so the
//! negative tests can show that a template edited to grant `dynamodb:*` or to
//! drop PITR is caught.

use kubeboot::config::model::Role;
use kubeboot::iam::{self, Resource};
use kubeboot_tests::cfn::{
    cluster_stack as cluster_stack_at, commands, find_all, launch_user_data, network_stack,
    repo_template, scalar, Stack, ACCOUNT, AZS, REGION,
};
use kubeboot_tests::workspace::{kubeboot_bin, workspace_root};
use serde_json::{json, Value};
use std::collections::BTreeSet;

const STAGES: [&str; 3] = ["dev", "staging", "production"];
const NAME: &str = "blue";

fn template(file: &str) -> Value {
    repo_template(file)
}

/// kubeboot's cluster name for the stack under test (`<Stage>-<ClusterName>`).
fn cluster(s: &Stack) -> String {
    format!("{}-{}", s.params["Stage"], s.params["ClusterName"])
}

fn cluster_stack(template: Value) -> Stack {
    staged(template, "production")
}

/// The cluster stack at `stage` ([`cluster_stack_at`]).
fn staged(template: Value, stage: &str) -> Stack {
    cluster_stack_at(template, stage, NAME)
}

fn network_with(template: Value, stage: &str) -> Stack {
    network_stack(template, stage, NAME)
}

/// The network stack at `stage`.
fn network(stage: &str) -> Stack {
    network_with(template("network.json"), stage)
}

fn stack() -> Stack {
    cluster_stack(template("cluster.json"))
}

/// The cluster template at every stage.
fn stacks() -> Vec<Stack> {
    let t = template("cluster.json");
    STAGES
        .iter()
        .map(|stage| staged(t.clone(), stage))
        .collect()
}

fn assert_none(problems: Vec<String>) {
    assert!(
        problems.is_empty(),
        "infra/ disagrees with the agent:\n  {}",
        problems.join("\n  ")
    );
}

// ---------------------------------------------------------------------------
// The checks

/// The table: the agent's key schema and TTL attribute, PITR, SSE, kept on
/// stack deletion, deletion protection in production.
fn table_problems(s: &Stack) -> Vec<String> {
    let mut p = Vec::new();
    let props = s.eval(&s.resource("Table")["Properties"]);
    let keys: Vec<(String, String)> = props["KeySchema"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|k| (scalar(&k["AttributeName"]), scalar(&k["KeyType"])))
                .collect()
        })
        .unwrap_or_default();
    let want = vec![
        (
            kubeboot::table::PARTITION_KEY.to_string(),
            "HASH".to_string(),
        ),
        (kubeboot::table::SORT_KEY.to_string(), "RANGE".to_string()),
    ];
    if keys != want {
        p.push(format!(
            "table key schema {keys:?}, the agent uses {want:?}"
        ));
    }
    for attr in props["AttributeDefinitions"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if attr["AttributeType"] != "S" {
            p.push(format!("table attribute {attr} is not a string"));
        }
    }
    let ttl = &props["TimeToLiveSpecification"];
    if ttl["AttributeName"] != kubeboot::table::TTL_ATTRIBUTE || ttl["Enabled"] != true {
        p.push(format!(
            "table TTL {ttl}, the agent writes {}",
            kubeboot::table::TTL_ATTRIBUTE
        ));
    }
    if props["PointInTimeRecoverySpecification"]["PointInTimeRecoveryEnabled"] != true {
        p.push("table without point-in-time recovery".into());
    }
    if props["SSESpecification"]["SSEEnabled"] != true {
        p.push("table without server-side encryption".into());
    }
    if scalar(&props["DeletionProtectionEnabled"]) != "true" {
        p.push("production table without deletion protection".into());
    }
    p
}

/// State that outlives the stack: deleting or replacing the stack keeps it;
/// a failed first create does not. `Retain` would also keep these fixed-name
/// resources when the create that made them rolls back, and every retry would
/// then fail with "already exists": `RetainExceptOnCreate` deletes what the
/// rolled-back create made, and keeps it on every later delete. No resource
/// of the stack uses plain `Retain`.
fn retention_problems(s: &Stack) -> Vec<String> {
    let mut p: Vec<String> = [
        "Table",
        "BackupBucket",
        "AccessLogBucket",
        "ClusterKey",
        "SecretsKey",
        "JoinSecret",
        "CertificateKeySecret",
        "LogGroup",
    ]
    .iter()
    .filter(|id| {
        let r = s.resource(id);
        r["DeletionPolicy"] != "RetainExceptOnCreate" || r["UpdateReplacePolicy"] != "Retain"
    })
    .map(|id| format!("{id} is not kept on stack deletion and replacement (DeletionPolicy RetainExceptOnCreate, UpdateReplacePolicy Retain)"))
    .collect();
    p.extend(plain_retain(&s.template, "cluster.json"));
    p
}

/// Resources a failed first create would leave behind (plain `Retain`).
fn plain_retain(t: &Value, file: &str) -> Vec<String> {
    t["Resources"]
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(_, r)| r["DeletionPolicy"] == "Retain")
        .map(|(id, _)| {
            format!("{file}: {id} has DeletionPolicy Retain: a rolled-back first create leaves it behind and the retry fails with \"already exists\" (use RetainExceptOnCreate)")
        })
        .collect()
}

/// The backup bucket: versioned, SSE-KMS with the cluster key, public access
/// blocked, TLS only, a lifecycle.
fn bucket_problems(s: &Stack) -> Vec<String> {
    let mut p = Vec::new();
    let b = s.eval(&s.resource("BackupBucket")["Properties"]);
    if b["VersioningConfiguration"]["Status"] != "Enabled" {
        p.push("backup bucket not versioned".into());
    }
    let sse = &b["BucketEncryption"]["ServerSideEncryptionConfiguration"][0]
        ["ServerSideEncryptionByDefault"];
    if sse["SSEAlgorithm"] != "aws:kms"
        || sse["KMSMasterKeyID"] != s.eval(&json!({"Fn::GetAtt": ["ClusterKey", "Arn"]}))
    {
        p.push(format!(
            "backup bucket encryption {sse}, want SSE-KMS with the cluster key"
        ));
    }
    let block = &b["PublicAccessBlockConfiguration"];
    for k in [
        "BlockPublicAcls",
        "BlockPublicPolicy",
        "IgnorePublicAcls",
        "RestrictPublicBuckets",
    ] {
        if block[k] != true {
            p.push(format!("backup bucket {k} is not true"));
        }
    }
    if b["LifecycleConfiguration"]["Rules"]
        .as_array()
        .is_none_or(|r| r.is_empty())
    {
        p.push("backup bucket without lifecycle rules".into());
    }
    let policy = s.prop("BackupBucketPolicy", "PolicyDocument");
    let tls_only = policy["Statement"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|st| {
            st["Effect"] == "Deny" && st["Condition"]["Bool"]["aws:SecureTransport"] == "false"
        });
    if !tls_only {
        p.push("backup bucket policy does not deny non-TLS requests".into());
    }
    p
}

/// A role's statements, by Sid, from its `kubeboot-agent` policy; and every
/// problem with the role's other policies.
fn role_policies(s: &Stack, role_id: &str) -> (Vec<Value>, Vec<String>) {
    let mut p = Vec::new();
    let role = s.eval(&s.resource(role_id)["Properties"]);
    if role.get("ManagedPolicyArns").is_some() {
        p.push(format!("{role_id} has managed policies: grant only what the agent and the CloudWatch agent use"));
    }
    let mut agent = Vec::new();
    for policy in role["Policies"].as_array().into_iter().flatten() {
        let statements = policy["PolicyDocument"]["Statement"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        match policy["PolicyName"].as_str() {
            Some("kubeboot-agent") => agent = statements,
            Some("cloudwatch-agent") => {
                let log_group = s.eval(&json!({"Fn::GetAtt": ["LogGroup", "Arn"]}));
                for st in &statements {
                    let actions: BTreeSet<String> = strings(&st["Action"]);
                    let allowed: BTreeSet<String> = [
                        "logs:CreateLogStream",
                        "logs:DescribeLogStreams",
                        "logs:PutLogEvents",
                    ]
                    .map(String::from)
                    .into();
                    if !actions.is_subset(&allowed) {
                        p.push(format!("{role_id} cloudwatch-agent grants {actions:?}"));
                    }
                    let log_group = scalar(&log_group);
                    for r in strings(&st["Resource"]) {
                        if !r.starts_with(&log_group) {
                            p.push(format!("{role_id} cloudwatch-agent reaches beyond the cluster log group: {r}"));
                        }
                    }
                }
            }
            other => p.push(format!("{role_id} has an unexpected policy {other:?}")),
        }
    }
    (agent, p)
}

fn strings(v: &Value) -> BTreeSet<String> {
    match v {
        Value::Array(a) => a.iter().map(scalar).collect(),
        Value::Null => BTreeSet::new(),
        other => [scalar(other)].into(),
    }
}

/// What each resource kind must resolve to for this cluster.
fn expected_resources(
    s: &Stack,
    cfg: &kubeboot::config::Config,
    kind: Resource,
) -> BTreeSet<String> {
    let param = |name: &str| {
        format!(
            "arn:aws:ssm:{REGION}:{ACCOUNT}:parameter{}/{name}",
            cfg.aws.ssm_prefix
        )
    };
    let set = |items: &[String]| items.iter().cloned().collect();
    match kind {
        Resource::Table | Resource::Requests => {
            set(&[scalar(&s.eval(&json!({"Fn::GetAtt": ["Table", "Arn"]})))])
        }
        // Secrets Manager appends "-" and six random characters.
        Resource::JoinSecret => set(&[format!(
            "arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:{}-??????",
            cfg.aws.join_secret
        )]),
        Resource::CertificateKeySecret => set(&[format!(
            "arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:{}-??????",
            cfg.aws.certificate_key_secret
        )]),
        Resource::SsmPrefix => set(&[
            param(kubeboot::join_material::SSM_ENDPOINT),
            param(kubeboot::join_material::SSM_CA_CERT_HASHES),
        ]),
        Resource::LifecycleQueue => set(&[scalar(&s.eval(&json!({"Fn::GetAtt": ["LifecycleQueue", "Arn"]})))]),
        Resource::AutoScalingGroups => s
            .of_type("AWS::AutoScaling::AutoScalingGroup")
            .iter()
            .map(|id| {
                format!(
                    "arn:aws:autoscaling:{REGION}:{ACCOUNT}:autoScalingGroup:*:autoScalingGroupName/{}",
                    scalar(&s.prop(id, "AutoScalingGroupName"))
                )
            })
            .collect(),
        Resource::SecretsKey => set(&[scalar(&s.eval(&json!({"Fn::GetAtt": ["SecretsKey", "Arn"]})))]),
        Resource::AnyInstance => set(&["*".to_string()]),
        // The stack a control plane signals (its own, by name).
        Resource::Stack => set(&[format!(
            "arn:aws:cloudformation:{REGION}:{ACCOUNT}:stack/{}/*",
            scalar(&s.eval(&json!({"Ref": "AWS::StackName"})))
        )]),
        // The bucket aws.backup_bucket names, and this cluster's snapshots in it.
        Resource::BackupBucket => set(&[scalar(&s.eval(&json!({"Fn::GetAtt": ["BackupBucket", "Arn"]})))]),
        Resource::Backups => set(&[format!(
            "{}/{}/{}/*",
            scalar(&s.eval(&json!({"Fn::GetAtt": ["BackupBucket", "Arn"]}))),
            cfg.backup.prefix,
            cfg.cluster.name
        )]),
        // The bucket's default encryption key.
        Resource::BackupKey => set(&[scalar(&s.eval(&json!({"Fn::GetAtt": ["ClusterKey", "Arn"]})))]),
        // The issuer's documents: the bucket aws.oidc_bucket names, under
        // the issuer URL's path.
        Resource::OidcDocuments => {
            let issuer = cfg
                .cluster
                .service_account_issuer
                .as_deref()
                .expect("the control planes' user-data sets an issuer");
            let (_, jwks) = kubeboot::oidc::object_keys(issuer);
            let prefix = jwks.trim_end_matches(kubeboot::oidc::JWKS_PATH);
            assert_eq!(
                cfg.aws.oidc_bucket.as_deref(),
                Some(scalar(&s.eval(&json!({"Ref": "OidcBucket"}))).as_str()),
                "aws.oidc_bucket is the stack's OidcBucket"
            );
            set(&[format!(
                "{}/{prefix}*",
                scalar(&s.eval(&json!({"Fn::GetAtt": ["OidcBucket", "Arn"]})))
            )])
        }
    }
}

/// Least privilege: each role's `kubeboot-agent` policy grants exactly the
/// agent's operation list for that role, each on the cluster's own resource;
/// no wildcard action anywhere in a role.
fn iam_problems(s: &Stack) -> Vec<String> {
    let mut p = Vec::new();
    for kind in [
        "AWS::IAM::Policy",
        "AWS::IAM::ManagedPolicy",
        "AWS::IAM::RolePolicy",
        "AWS::IAM::User",
        "AWS::IAM::Group",
    ] {
        for id in s.of_type(kind) {
            p.push(format!(
                "{id}: a {kind} outside the roles' reviewed inline policies"
            ));
        }
    }
    for role_id in s.of_type("AWS::IAM::Role") {
        let mut statements = Vec::new();
        find_all(s.resource(&role_id), "Statement", &mut statements);
        for st in statements
            .iter()
            .flat_map(|v| v.as_array().into_iter().flatten())
        {
            for k in ["NotAction", "NotResource", "NotPrincipal"] {
                if st.get(k).is_some() {
                    p.push(format!("{role_id}: a statement with {k}"));
                }
            }
        }
    }
    for (role, role_id) in [
        (Role::ControlPlane, "ControlPlaneRole"),
        (Role::Worker, "WorkerRole"),
    ] {
        let cfg = node_config(s, role);
        let (statements, mut others) = role_policies(s, role_id);
        p.append(&mut others);
        let mut granted: BTreeSet<(String, String)> = BTreeSet::new();
        for st in &statements {
            if st["Effect"] != "Allow" {
                continue;
            }
            let sid = scalar(&st["Sid"]);
            let kind = [
                Resource::Table,
                Resource::Requests,
                Resource::JoinSecret,
                Resource::CertificateKeySecret,
                Resource::SsmPrefix,
                Resource::LifecycleQueue,
                Resource::AutoScalingGroups,
                Resource::SecretsKey,
                Resource::AnyInstance,
                Resource::Stack,
                Resource::BackupBucket,
                Resource::Backups,
                Resource::BackupKey,
                Resource::OidcDocuments,
            ]
            .into_iter()
            .find(|k| format!("{k:?}") == sid);
            let Some(kind) = kind else {
                p.push(format!(
                    "{role_id}: statement {sid:?} names no resource kind of agent/src/iam.rs"
                ));
                continue;
            };
            let resources = strings(&st["Resource"]);
            let want = expected_resources(s, &cfg, kind);
            if resources != want {
                p.push(format!(
                    "{role_id}: {sid} on {resources:?}, the agent uses {want:?}"
                ));
            }
            if kind == Resource::Table || kind == Resource::Requests {
                let keys =
                    strings(&st["Condition"]["ForAllValues:StringEquals"]["dynamodb:LeadingKeys"]);
                let pk = match kind {
                    Resource::Table => kubeboot::table::cluster_pk(&cfg.cluster.name),
                    _ => kubeboot::table::requests_pk(&cfg.cluster.name),
                };
                if keys != [pk.clone()].into() {
                    p.push(format!(
                        "{role_id}: table access not limited to the partition {pk}: {keys:?}"
                    ));
                }
            }
            if kind == Resource::SecretsKey
                && scalar(&st["Condition"]["StringEquals"]["kms:ViaService"])
                    != format!("secretsmanager.{REGION}.amazonaws.com")
            {
                p.push(format!(
                    "{role_id}: the secrets key is usable outside Secrets Manager"
                ));
            }
            for action in strings(&st["Action"]) {
                if action.contains('*') {
                    p.push(format!("{role_id}: wildcard action {action}"));
                }
                granted.insert((sid.clone(), action));
            }
        }
        let want: BTreeSet<(String, String)> = iam::grants(role)
            .into_iter()
            .map(|g| (format!("{:?}", g.resource), g.action.to_string()))
            .collect();
        for extra in granted.difference(&want) {
            p.push(format!(
                "{role_id} grants {} on {} which the agent never needs (agent/src/iam.rs)",
                extra.1, extra.0
            ));
        }
        for missing in want.difference(&granted) {
            p.push(format!(
                "{role_id} lacks {} on {}, which the agent needs",
                missing.1, missing.0
            ));
        }
    }
    p
}

/// The configuration a node of `role` gets from its launch template's
/// user-data, parsed and validated by the agent's own loader.
fn node_config(s: &Stack, role: Role) -> kubeboot::config::Config {
    let (dir, user_data) = write_user_data(s, role);
    let config = dir.path().join("config.toml");
    std::fs::write(&config, "").expect("write empty config");
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let loaded = rt
        .block_on(kubeboot::config::load_offline(
            &kubeboot::config::LoadOptions {
                path: config,
                user_data: kubeboot::config::UserData::File(user_data),
                env: vec![],
            },
        ))
        .unwrap_or_else(|e| panic!("{role:?} user-data is refused by the agent: {e}"));
    loaded.config
}

fn launch_template(role: Role) -> &'static str {
    match role {
        Role::ControlPlane => "ControlPlaneLaunchTemplate",
        Role::Worker => "WorkerLaunchTemplate",
    }
}

fn write_user_data(s: &Stack, role: Role) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("user-data");
    std::fs::write(&path, launch_user_data(s, launch_template(role))).expect("write user-data");
    (dir, path)
}

/// Names the user-data gives the agent match the resources the stack makes.
fn user_data_problems(s: &Stack) -> Vec<String> {
    let mut p = Vec::new();
    let secret_name = scalar(&s.prop("JoinSecret", "Name"));
    let table = scalar(&s.eval(&json!({"Ref": "Table"})));
    let queue = scalar(&s.eval(&json!({"Ref": "LifecycleQueue"})));
    let log_group = scalar(&s.eval(&json!({"Ref": "LogGroup"})));
    let endpoint = format!(
        "{}:6443",
        scalar(&s.eval(&json!({"Fn::GetAtt": ["ApiLoadBalancer", "DNSName"]})))
    );
    for role in [Role::ControlPlane, Role::Worker] {
        let cfg = node_config(s, role);
        let mut expect = |what: &str, got: &str, want: &str| {
            if got != want {
                p.push(format!(
                    "{role:?} user-data {what} = {got:?}, the stack has {want:?}"
                ));
            }
        };
        expect("node.role", cfg.node.role.as_str(), role.as_str());
        expect("cluster.name", &cfg.cluster.name, &cluster(s));
        expect("aws.table", &cfg.aws.table, &table);
        expect("aws.join_secret", &cfg.aws.join_secret, &secret_name);
        expect(
            "aws.certificate_key_secret",
            &cfg.aws.certificate_key_secret,
            &scalar(&s.prop("CertificateKeySecret", "Name")),
        );
        expect(
            "aws.ssm_prefix",
            &cfg.aws.ssm_prefix,
            &format!("/kubeboot/{}", cluster(s)),
        );
        expect(
            "aws.lifecycle_queue_url",
            cfg.aws.lifecycle_queue_url.as_deref().unwrap_or(""),
            &queue,
        );
        // The load balancer's DNS name keeps its capitals (the evaluator
        // synthesizes it as AWS does) and kubeadm refuses them: the agent
        // hands kubeadm the same name in lowercase (DNS ignores case).
        expect(
            "cluster.control_plane_endpoint",
            &cfg.cluster.control_plane_endpoint,
            &endpoint.to_ascii_lowercase(),
        );
        expect(
            "metrics.log_group",
            cfg.metrics.log_group.as_deref().unwrap_or(""),
            &log_group,
        );
        expect(
            "aws.backup_bucket",
            cfg.aws.backup_bucket.as_deref().unwrap_or(""),
            &scalar(&s.eval(&json!({"Ref": "BackupBucket"}))),
        );
        // Control planes apply cluster-autoscaler with the stack's role.
        let want_role = match role {
            Role::ControlPlane => {
                scalar(&s.eval(&json!({"Fn::GetAtt": ["ClusterAutoscalerRole", "Arn"]})))
            }
            Role::Worker => String::new(),
        };
        expect(
            "addons.cluster_autoscaler_role_arn",
            cfg.addons
                .cluster_autoscaler_role_arn
                .as_deref()
                .unwrap_or(""),
            &want_role,
        );
        // Control planes signal the group's CreationPolicy/UpdatePolicy
        // (stack, logical id); workers do not.
        let (want_stack, want_resource) = match role {
            Role::ControlPlane => (
                scalar(&s.eval(&json!({"Ref": "AWS::StackName"}))),
                "ControlPlaneGroup".to_string(),
            ),
            Role::Worker => (String::new(), String::new()),
        };
        expect(
            "aws.cloudformation_stack",
            cfg.aws.cloudformation_stack.as_deref().unwrap_or(""),
            &want_stack,
        );
        expect(
            "aws.cloudformation_resource",
            cfg.aws.cloudformation_resource.as_deref().unwrap_or(""),
            &want_resource,
        );
        if role == Role::ControlPlane
            && s.resource(&want_resource)["CreationPolicy"]["ResourceSignal"].is_null()
        {
            p.push(format!(
                "{want_resource}, which control planes signal, waits for no signal"
            ));
        }
        let data = s.prop(launch_template(role), "LaunchTemplateData");
        let md = &data["MetadataOptions"];
        if md["HttpTokens"] != "required" {
            p.push(format!("{role:?} launch template allows IMDSv1"));
        }
        if md["InstanceMetadataTags"] != "enabled" {
            p.push(format!(
                "{role:?} launch template hides instance tags from IMDS; the agent reads {}",
                kubeboot::identity::paths::ASG_NAME_TAG
            ));
        }
        let profile = scalar(&data["IamInstanceProfile"]["Arn"]);
        let want_profile = match role {
            Role::ControlPlane => "ControlPlaneInstanceProfile",
            Role::Worker => "WorkerInstanceProfile",
        };
        if !profile.ends_with(want_profile) {
            p.push(format!(
                "{role:?} launch template uses instance profile {profile}"
            ));
        }
    }
    p
}

/// The ASGs' hooks and the EventBridge rule deliver what the agent parses.
fn lifecycle_problems(s: &Stack) -> Vec<String> {
    let mut p = Vec::new();
    let rule = s.eval(&s.resource("LifecycleRule")["Properties"]);
    let pattern = &rule["EventPattern"];
    let groups = strings(&pattern["detail"]["AutoScalingGroupName"]);
    let queue_arn = s.eval(&json!({"Fn::GetAtt": ["LifecycleQueue", "Arn"]}));
    if rule["Targets"][0]["Arn"] != queue_arn {
        p.push(format!(
            "lifecycle rule targets {}, not the queue",
            rule["Targets"][0]["Arn"]
        ));
    }
    let cfg = node_config(s, Role::ControlPlane);
    for id in ["ControlPlaneGroup", "WorkerGroup"] {
        let asg = s.eval(&s.resource(id)["Properties"]);
        let name = scalar(&asg["AutoScalingGroupName"]);
        if !groups.contains(&name) {
            p.push(format!("lifecycle rule does not match {id} ({name})"));
        }
        let hooks = asg["LifecycleHookSpecificationList"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let Some(hook) = hooks
            .iter()
            .find(|h| h["LifecycleTransition"] == "autoscaling:EC2_INSTANCE_TERMINATING")
        else {
            p.push(format!("{id} has no termination lifecycle hook"));
            continue;
        };
        let hook_name = scalar(&hook["LifecycleHookName"]);
        if hook_name != cfg.aws.lifecycle_hook {
            p.push(format!(
                "{id} hook {hook_name:?}, the agent completes {:?}",
                cfg.aws.lifecycle_hook
            ));
        }
        // The event EventBridge delivers for this rule, as the leader reads it.
        let event = json!({
            "version": "0", "id": "6a7e8feb-b491-4cf7-a9f1-bf3703467718",
            "detail-type": pattern["detail-type"][0],
            "source": pattern["source"][0],
            "account": ACCOUNT, "time": "2026-11-29T00:00:00Z", "region": REGION,
            "resources": [format!("arn:aws:autoscaling:{REGION}:{ACCOUNT}:autoScalingGroup:x:autoScalingGroupName/{name}")],
            "detail": {
                "LifecycleActionToken": "87654321-4321-4321-4321-210987654321",
                "AutoScalingGroupName": name,
                "LifecycleHookName": hook_name,
                "EC2InstanceId": "i-0123456789abcdef0",
                "LifecycleTransition": hook["LifecycleTransition"],
                "Origin": "AutoScalingGroup", "Destination": "EC2"
            }
        });
        match kubeboot::lifecycle::parse_message(&event.to_string()) {
            Ok(kubeboot::lifecycle::Event::Terminating(action))
                if action.asg == name && action.hook == cfg.aws.lifecycle_hook => {}
            other => p.push(format!("the agent reads {id}'s event as {other:?}")),
        }
    }
    let rule_arn = s.eval(&json!({"Fn::GetAtt": ["LifecycleRule", "Arn"]}));
    for id in s.of_type("AWS::SQS::QueuePolicy") {
        let policy = s.prop(&id, "PolicyDocument");
        for st in policy["Statement"].as_array().into_iter().flatten() {
            if st["Effect"] != "Allow" {
                continue;
            }
            let ok = st["Principal"] == json!({"Service": "events.amazonaws.com"})
                && strings(&st["Action"]) == ["sqs:SendMessage".to_string()].into()
                && st["Condition"]["ArnEquals"]["aws:SourceArn"] == rule_arn;
            if !ok {
                p.push(format!(
                    "{id} allows more than the lifecycle rule's delivery: {st}"
                ));
            }
        }
    }
    for queue in ["LifecycleQueue", "LifecycleDeadLetterQueue"] {
        let covered = s.of_type("AWS::SQS::QueuePolicy").iter().any(|id| {
            s.prop(id, "Queues")
                .as_array()
                .is_some_and(|q| q.contains(&s.eval(&json!({"Ref": queue}))))
        });
        if !covered {
            p.push(format!("no policy lets EventBridge deliver to {queue}"));
        }
    }
    if pattern["detail-type"] != json!(["EC2 Instance-terminate Lifecycle Action"])
        || pattern["source"] != json!(["aws.autoscaling"])
    {
        p.push(format!("lifecycle rule pattern {pattern}"));
    }
    p
}

/// A metric series an alarm or a widget reads.
struct Series {
    namespace: String,
    name: String,
    dims: Vec<(String, String)>,
    from: String,
}

fn alarm_series(s: &Stack) -> Vec<Series> {
    let mut out = Vec::new();
    for id in s.of_type("AWS::CloudWatch::Alarm") {
        let a = s.eval(&s.resource(&id)["Properties"]);
        let dims = |d: &Value| {
            d.as_array()
                .into_iter()
                .flatten()
                .map(|x| (scalar(&x["Name"]), scalar(&x["Value"])))
                .collect()
        };
        if a.get("MetricName").is_some() {
            out.push(Series {
                namespace: scalar(&a["Namespace"]),
                name: scalar(&a["MetricName"]),
                dims: dims(&a["Dimensions"]),
                from: id.clone(),
            });
        }
        for m in a["Metrics"].as_array().into_iter().flatten() {
            let metric = &m["MetricStat"]["Metric"];
            if metric.is_object() {
                out.push(Series {
                    namespace: scalar(&metric["Namespace"]),
                    name: scalar(&metric["MetricName"]),
                    dims: dims(&metric["Dimensions"]),
                    from: id.clone(),
                });
            }
        }
    }
    out
}

fn dashboard_series(s: &Stack) -> Vec<Series> {
    let body: Value = serde_json::from_str(&scalar(&s.prop("Dashboard", "DashboardBody")))
        .expect("dashboard body is JSON");
    let mut out = Vec::new();
    for w in body["widgets"].as_array().into_iter().flatten() {
        for m in w["properties"]["metrics"].as_array().into_iter().flatten() {
            let parts: Vec<String> = m
                .as_array()
                .expect("metric array")
                .iter()
                .map(scalar)
                .collect();
            out.push(Series {
                namespace: parts[0].clone(),
                name: parts[1].clone(),
                dims: parts[2..]
                    .chunks(2)
                    .map(|c| (c[0].clone(), c[1].clone()))
                    .collect(),
                from: format!("dashboard widget {}", w["properties"]["title"]),
            });
        }
    }
    out
}

/// Alarms and the dashboard read series the agent emits: its namespace, a
/// catalogue metric, exactly that metric's dimension names, this cluster,
/// real roles and paths. Every alarm notifies the topic.
fn metric_problems(s: &Stack) -> Vec<String> {
    let mut p = Vec::new();
    let namespace = node_config(s, Role::ControlPlane).metrics.namespace;
    let paths: BTreeSet<&str> = [
        kubeboot::bootstrap::Path::Init,
        kubeboot::bootstrap::Path::ControlPlaneJoin,
        kubeboot::bootstrap::Path::WorkerJoin,
    ]
    .map(kubeboot::bootstrap::Path::as_str)
    .into_iter()
    .chain(["unknown"])
    .collect();
    let series: Vec<Series> = alarm_series(s)
        .into_iter()
        .chain(dashboard_series(s))
        .collect();
    if series.iter().filter(|x| x.namespace == namespace).count() < 10 {
        p.push("fewer than 10 series on kubeboot's metrics".into());
    }
    for x in series.iter().filter(|x| x.namespace != "AWS/SQS") {
        if x.namespace != namespace {
            p.push(format!(
                "{}: namespace {}, the agent emits to {namespace}",
                x.from, x.namespace
            ));
            continue;
        }
        let Some(metric) = kubeboot::metrics::by_name(&x.name) else {
            p.push(format!(
                "{}: metric {} is not one the agent emits",
                x.from, x.name
            ));
            continue;
        };
        let names: Vec<&str> = x.dims.iter().map(|(k, _)| k.as_str()).collect();
        let want: Vec<&str> = kubeboot::metrics::BASE_DIMENSIONS
            .iter()
            .chain(metric.dimensions)
            .copied()
            .collect();
        if names != want {
            p.push(format!(
                "{}: {} with dimensions {names:?}, the agent emits {want:?}",
                x.from, x.name
            ));
        }
        for (k, v) in &x.dims {
            let ok = match k.as_str() {
                "ClusterName" => *v == cluster(s),
                "Role" => v == Role::ControlPlane.as_str() || v == Role::Worker.as_str(),
                "Path" => paths.contains(v.as_str()),
                _ => true,
            };
            if !ok {
                p.push(format!(
                    "{}: {} {k} = {v:?} is never emitted",
                    x.from, x.name
                ));
            }
        }
    }
    let topic = s.eval(&json!({"Ref": "AlarmTopic"}));
    for id in s.of_type("AWS::CloudWatch::Alarm") {
        let actions = s.prop(&id, "AlarmActions");
        if !actions.as_array().is_some_and(|a| a.contains(&topic)) {
            p.push(format!("alarm {id} does not notify the alarm topic"));
        }
    }
    // The join-material alarm fires only when the leader missed the refresh.
    let stale = s
        .prop("JoinMaterialStale", "Threshold")
        .as_f64()
        .unwrap_or(0.0);
    let refresh_due = (kubeboot::join_material::TOKEN_TTL
        - kubeboot::refresh::TOKEN_REFRESH_BEFORE)
        .as_secs_f64();
    if !(stale > refresh_due && stale < kubeboot::join_material::TOKEN_TTL.as_secs_f64()) {
        p.push(format!(
            "JoinMaterialStale at {stale} s; refresh is due at {refresh_due} s"
        ));
    }
    p
}

/// Alerts cannot be silently off: the subscription exists and its address is
/// a required parameter.
fn alert_problems(s: &Stack) -> Vec<String> {
    let mut p = Vec::new();
    let email = &s.template["Parameters"]["AlarmEmail"];
    if email.get("Default").is_some() {
        p.push("AlarmEmail has a default: alerts could go nowhere".into());
    }
    let sub = &s.resource("AlarmSubscription")["Properties"];
    if sub["Endpoint"] != json!({"Ref": "AlarmEmail"})
        || sub["TopicArn"] != json!({"Ref": "AlarmTopic"})
    {
        p.push(format!("alarm subscription {sub}"));
    }
    if s.resource("AlarmSubscription").get("Condition").is_some() {
        p.push("the alarm subscription is conditional".into());
    }
    p
}

/// Stage: required, one of the Mappings rows, read only through
/// `FindInMap [StageSettings, !Ref Stage, key]`; every name carries it.
fn stage_problems(t: &Value, file: &str) -> Vec<String> {
    let mut p = Vec::new();
    let stage = &t["Parameters"]["Stage"];
    if stage.get("Default").is_some() {
        p.push(format!("{file}: Stage has a default"));
    }
    let rows: BTreeSet<String> = t["Mappings"]["StageSettings"]
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default();
    if strings(&stage["AllowedValues"]) != rows {
        p.push(format!(
            "{file}: Stage allows {:?}, StageSettings has rows {rows:?}",
            stage["AllowedValues"]
        ));
    }
    let keys: Vec<BTreeSet<String>> = t["Mappings"]["StageSettings"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(_, row)| {
            row.as_object()
                .map(|r| r.keys().cloned().collect())
                .unwrap_or_default()
        })
        .collect();
    if keys.windows(2).any(|w| w[0] != w[1]) {
        p.push(format!("{file}: StageSettings rows have different keys"));
    }
    let mut lookups = Vec::new();
    find_all(t, "Fn::FindInMap", &mut lookups);
    for l in lookups {
        if l[0] != "StageSettings" || l[1] != json!({"Ref": "Stage"}) {
            p.push(format!(
                "{file}: FindInMap {l} does not read the stage's own row"
            ));
        }
    }
    p
}

fn names_problems(t: &Value, file: &str, params: &[(&str, &str)]) -> Vec<String> {
    const NAME_PROPS: &[&str] = &[
        "TableName",
        "BucketName",
        "QueueName",
        "TopicName",
        "AlarmName",
        "DashboardName",
        "LaunchTemplateName",
        "AutoScalingGroupName",
        "LogGroupName",
        "AliasName",
        "Name",
        "GroupName",
    ];
    let mut p = Vec::new();
    let with = |stage: &str| {
        let mut all = params.to_vec();
        all.push(("Stage", stage));
        Stack::new(t.clone(), &all)
    };
    let (dev, prod) = (with("dev"), with("production"));
    for (id, r) in dev.resources() {
        for prop in NAME_PROPS {
            if r["Properties"].get(*prop).is_none() {
                continue;
            }
            let d = scalar(&dev.prop(id, prop));
            let pr = scalar(&prod.prop(id, prop));
            if d == pr || !pr.contains("production") {
                p.push(format!("{file}: {id}.{prop} = {pr:?} is not stage-scoped"));
            }
        }
    }
    p
}

/// The NLB does not preserve client IPs (an internal NLB drops a target's
/// connection to itself when it does: kubelet on the first control plane could
/// not reach its own API server), so the control planes take 6443 from the
/// load balancer's security group, and from the nodes' groups for the paths
/// pods use (the in-cluster `kubernetes` Service goes to the control planes'
/// addresses directly), and from nothing else.
fn load_balancer_problems(s: &Stack) -> Vec<String> {
    let mut p = Vec::new();
    let attrs = s.prop("ApiTargetGroup", "TargetGroupAttributes");
    let preserve = attrs
        .as_array()
        .into_iter()
        .flatten()
        .find(|a| a["Key"] == "preserve_client_ip.enabled")
        .map(|a| scalar(&a["Value"]));
    if preserve.as_deref() != Some("false") {
        p.push(format!("API target group preserves client IPs ({preserve:?}): a control plane cannot reach itself through the NLB"));
    }
    let inline = s.prop("ControlPlaneSecurityGroup", "SecurityGroupIngress");
    for rule in inline.as_array().into_iter().flatten() {
        p.push(format!(
            "control-plane security group has an inline ingress rule {rule}"
        ));
    }
    let lb_sg = json!({"Ref": "ApiLoadBalancerSecurityGroup"});
    let mut api_sources = Vec::new();
    for id in s.of_type("AWS::EC2::SecurityGroupIngress") {
        let props = &s.resource(&id)["Properties"];
        let port = |k: &str| props[k].as_u64().unwrap_or(0);
        if props["GroupId"] == json!({"Ref": "ControlPlaneSecurityGroup"})
            && port("FromPort") <= 6443
            && port("ToPort") >= 6443
        {
            api_sources.push(props["SourceSecurityGroupId"].clone());
            if props.get("CidrIp").is_some() {
                p.push(format!("{id}: 6443 open to a CIDR"));
            }
        }
    }
    // The paths to 6443 a cluster uses: kubelets, kubeadm and the agent
    // through the load balancer; pods through the in-cluster `kubernetes`
    // Service, which kube-proxy sends to the control planes' own addresses
    // (from a worker, or from another control plane). Nothing else.
    let wanted = [
        ("the load balancer", lb_sg),
        (
            "pods on workers (the kubernetes Service)",
            json!({"Ref": "WorkerSecurityGroup"}),
        ),
        (
            "pods on control planes (the kubernetes Service)",
            json!({"Ref": "ControlPlaneSecurityGroup"}),
        ),
    ];
    for (who, sg) in &wanted {
        if !api_sources.contains(sg) {
            p.push(format!("6443 on the control planes is closed to {who}"));
        }
    }
    for sg in &api_sources {
        if !wanted.iter().any(|(_, w)| w == sg) {
            p.push(format!("6443 on the control planes is open to {sg}"));
        }
    }
    p
}

/// With instance tags in IMDS (the agent reads its ASG name there), EC2
/// refuses to launch an instance whose tag keys contain "/" or a space.
fn instance_tag_problems(s: &Stack) -> Vec<String> {
    let legal = |k: &str| {
        !k.is_empty()
            && k != "."
            && k != ".."
            && k != "_index"
            && k.chars()
                .all(|c| c.is_ascii_alphanumeric() || "+-=.,_:@".contains(c))
    };
    let mut p = Vec::new();
    for role in [Role::ControlPlane, Role::Worker] {
        let data = s.prop(launch_template(role), "LaunchTemplateData");
        if data["MetadataOptions"]["InstanceMetadataTags"] != "enabled" {
            continue;
        }
        for spec in data["TagSpecifications"].as_array().into_iter().flatten() {
            if spec["ResourceType"] == "instance" {
                for t in spec["Tags"].as_array().into_iter().flatten() {
                    let k = scalar(&t["Key"]);
                    if !legal(&k) {
                        p.push(format!(
                            "{role:?} launch template tags instances with {k:?}"
                        ));
                    }
                }
            }
        }
        let group = match role {
            Role::ControlPlane => "ControlPlaneGroup",
            Role::Worker => "WorkerGroup",
        };
        for t in s.prop(group, "Tags").as_array().into_iter().flatten() {
            let k = scalar(&t["Key"]);
            if t["PropagateAtLaunch"] == true && !legal(&k) {
                p.push(format!("{group} propagates tag {k:?} to instances whose tags are in IMDS: launches fail"));
            }
        }
    }
    p
}

// ---------------------------------------------------------------------------
// Scenarios

#[test]
fn the_table_is_the_agents_table_with_pitr_and_sse_and_it_survives_deletion() {
    let s = stack();
    assert_none(table_problems(&s));
    assert_none(retention_problems(&s));
    assert_none(bucket_problems(&s));
}

#[test]
fn every_stage_keeps_its_state_encrypted_and_retained() {
    for s in stacks() {
        assert_none(retention_problems(&s));
        assert_none(bucket_problems(&s));
    }
}

#[test]
fn each_role_is_granted_exactly_what_the_agent_calls_on_the_clusters_own_resources() {
    for s in stacks() {
        assert_none(iam_problems(&s));
    }
}

#[test]
fn the_api_is_reachable_through_the_load_balancer_and_by_the_paths_pods_use_and_nothing_else() {
    for s in stacks() {
        assert_none(load_balancer_problems(&s));
    }
}

#[test]
fn instance_tags_readable_from_imds_are_tags_ec2_accepts() {
    for s in stacks() {
        assert_none(instance_tag_problems(&s));
    }
}

#[test]
fn user_data_names_what_the_stack_made_and_passes_kubeboot_config_check() {
    for s in stacks() {
        assert_none(user_data_problems(&s));
    }
    let s = stack();
    for role in [Role::ControlPlane, Role::Worker] {
        let (dir, user_data) = write_user_data(&s, role);
        let config = dir.path().join("config.toml");
        std::fs::write(&config, "").expect("write config");
        let out = std::process::Command::new(kubeboot_bin())
            .args(["--config"])
            .arg(&config)
            .args(["config", "check", "--user-data"])
            .arg(&user_data)
            .env_remove("KUBEBOOT_CONFIG")
            .output()
            .expect("run kubeboot config check");
        assert!(
            out.status.success(),
            "kubeboot config check refuses the {role:?} user-data:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn lifecycle_events_reach_the_leader_in_a_shape_it_acts_on() {
    for s in stacks() {
        assert_none(lifecycle_problems(&s));
    }
}

#[test]
fn alarms_and_the_dashboard_watch_metrics_the_agent_emits_and_reach_a_required_address() {
    for s in stacks() {
        assert_none(metric_problems(&s));
        assert_none(alert_problems(&s));
    }
}

#[test]
fn every_setting_comes_from_the_stages_own_row_and_every_name_carries_the_stage() {
    let cluster = template("cluster.json");
    let network = template("network.json");
    assert_none(stage_problems(&cluster, "cluster.json"));
    assert_none(stage_problems(&network, "network.json"));
    assert_none(names_problems(
        &cluster,
        "cluster.json",
        &[("ClusterName", NAME), ("AlarmEmail", "oncall@example.com")],
    ));
    let mut network_params = vec![("ClusterName", NAME)];
    network_params.extend(AZS);
    assert_none(names_problems(&network, "network.json", &network_params));
}

#[test]
fn worker_groups_carry_the_cluster_autoscaler_discovery_tags() {
    let s = stack();
    let tags = s.prop("WorkerGroup", "Tags");
    // On the group, where cluster-autoscaler reads them; not on instances,
    // whose tags are in IMDS and may not contain "/".
    let has = |k: &str, v: &str| {
        tags.as_array()
            .into_iter()
            .flatten()
            .any(|t| t["Key"] == k && t["Value"] == v && t["PropagateAtLaunch"] == false)
    };
    assert!(has("k8s.io/cluster-autoscaler/enabled", "true"), "{tags}");
    assert!(
        has(
            &format!("k8s.io/cluster-autoscaler/{}", cluster(&s)),
            "owned"
        ),
        "{tags}"
    );
}

#[test]
fn the_network_gives_nodes_a_private_path_to_every_service_the_agent_calls() {
    let t = template("network.json");
    let mut services = BTreeSet::new();
    for (_, r) in t["Resources"].as_object().expect("resources") {
        if r["Type"] == "AWS::EC2::VPCEndpoint" {
            let name =
                scalar(&network_with(t.clone(), "dev").eval(&r["Properties"]["ServiceName"]));
            services.insert(name.rsplit('.').next().unwrap_or_default().to_string());
        }
    }
    for op in iam::OPERATIONS {
        for g in op.grants {
            let service = g.action.split(':').next().expect("service");
            assert!(
                services.contains(service),
                "no VPC endpoint for {service} ({})",
                g.action
            );
        }
    }
    // The CloudWatch agent ships the EMF metrics and logs; a control plane
    // signals its stack's rolling update (cloudformation:SignalResource).
    for service in ["logs", "monitoring", "s3", "cloudformation"] {
        assert!(services.contains(service), "no VPC endpoint for {service}");
    }
}

// ---------------------------------------------------------------------------
// A template that drifts fails the suite.

fn edited(edit: impl FnOnce(&mut Value)) -> Stack {
    let mut t = template("cluster.json");
    edit(&mut t);
    cluster_stack(t)
}

fn agent_statements<'a>(t: &'a mut Value, role_id: &str) -> &'a mut Vec<Value> {
    t["Resources"][role_id]["Properties"]["Policies"]
        .as_array_mut()
        .expect("policies")
        .iter_mut()
        .find(|p| p["PolicyName"] == "kubeboot-agent")
        .expect("kubeboot-agent policy")["PolicyDocument"]["Statement"]
        .as_array_mut()
        .expect("statements")
}

#[test]
fn a_template_granting_dynamodb_star_fails() {
    let s = edited(|t| {
        let table = agent_statements(t, "ControlPlaneRole")
            .iter_mut()
            .find(|st| st["Sid"] == "Table")
            .expect("Table statement");
        table["Action"] = json!("dynamodb:*");
    });
    let problems = iam_problems(&s);
    assert!(
        problems
            .iter()
            .any(|p| p.contains("wildcard action dynamodb:*")),
        "{problems:?}"
    );
    assert!(
        problems
            .iter()
            .any(|p| p.contains("lacks dynamodb:GetItem")),
        "{problems:?}"
    );
}

/// Whoever reads the certificate key and holds a bootstrap token can decrypt
/// the cluster's CA keys: the worker role must not reach the key's secret,
/// by its own policy or the secret's, and the two secrets are apart.
fn secret_split_problems(s: &Stack) -> Vec<String> {
    let mut p = Vec::new();
    let (join, key) = (
        scalar(&s.prop("JoinSecret", "Name")),
        scalar(&s.prop("CertificateKeySecret", "Name")),
    );
    if join == key {
        p.push(format!(
            "the token and the certificate key share the secret {join}"
        ));
    }
    // What the key secret's ARN looks like (Secrets Manager appends six characters).
    let key_arn = format!("arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:{key}-AbCdEf");
    let (statements, _) = role_policies(s, "WorkerRole");
    for st in statements.iter().filter(|st| st["Effect"] == "Allow") {
        let reaches_key = strings(&st["Resource"])
            .iter()
            .any(|pattern| iam_glob(pattern, &key_arn));
        let secrets_action = strings(&st["Action"])
            .iter()
            .any(|a| a.starts_with("secretsmanager:") || a == "*");
        if reaches_key && secrets_action {
            p.push(format!(
                "WorkerRole statement {} reaches the certificate-key secret",
                scalar(&st["Sid"])
            ));
        }
    }
    let worker_arn = s.eval(&json!({"Fn::GetAtt": ["WorkerRole", "Arn"]}));
    let denies_workers = s
        .of_type("AWS::SecretsManager::ResourcePolicy")
        .iter()
        .map(|id| s.eval(&s.resource(id)["Properties"]))
        .filter(|props| props["SecretId"] == s.eval(&json!({"Ref": "CertificateKeySecret"})))
        .flat_map(|props| {
            props["ResourcePolicy"]["Statement"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .any(|st| {
            st["Effect"] == "Deny"
                && st["Principal"]["AWS"] == worker_arn
                && strings(&st["Action"])
                    .iter()
                    .any(|a| a == "secretsmanager:*")
        });
    if !denies_workers {
        p.push("the certificate-key secret's resource policy does not deny the worker role".into());
    }
    for (id, key_id) in [
        ("JoinSecret", "SecretsKey"),
        ("CertificateKeySecret", "SecretsKey"),
    ] {
        if s.prop(id, "KmsKeyId") != s.eval(&json!({"Fn::GetAtt": [key_id, "Arn"]})) {
            p.push(format!("{id} is not encrypted with {key_id}"));
        }
    }
    p
}

/// IAM's resource wildcards: `*` any run of characters, `?` one.
fn iam_glob(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    // matches[i][j]: p[..i] matches t[..j]
    let mut matches = vec![vec![false; t.len() + 1]; p.len() + 1];
    matches[0][0] = true;
    for i in 1..=p.len() {
        for j in 0..=t.len() {
            matches[i][j] = match p[i - 1] {
                '*' => matches[i - 1][j] || (j > 0 && matches[i][j - 1]),
                '?' => j > 0 && matches[i - 1][j - 1],
                c => j > 0 && t[j - 1] == c && matches[i - 1][j - 1],
            };
        }
    }
    matches[p.len()][t.len()]
}

/// The secrets key serves the join secrets alone: no service principal in
/// its policy. The cluster key lets CloudWatch use it only for this
/// account's own alarms, and Logs only for the cluster's log group.
fn kms_problems(s: &Stack) -> Vec<String> {
    let mut p = Vec::new();
    let policy = |id: &str| {
        s.eval(&s.resource(id)["Properties"]["KeyPolicy"]["Statement"])
            .as_array()
            .cloned()
            .unwrap_or_default()
    };
    for st in policy("SecretsKey") {
        if st["Principal"]["Service"].is_string() {
            p.push(format!(
                "SecretsKey lets the service {} use it",
                st["Principal"]["Service"]
            ));
        }
    }
    for st in policy("ClusterKey") {
        let Some(service) = st["Principal"]["Service"].as_str().map(str::to_string) else {
            continue;
        };
        let condition = &st["Condition"];
        let scoped = if service.starts_with("logs.") {
            !condition["ArnLike"]["kms:EncryptionContext:aws:logs:arn"].is_null()
        } else {
            scalar(&condition["StringEquals"]["aws:SourceAccount"]) == ACCOUNT
                && scalar(&condition["ArnLike"]["aws:SourceArn"]).starts_with(&format!(
                    "arn:aws:cloudwatch:{REGION}:{ACCOUNT}:alarm:kubeboot-{}-",
                    cluster(s)
                ))
        };
        if !scoped {
            p.push(format!(
                "ClusterKey lets {service} use it without a source account/ARN or context condition: {condition}"
            ));
        }
    }
    p
}

#[test]
fn only_control_planes_can_reach_the_certificate_key_and_each_kms_key_serves_its_own() {
    for s in stacks() {
        assert_none(secret_split_problems(&s));
        assert_none(kms_problems(&s));
    }
}

#[test]
fn a_worker_role_granted_the_certificate_key_fails() {
    let s = edited(|t| {
        let st = agent_statements(t, "WorkerRole")
            .iter_mut()
            .find(|st| st["Sid"] == "JoinSecret")
            .expect("JoinSecret statement");
        st["Resource"] = json!({"Fn::Sub": "arn:${AWS::Partition}:secretsmanager:${AWS::Region}:${AWS::AccountId}:secret:kubeboot/${Stage}-${ClusterName}/*"});
    });
    let problems = secret_split_problems(&s);
    assert!(
        problems
            .iter()
            .any(|p| p
                .contains("WorkerRole statement JoinSecret reaches the certificate-key secret")),
        "{problems:?}"
    );
    // Dropping the secret's own deny, or sharing one secret, is caught too.
    let s = edited(|t| {
        t["Resources"]
            .as_object_mut()
            .expect("resources")
            .remove("CertificateKeySecretPolicy");
        t["Resources"]["CertificateKeySecret"]["Properties"]["Name"] =
            t["Resources"]["JoinSecret"]["Properties"]["Name"].clone();
    });
    let problems = secret_split_problems(&s);
    assert!(
        problems
            .iter()
            .any(|p| p.contains("does not deny the worker role")),
        "{problems:?}"
    );
    assert!(
        problems.iter().any(|p| p.contains("share the secret")),
        "{problems:?}"
    );
}

#[test]
fn a_kms_key_open_to_cloudwatch_without_conditions_fails() {
    let s = edited(|t| {
        let statements = t["Resources"]["ClusterKey"]["Properties"]["KeyPolicy"]["Statement"]
            .as_array_mut()
            .expect("statements");
        for st in statements.iter_mut() {
            if st["Principal"]["Service"] == "cloudwatch.amazonaws.com" {
                st.as_object_mut().expect("statement").remove("Condition");
            }
        }
        let cw = statements
            .iter()
            .find(|st| st["Principal"]["Service"] == "cloudwatch.amazonaws.com")
            .cloned()
            .expect("cloudwatch statement");
        t["Resources"]["SecretsKey"]["Properties"]["KeyPolicy"]["Statement"]
            .as_array_mut()
            .expect("statements")
            .push(cw);
    });
    let problems = kms_problems(&s);
    assert!(
        problems
            .iter()
            .any(|p| p.contains("ClusterKey lets cloudwatch.amazonaws.com use it without")),
        "{problems:?}"
    );
    assert!(
        problems
            .iter()
            .any(|p| p.contains("SecretsKey lets the service")),
        "{problems:?}"
    );
}

#[test]
fn a_template_granting_an_action_the_agent_never_calls_fails() {
    let s = edited(|t| {
        agent_statements(t, "WorkerRole")
            .iter_mut()
            .find(|st| st["Sid"] == "Table")
            .expect("Table statement")["Action"]
            .as_array_mut()
            .expect("actions")
            .push(json!("dynamodb:Scan"));
    });
    let problems = iam_problems(&s);
    assert!(
        problems
            .iter()
            .any(|p| p
                .contains("WorkerRole grants dynamodb:Scan on Table which the agent never needs")),
        "{problems:?}"
    );
}

#[test]
fn a_template_without_pitr_fails_here_and_in_the_linters() {
    let mut t = template("cluster.json");
    t["Resources"]["Table"]["Properties"]
        .as_object_mut()
        .expect("table properties")
        .remove("PointInTimeRecoverySpecification");
    let problems = table_problems(&cluster_stack(t.clone()));
    assert_eq!(
        problems,
        vec!["table without point-in-time recovery".to_string()]
    );

    // checkov agrees (CKV_AWS_28): the lint step of scripts/test.sh would fail too.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("cluster.json");
    std::fs::write(&path, serde_json::to_string_pretty(&t).expect("json")).expect("write");
    let out = std::process::Command::new(workspace_root().join("scripts/lint-infra.sh"))
        .arg(&path)
        .current_dir(workspace_root())
        .output()
        .expect("run scripts/lint-infra.sh");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success(),
        "lint passed a table without PITR:\n{text}"
    );
    assert!(text.contains("CKV_AWS_28"), "{text}");
}

#[test]
fn user_data_naming_another_table_fails() {
    let s = edited(|t| {
        let ud = &mut t["Resources"]["WorkerLaunchTemplate"]["Properties"]["LaunchTemplateData"]
            ["UserData"]["Fn::Base64"]["Fn::Sub"];
        let text = ud
            .as_str()
            .expect("user-data text")
            .replace("table = \"${Table}\"", "table = \"kubeboot-other\"");
        *ud = json!(text);
    });
    let problems = user_data_problems(&s);
    assert!(
        problems
            .iter()
            .any(|p| p.contains("Worker user-data aws.table = \"kubeboot-other\"")),
        "{problems:?}"
    );
}

#[test]
fn an_alarm_on_a_metric_nobody_emits_fails() {
    let s = edited(|t| {
        t["Resources"]["DrainFailed"]["Properties"]["MetricName"] = json!("DrainFailure");
    });
    let problems = metric_problems(&s);
    assert!(
        problems
            .iter()
            .any(|p| p.contains("DrainFailed: metric DrainFailure is not one the agent emits")),
        "{problems:?}"
    );
}

#[test]
fn a_template_preserving_client_ips_or_opening_6443_to_the_vpc_fails() {
    let s = edited(|t| {
        let attrs = t["Resources"]["ApiTargetGroup"]["Properties"]["TargetGroupAttributes"]
            .as_array_mut()
            .expect("attributes");
        attrs.retain(|a| a["Key"] != "preserve_client_ip.enabled");
        t["Resources"]["ControlPlaneSecurityGroup"]["Properties"]["SecurityGroupIngress"] = json!([
            {"IpProtocol": "tcp", "FromPort": 6443, "ToPort": 6443, "CidrIp": {"Fn::ImportValue": {"Fn::Sub": "kubeboot-${Stage}-${ClusterName}-VpcCidr"}}, "Description": "api"}
        ]);
    });
    let problems = load_balancer_problems(&s);
    assert!(
        problems.iter().any(|p| p.contains("preserves client IPs")),
        "{problems:?}"
    );
    assert!(
        problems.iter().any(|p| p.contains("inline ingress rule")),
        "{problems:?}"
    );
}

/// Before: 6443 on the control planes came from the load balancer only,
/// and pods (CoreDNS, the pod network's agents) could not reach the API.
#[test]
fn a_template_closing_6443_to_pods_fails() {
    let s = edited(|t| {
        let resources = t["Resources"].as_object_mut().expect("resources");
        resources.remove("ApiFromWorkers");
        resources.remove("ApiFromControlPlanes");
    });
    let problems = load_balancer_problems(&s);
    assert!(
        problems
            .iter()
            .any(|p| p.contains("closed to pods on workers")),
        "{problems:?}"
    );
    assert!(
        problems
            .iter()
            .any(|p| p.contains("closed to pods on control planes")),
        "{problems:?}"
    );
}

#[test]
fn propagating_a_tag_with_a_slash_to_instances_fails() {
    let s = edited(|t| {
        for tag in t["Resources"]["WorkerGroup"]["Properties"]["Tags"]
            .as_array_mut()
            .expect("tags")
        {
            tag["PropagateAtLaunch"] = json!(true);
        }
    });
    let problems = instance_tag_problems(&s);
    assert!(
        problems
            .iter()
            .any(|p| p.contains("\"k8s.io/cluster-autoscaler/enabled\"")),
        "{problems:?}"
    );
}

/// The certificate alarm fires only once the daemon's renewal window has
/// passed with no renewal: below the window, above zero, on the minimum
/// over the control planes (each reports its own certificates).
#[test]
fn the_certificate_alarm_fires_after_renewal_failed_well_before_expiry() {
    let s = stack();
    let metric = s.prop("CertificatesExpiring", "MetricName");
    assert_eq!(metric, json!(kubeboot::metrics::CERTIFICATE_DAYS_LEFT.name));
    assert_eq!(
        s.prop("CertificatesExpiring", "Statistic"),
        json!("Minimum")
    );
    assert_eq!(
        s.prop("CertificatesExpiring", "ComparisonOperator"),
        json!("LessThanThreshold")
    );
    let threshold = s
        .prop("CertificatesExpiring", "Threshold")
        .as_f64()
        .unwrap_or(-1.0);
    let window = (kubeboot::certs::RENEW_BEFORE.as_secs() / 86_400) as f64;
    assert!(
        threshold > 0.0 && threshold < window,
        "alarm at {threshold} days, renewal from {window} days"
    );
}

// ---------------------------------------------------------------------------
// infra/README.md's commands, run against the templates.

fn readme() -> String {
    let path = workspace_root().join("infra/README.md");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// What CloudFormation would refuse of the commands in `markdown`'s sh
/// blocks, run in order (see `kubeboot_tests::cfn::commands`).
fn readme_problems(markdown: &str) -> Vec<String> {
    let mut shell = commands::Shell::default();
    let mut all = Vec::new();
    for block in commands::sh_blocks(markdown) {
        match shell.run(&block) {
            Ok(c) => all.extend(c),
            Err(e) => return vec![format!("infra/README.md: {e}")],
        }
    }
    let deploys = all
        .iter()
        .filter(|c| c.argv.get(2).map(String::as_str) == Some("deploy"))
        .count();
    let mut p = commands::problems(&workspace_root(), &all);
    if deploys < 2 {
        p.push(format!(
            "infra/README.md deploys {deploys} stack(s); the network and the cluster stack are expected"
        ));
    }
    p
}

/// Before: the network deploy had no `--capabilities` ("deploy
/// kubeboot-dev-a-network: InsufficientCapabilities: infra/network.json
/// creates IAM resources, --capabilities CAPABILITY_IAM is missing").
#[test]
fn the_readmes_deploy_commands_are_accepted_by_cloudformation() {
    assert_none(readme_problems(&readme()));
}

/// The README with its teardown's update replaced by the `deploy` of the
/// checked-out template it used to run.
fn teardown_by_deploy(text: &str) -> String {
    let start = text
        .find("aws cloudformation update-stack")
        .expect("the teardown's update-stack");
    let end = start
        + text[start..]
            .find("ParameterValue=teardown\n")
            .expect("the teardown's last parameter")
        + "ParameterValue=teardown\n".len();
    format!(
        "{}aws cloudformation deploy --stack-name \"kubeboot-$stage-$name\" \\\n  --template-file infra/cluster.json --capabilities CAPABILITY_IAM \\\n  --parameter-overrides DeletionProtection=teardown --no-fail-on-empty-changeset\n{}",
        &text[..start],
        &text[end..]
    )
}

/// Each edit of the README, and what CloudFormation answers it with.
#[test]
fn a_readme_drifting_from_the_templates_is_refused() {
    let text = readme();
    let cases: Vec<(String, &str)> = vec![
        (
            text.replacen(
                "--template-file infra/network.json --capabilities CAPABILITY_IAM",
                "--template-file infra/network.json",
                1,
            ),
            "deploy kubeboot-dev-a-network: InsufficientCapabilities",
        ),
        (
            text.replacen("AlarmEmail=$email", "", 1),
            "Parameters: [AlarmEmail] must have values",
        ),
        (
            text.replacen("KubernetesVersion=1.31.2", "KubeVersion=1.31.2", 1),
            "Parameters: [KubeVersion] do not exist in the template infra/cluster.json",
        ),
        (
            text.replacen("Stage=$stage", "Stage=prod", 1),
            "Stage=prod is not one of",
        ),
        (
            text.replacen("out ApiEndpoint", "out ApiUrl", 1),
            "reads output ApiUrl, which infra/cluster.json does not declare",
        ),
        (
            text.replacen("AvailabilityZoneB=$az_b", "AvailabilityZoneB=$az_a", 1),
            "rule DistinctAvailabilityZones: AvailabilityZoneA and AvailabilityZoneB must differ",
        ),
        (
            text.replacen(" DeletionProtection=off\n", "\n", 1),
            "deploy kubeboot-production-a: creates ApiLoadBalancer with deletion protection on",
        ),
        // The teardown leaves the load balancer protected: the delete fails
        // on it (not on the table, which the delete keeps).
        (
            text.replacen(
                "ParameterKey=DeletionProtection,ParameterValue=teardown",
                "ParameterKey=DeletionProtection,UsePreviousValue=true",
                1,
            ),
            "delete-stack kubeboot-production-a: ApiLoadBalancer has deletion protection on",
        ),
        // The teardown turns off the table's protection too: the retained
        // production table outlives the stack unprotected.
        (
            text.replacen(
                "ParameterKey=DeletionProtection,ParameterValue=teardown",
                "ParameterKey=DeletionProtection,ParameterValue=off",
                1,
            ),
            "the teardown's update turns off Table's deletion protection, but the delete keeps Table",
        ),
        // The teardown uploads the checked-out template (the old teardown).
        (
            text.replacen(
                "--use-previous-template --capabilities CAPABILITY_IAM",
                "--template-body file://infra/cluster.json --capabilities CAPABILITY_IAM",
                1,
            ),
            "the teardown's update uploads the local template infra/cluster.json",
        ),
        (
            teardown_by_deploy(&text),
            "the teardown's update uploads the local template infra/cluster.json",
        ),
        // Upgrading the network with other AZs than its subnets' replaces them.
        (
            text.replacen(
                "--parameter-overrides AvailabilityZoneA=$az_a AvailabilityZoneB=$az_b",
                "--parameter-overrides AvailabilityZoneA=$az_b AvailabilityZoneB=$az_a",
                1,
            ),
            "deploy kubeboot-production-a-network: moves PrivateSubnetA from eu-west-1a to eu-west-1b",
        ),
        // update-stack gives an unnamed parameter its Default, not its
        // previous value.
        (
            text.replacen("    ParameterKey=AlarmEmail,UsePreviousValue=true \\\n", "", 1),
            "update-stack kubeboot-production-a: Parameters: [AlarmEmail] must have values",
        ),
        (
            text.replacen(
                "ParameterKey=DeletionProtection,ParameterValue=teardown",
                "ParameterKey=DeletionProtection,ParameterValue=gone",
                1,
            ),
            "update-stack kubeboot-production-a: DeletionProtection=gone is not one of",
        ),
        (
            text.replacen(
                "ParameterKey=Stage,UsePreviousValue=true",
                "ParameterKey=Stages,UsePreviousValue=true",
                1,
            ),
            "update-stack kubeboot-production-a: Parameters: [Stages] do not exist",
        ),
        (
            text.replacen(" --use-previous-template", "", 1),
            "update-stack kubeboot-production-a: give exactly one of --template-body, --use-previous-template",
        ),
        (
            text.replacen(
                "aws cloudformation delete-stack --stack-name \"kubeboot-$stage-$name\"\n",
                "aws cloudformation delete-stack --stack-name \"kubeboot-$stage-$name-network\"\naws cloudformation delete-stack --stack-name \"kubeboot-$stage-$name\"\n",
                1,
            ),
            "export kubeboot-production-a-VpcId cannot be deleted as it is in use by kubeboot-production-a",
        ),
        (
            text.replacen(
                "--template-file infra/cluster.json --capabilities CAPABILITY_IAM \\\n  --parameter-overrides Stage=$stage ClusterName=$name AlarmEmail=$email",
                "--template-file infra/cluster.json --capabilities CAPABILITY_IAM --tags team/owner=kube \\\n  --parameter-overrides Stage=$stage ClusterName=$name AlarmEmail=$email",
                1,
            ),
            "stack tag \"team/owner\" is propagated to instances",
        ),
        (
            text.replacen(
                "--template-file infra/cluster.json",
                "--template-file infra/clusters.json",
                1,
            ),
            "template infra/clusters.json",
        ),
        (
            text.replacen("out ApiEndpoint", "aws cloudformation create-stack --stack-name x", 1),
            "aws cloudformation create-stack is not checked by this test",
        ),
    ];
    for (edited, want) in cases {
        assert_ne!(edited, text, "the edit for {want:?} changed nothing");
        let problems = readme_problems(&edited);
        assert!(
            problems.iter().any(|p| p.contains(want)),
            "want {want:?} in {problems:#?}"
        );
    }
    // Importing from a network stack that was never deployed (the dev one
    // is commented out).
    let without_network = text.replacen(
        "aws cloudformation deploy --stack-name \"kubeboot-$stage-$name-network\"",
        "# aws cloudformation deploy --stack-name \"kubeboot-$stage-$name-network\"",
        1,
    );
    let problems = readme_problems(&without_network);
    assert!(
        problems
            .iter()
            .any(|p| p.contains("No export named kubeboot-dev-a-VpcId found")),
        "{problems:#?}"
    );
}

/// Before: every stateful resource used plain `Retain` ("Table is not kept
/// on stack deletion and replacement (DeletionPolicy RetainExceptOnCreate,
/// UpdateReplacePolicy Retain)", and the same for the other seven).
#[test]
fn a_failed_first_create_leaves_nothing_behind_and_a_delete_keeps_the_state() {
    for s in stacks() {
        assert_none(retention_problems(&s));
    }
    let network = template("network.json");
    assert_none(plain_retain(&network, "network.json"));
    for id in ["FlowLogsKey", "FlowLogsLogGroup"] {
        assert_eq!(
            network["Resources"][id]["DeletionPolicy"], "RetainExceptOnCreate",
            "{id}"
        );
        assert_eq!(
            network["Resources"][id]["UpdateReplacePolicy"], "Retain",
            "{id}"
        );
    }
    let s = edited(|t| t["Resources"]["JoinSecret"]["DeletionPolicy"] = json!("Retain"));
    let problems = retention_problems(&s);
    assert!(
        problems
            .iter()
            .any(|p| p.contains("JoinSecret has DeletionPolicy Retain")),
        "{problems:?}"
    );
}

/// Production protects the table and the NLB unless `DeletionProtection=off`
/// (first create), and the table alone with `teardown`; no other stage
/// protects either. Before `teardown` existed the README's teardown ran
/// `off`, leaving the retained production table unprotected.
#[test]
fn deletion_protection_follows_the_stage_unless_turned_off() {
    let t = template("cluster.json");
    for stage in STAGES {
        let s = staged(t.clone(), stage);
        let want: Vec<String> = if stage == "production" {
            vec!["ApiLoadBalancer".into(), "Table".into()]
        } else {
            vec![]
        };
        let mut got = commands::protected(&s);
        got.sort();
        assert_eq!(got, want, "{stage}");
        let mut off = staged(t.clone(), stage);
        off.params.insert("DeletionProtection".into(), "off".into());
        assert_eq!(
            commands::protected(&off),
            Vec::<String>::new(),
            "{stage} off"
        );
        // Teardown: the NLB's off, the table's as the stage says.
        let mut teardown = staged(t.clone(), stage);
        teardown
            .params
            .insert("DeletionProtection".into(), "teardown".into());
        let want: Vec<String> = want.into_iter().filter(|r| r == "Table").collect();
        assert_eq!(commands::protected(&teardown), want, "{stage} teardown");
    }
    assert!(
        t["Parameters"]["DeletionProtection"]["Default"] == "stage",
        "an unnamed DeletionProtection must keep the stage's protection"
    );
}

fn worker_capacity_problems(s: &Stack) -> Vec<String> {
    let mut p = Vec::new();
    let props = &s.resource("WorkerGroup")["Properties"];
    if props.get("DesiredCapacity").is_some() {
        p.push("WorkerGroup sets DesiredCapacity: every update that touches the group resets an autoscaled group to it".into());
    }
    let num = |k: &str| {
        scalar(&s.prop("WorkerGroup", k))
            .parse::<u64>()
            .unwrap_or(0)
    };
    if num("MinSize") == 0 || num("MinSize") > num("MaxSize") {
        p.push(format!(
            "WorkerGroup MinSize {} MaxSize {}",
            num("MinSize"),
            num("MaxSize")
        ));
    }
    p
}

/// Before: "WorkerGroup sets DesiredCapacity: every update that touches the
/// group resets an autoscaled group to it".
#[test]
fn the_worker_count_after_creation_is_the_autoscalers() {
    for s in stacks() {
        assert_none(worker_capacity_problems(&s));
    }
    let s = edited(|t| {
        t["Resources"]["WorkerGroup"]["Properties"]["DesiredCapacity"] = json!("3");
    });
    assert!(!worker_capacity_problems(&s).is_empty());
}

/// Before: the cluster took `VpcId`, `VpcCidr` and `PrivateSubnetIds` as
/// parameters ("cluster.json takes the network as parameter VpcId") and
/// imported nothing.
#[test]
fn the_cluster_imports_the_network_so_the_network_cannot_go_first() {
    let t = template("cluster.json");
    for p in ["VpcId", "VpcCidr", "PrivateSubnetIds"] {
        assert!(
            t["Parameters"].get(p).is_none(),
            "cluster.json takes the network as parameter {p}"
        );
    }
    for stage in STAGES {
        let s = staged(t.clone(), stage);
        let exports = network(stage).exports();
        let names = s.import_names();
        for what in ["VpcId", "VpcCidr", "PrivateSubnetIds"] {
            let name = format!("kubeboot-{stage}-{NAME}-{what}");
            assert!(
                names.contains(&name),
                "{stage}: cluster.json does not import {name}"
            );
        }
        for n in &names {
            assert!(exports.contains_key(n), "{stage}: nothing exports {n}");
        }
        // Resolved as a deployed stack sees them.
        assert_eq!(
            s.prop("ControlPlaneGroup", "VPCZoneIdentifier"),
            json!([
                "PrivateSubnetA-id",
                "PrivateSubnetB-id",
                "PrivateSubnetC-id"
            ])
        );
        assert_eq!(s.prop("ApiTargetGroup", "VpcId"), json!("Vpc-id"));
    }
}

/// Every resource a group's termination hook needs while the leader drains
/// a node: the security-group rules (6443, etcd, kubelet, pod network) and
/// the API listener. CloudFormation deletes a resource before what it
/// depends on, so these must be in each group's dependency closure.
fn teardown_order_problems(s: &Stack) -> Vec<String> {
    let mut p = Vec::new();
    let mut needed: Vec<String> = s.of_type("AWS::EC2::SecurityGroupIngress");
    needed.extend(s.of_type("AWS::EC2::SecurityGroupEgress"));
    needed.extend(s.of_type("AWS::ElasticLoadBalancingV2::Listener"));
    needed.extend([
        "LifecycleRule".to_string(),
        "LifecycleQueuePolicy".to_string(),
    ]);
    for group in s.of_type("AWS::AutoScaling::AutoScalingGroup") {
        let closure = s.dependency_closure(&group);
        for n in &needed {
            if !closure.contains(n) {
                p.push(format!("{group} does not depend on {n}: delete-stack may remove it while the group's hooks still need it"));
            }
        }
    }
    if !s
        .dependency_closure("BackupBucket")
        .contains("AccessLogBucketPolicy")
    {
        p.push("BackupBucket does not depend on AccessLogBucketPolicy: its access logging may be set up before the log bucket accepts the logs".into());
    }
    p
}

/// Before: "ControlPlaneGroup does not depend on ApiFromLoadBalancer:
/// delete-stack may remove it while the group's hooks still need it" (and
/// the other rules, the listener, both groups; and the backup bucket's
/// logging before the log bucket's policy).
#[test]
fn a_delete_removes_the_groups_before_the_rules_and_the_listener_their_hooks_need() {
    for s in stacks() {
        assert_none(teardown_order_problems(&s));
    }
    let s = edited(|t| {
        for g in ["ControlPlaneGroup", "WorkerGroup"] {
            t["Resources"][g]["DependsOn"] = json!(["LifecycleRule", "LifecycleQueuePolicy"]);
        }
        t["Resources"]["BackupBucket"]
            .as_object_mut()
            .expect("bucket")
            .remove("DependsOn");
    });
    let problems = teardown_order_problems(&s);
    for want in [
        "ControlPlaneGroup does not depend on EtcdFromControlPlanes",
        "WorkerGroup does not depend on ApiListener",
        "BackupBucket does not depend on AccessLogBucketPolicy",
    ] {
        assert!(
            problems.iter().any(|p| p.contains(want)),
            "{want}: {problems:#?}"
        );
    }
}

/// `PT1H30M` as a duration.
fn iso_duration(text: &str) -> Option<std::time::Duration> {
    let rest = text.strip_prefix("PT")?;
    let mut secs = 0u64;
    let mut number = String::new();
    for c in rest.chars() {
        match c {
            '0'..='9' => number.push(c),
            'H' | 'M' | 'S' => {
                let n: u64 = std::mem::take(&mut number).parse().ok()?;
                secs += n * match c {
                    'H' => 3600,
                    'M' => 60,
                    _ => 1,
                };
            }
            _ => return None,
        }
    }
    number
        .is_empty()
        .then_some(std::time::Duration::from_secs(secs))
}

/// From an instance's launch to the agent's start (EC2 boot, systemd).
const BOOT_MARGIN: std::time::Duration = std::time::Duration::from_secs(5 * 60);

/// How control planes roll: one at a time, each replacement signalled in
/// (joined, its etcd member confirmed) before an old one goes, within a
/// pause longer than the agent's own join deadlines; and the first create
/// waits for one signal per control plane.
fn rolling_problems(s: &Stack) -> Vec<String> {
    let mut p = Vec::new();
    let group = s.resource("ControlPlaneGroup");
    let count = |k: &str| {
        scalar(&s.prop("ControlPlaneGroup", k))
            .parse::<u64>()
            .unwrap_or(0)
    };
    let desired = count("DesiredCapacity");
    let cfg = node_config(s, Role::ControlPlane);
    let t = &cfg.timeouts;
    // A control plane that replaces another: wait for join material, kubeadm
    // join, learner promotion, Ready, and the membership lock. The lock is
    // not free during a roll: CloudFormation terminates the old instance
    // after the new one signals, and the old one's termination hook (the
    // leader removes its etcd member under the membership lock) can overlap
    // the NEXT replacement's join, which then waits up to
    // lock.acquire_timeout. The values are the user-data's (the agent's
    // defaults where it sets none), plus a margin for the instance's boot
    // before the agent starts.
    let join = cfg.lock.acquire_timeout
        + t.join_material
        + t.kubeadm_join
        + cfg.etcd.promote_timeout
        + t.node_ready
        + BOOT_MARGIN;
    let Some(rolling) = group["UpdatePolicy"]["AutoScalingRollingUpdate"].as_object() else {
        p.push("ControlPlaneGroup has no UpdatePolicy AutoScalingRollingUpdate: launch template changes never reach running control planes".into());
        return p;
    };
    let rolling = s.eval(&Value::Object(rolling.clone()));
    let num = |k: &str| scalar(&rolling[k]).parse::<u64>().unwrap_or(0);
    if num("MaxBatchSize") != 1 {
        p.push(format!(
            "MaxBatchSize {}: control planes must roll one at a time",
            rolling["MaxBatchSize"]
        ));
    }
    if num("MinInstancesInService") != desired {
        p.push(format!(
            "MinInstancesInService {} is not the control-plane count {desired}: the update would remove one before its replacement joined",
            rolling["MinInstancesInService"]
        ));
    }
    if num("MinInstancesInService") >= count("MaxSize") {
        p.push(format!(
            "MinInstancesInService {} is not below MaxSize {}: CloudFormation cannot add the replacement first",
            rolling["MinInstancesInService"],
            count("MaxSize")
        ));
    }
    if rolling["WaitOnResourceSignals"] != true {
        p.push("the rolling update does not wait for the new control plane's signal".into());
    }
    let pause = iso_duration(&scalar(&rolling["PauseTime"]));
    if !pause.is_some_and(|d| d >= join && d <= std::time::Duration::from_secs(3600)) {
        p.push(format!(
            "PauseTime {} is not above the agent's join deadlines with the membership lock and a boot margin ({} s) and at most PT1H",
            rolling["PauseTime"],
            join.as_secs()
        ));
    }
    let suspended = strings(&rolling["SuspendProcesses"]);
    for process in [
        "HealthCheck",
        "ReplaceUnhealthy",
        "AZRebalance",
        "AlarmNotification",
        "ScheduledActions",
    ] {
        if !suspended.contains(process) {
            p.push(format!("the rolling update does not suspend {process}"));
        }
    }
    let signal = s.eval(&group["CreationPolicy"]["ResourceSignal"]);
    if scalar(&signal["Count"]).parse::<u64>().ok() != Some(desired) {
        p.push(format!(
            "CreationPolicy waits for {} signals, the group starts {desired} control planes",
            signal["Count"]
        ));
    }
    // The first create: init and Ready, then the others join one by one
    // under the membership lock.
    let create = t.kubeadm_init
        + t.node_ready
        + BOOT_MARGIN
        + cfg.lock.acquire_timeout
        + join * u32::try_from(desired.saturating_sub(1)).unwrap_or(0);
    if iso_duration(&scalar(&signal["Timeout"])).is_none_or(|d| d <= create) {
        p.push(format!(
            "CreationPolicy Timeout {} is not above the first create's deadlines ({} s)",
            signal["Timeout"],
            create.as_secs()
        ));
    }
    p
}

/// Before: "ControlPlaneGroup has no UpdatePolicy AutoScalingRollingUpdate:
/// launch template changes never reach running control planes".
#[test]
fn control_planes_roll_one_at_a_time_each_signalled_in_before_an_old_one_goes() {
    for s in stacks() {
        assert_none(rolling_problems(&s));
    }
    let s = edited(|t| {
        let r =
            &mut t["Resources"]["ControlPlaneGroup"]["UpdatePolicy"]["AutoScalingRollingUpdate"];
        r["MinInstancesInService"] = json!(2);
        r["PauseTime"] = json!("PT15M");
        r["MaxBatchSize"] = json!(2);
    });
    let problems = rolling_problems(&s);
    for want in [
        "MinInstancesInService 2 is not the control-plane count 3",
        "PauseTime \"PT15M\"",
        "MaxBatchSize 2",
    ] {
        assert!(
            problems.iter().any(|p| p.contains(want)),
            "{want}: {problems:#?}"
        );
    }
    let s = edited(|t| {
        t["Resources"]["ControlPlaneGroup"]
            .as_object_mut()
            .expect("group")
            .remove("UpdatePolicy");
    });
    assert!(rolling_problems(&s)[0].contains("no UpdatePolicy"));
    // The deadlines are read from the user-data: without its [lock] value the
    // agent's default (20m) no longer fits.
    let s = edited(|t| {
        let sub = &mut t["Resources"]["ControlPlaneLaunchTemplate"]["Properties"]
            ["LaunchTemplateData"]["UserData"]["Fn::Base64"]["Fn::Sub"];
        let text = scalar(sub);
        assert!(text.contains("acquire_timeout = \"15m\"\n"), "{text}");
        *sub = json!(text.replacen("acquire_timeout = \"15m\"\n", "", 1));
    });
    let problems = rolling_problems(&s);
    assert!(
        problems
            .iter()
            .any(|p| p.contains("PauseTime \"PT1H\" is not above the agent's join deadlines with the membership lock and a boot margin (3720 s)")),
        "{problems:#?}"
    );
}

/// Before: the subnets took the first three of `Fn::GetAZs` ("PrivateSubnetA
/// is not in a chosen AZ").
#[test]
fn the_subnets_use_three_chosen_distinct_azs() {
    let t = template("network.json");
    let mut getazs = Vec::new();
    find_all(&t, "Fn::GetAZs", &mut getazs);
    assert!(getazs.is_empty(), "network.json still uses Fn::GetAZs");
    let s = network_with(t.clone(), "dev");
    for (az, param) in [
        ("A", "AvailabilityZoneA"),
        ("B", "AvailabilityZoneB"),
        ("C", "AvailabilityZoneC"),
    ] {
        assert!(
            t["Parameters"][param].get("Default").is_none(),
            "{param} has a default"
        );
        for kind in ["Private", "Public"] {
            let id = format!("{kind}Subnet{az}");
            assert_eq!(
                t["Resources"][&id]["Properties"]["AvailabilityZone"],
                json!({"Ref": param}),
                "{id} is not in a chosen AZ"
            );
        }
    }
    assert_eq!(s.rule_failures(), Vec::<String>::new());
    let mut same = network_with(t, "dev");
    same.params
        .insert("AvailabilityZoneC".into(), "eu-west-1a".into());
    assert_eq!(
        same.rule_failures(),
        vec!["DistinctAvailabilityZones: AvailabilityZoneA and AvailabilityZoneC must differ: the cluster spreads over three AZs".to_string()]
    );
}

/// The README's cost table counts the interface endpoints network.json makes.
#[test]
fn the_cost_table_counts_the_interface_endpoints_the_network_makes() {
    let t = template("network.json");
    let n = t["Resources"]
        .as_object()
        .expect("resources")
        .values()
        .filter(|r| {
            r["Type"] == "AWS::EC2::VPCEndpoint"
                && r["Properties"]["VpcEndpointType"] == "Interface"
        })
        .count();
    let text = readme();
    assert!(
        text.contains(&format!("| Interface VPC endpoints ({n} services) |")),
        "infra/README.md's cost table does not count {n} interface endpoints"
    );
    assert_none(cost_count_problems(&text));
}

/// The logical ids of `kind` resources in both templates.
fn resources_of_type(kind: &str) -> Vec<String> {
    let mut out = Vec::new();
    for file in ["network.json", "cluster.json"] {
        let t = template(file);
        for (id, r) in t["Resources"].as_object().expect("resources") {
            if r["Type"] == kind {
                out.push(id.clone());
            }
        }
    }
    out
}

/// The cost table's KMS key and secret rows against the templates: each
/// customer-managed key is $1 a month, each secret $0.40 a month, in every
/// stage (none of them is conditional).
fn cost_count_problems(text: &str) -> Vec<String> {
    let mut p = Vec::new();
    let keys = resources_of_type("AWS::KMS::Key");
    let secrets = resources_of_type("AWS::SecretsManager::Secret");
    for (what, n, price) in [
        ("KMS keys", keys.len(), 1.0),
        ("Secrets Manager secrets", secrets.len(), 0.40),
    ] {
        let cost = format!("${:.2}", n as f64 * price);
        let row = text
            .lines()
            .find(|l| l.starts_with(&format!("| {what} (")))
            .unwrap_or_default();
        if !row.starts_with(&format!("| {what} ({n}: "))
            || row.matches(&format!(" {cost} |")).count() != 3
        {
            p.push(format!(
                "infra/README.md's cost table row {row:?} does not count the templates' {n} {what} ({}) at {cost} in each stage",
                match what {
                    "KMS keys" => keys.join(", "),
                    _ => secrets.join(", "),
                }
            ));
        }
    }
    p
}

/// cluster-autoscaler's role (IAM roles for service accounts): only its
/// ServiceAccount, `kube-system/cluster-autoscaler`, with tokens of this
/// cluster's issuer for the audience STS checks, through the stack's OIDC
/// provider, may assume it; the provider is for the issuer the control
/// planes give the API server; it scales only groups tagged for this
/// cluster and for autoscaling, which the worker group is and the control
/// planes' is not.
fn autoscaler_problems(s: &Stack) -> Vec<String> {
    let mut p = Vec::new();
    let issuer = node_config(s, Role::ControlPlane)
        .cluster
        .service_account_issuer
        .expect("the control planes' user-data sets an issuer");
    let provider = scalar(&s.eval(&json!({"Ref": "OidcProvider"})));
    if scalar(&s.prop("OidcProvider", "Url")) != issuer {
        p.push(format!("OidcProvider's Url is not the issuer {issuer}"));
    }
    if s.prop("OidcProvider", "ClientIdList") != json!(["sts.amazonaws.com"]) {
        p.push("OidcProvider's audience is not sts.amazonaws.com alone".into());
    }
    let text = scalar(&s.prop("ClusterAutoscalerRole", "AssumeRolePolicyDocument"));
    let trust: Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("trust policy: {e}: {text}"));
    let statements = trust["Statement"].as_array().cloned().unwrap_or_default();
    if statements.len() != 1 {
        p.push(format!(
            "the trust policy has {} statements, not 1",
            statements.len()
        ));
    }
    let host = issuer.trim_start_matches("https://");
    for st in &statements {
        if st["Principal"] != json!({"Federated": provider}) {
            p.push(format!(
                "trusted principal {} is not the stack's OIDC provider {provider}",
                st["Principal"]
            ));
        }
        if st["Action"] != "sts:AssumeRoleWithWebIdentity" {
            p.push(format!("trust action {}", st["Action"]));
        }
        let want = json!({"StringEquals": {
            format!("{host}:sub"): "system:serviceaccount:kube-system:cluster-autoscaler",
            format!("{host}:aud"): "sts.amazonaws.com",
        }});
        if st["Condition"] != want {
            p.push(format!("trust condition {} is not {want}", st["Condition"]));
        }
    }
    let policies = s.prop("ClusterAutoscalerRole", "Policies");
    let mut scaling = Vec::new();
    find_all(&policies, "Statement", &mut scaling);
    for st in scaling
        .iter()
        .flat_map(|v| v.as_array().into_iter().flatten())
    {
        let actions = strings(&st["Action"]);
        let changes = actions.iter().any(|a| {
            [
                "autoscaling:SetDesiredCapacity",
                "autoscaling:TerminateInstanceInAutoScalingGroup",
            ]
            .contains(&a.as_str())
        });
        if actions.iter().any(|a| a.ends_with('*')) {
            p.push(format!("a wildcard action: {actions:?}"));
        }
        if changes {
            let tags = &st["Condition"]["StringEquals"];
            if tags["aws:ResourceTag/kubeboot:cluster"] != json!(cluster(s))
                || tags["aws:ResourceTag/k8s.io/cluster-autoscaler/enabled"] != "true"
            {
                p.push(format!(
                    "scaling is not limited to this cluster's autoscaled groups: {}",
                    st["Condition"]
                ));
            }
        }
    }
    let tagged = |group: &str, key: &str, value: &str| {
        s.prop(group, "Tags")
            .as_array()
            .into_iter()
            .flatten()
            .any(|t| scalar(&t["Key"]) == key && scalar(&t["Value"]) == value)
    };
    if !tagged("WorkerGroup", "kubeboot:cluster", &cluster(s))
        || !tagged("WorkerGroup", "k8s.io/cluster-autoscaler/enabled", "true")
    {
        p.push("the worker group lacks the tags the autoscaler may scale".into());
    }
    if tagged(
        "ControlPlaneGroup",
        "k8s.io/cluster-autoscaler/enabled",
        "true",
    ) {
        p.push(
            "the control planes' group is autoscaled: the autoscaler could break etcd's quorum"
                .into(),
        );
    }
    p
}

#[test]
fn the_cluster_autoscaler_role_trusts_only_its_service_account_and_scales_only_worker_groups() {
    for s in stacks() {
        assert_none(autoscaler_problems(&s));
    }
    // Each condition matters: a trust policy without the subject (any
    // ServiceAccount of the cluster could assume it), another audience, or
    // a scaling grant without the cluster's tag is caught.
    let t = template("cluster.json");
    let trust = |t: &Value| {
        scalar(
            &t["Resources"]["ClusterAutoscalerRole"]["Properties"]["AssumeRolePolicyDocument"]
                ["Fn::Sub"],
        )
    };
    for (from, to) in [
        (
            "\"${OidcBucket.RegionalDomainName}/${Stage}-${ClusterName}:sub\":\"system:serviceaccount:kube-system:cluster-autoscaler\",",
            "",
        ),
        ("sts.amazonaws.com", "example.com"),
    ] {
        let mut edited = t.clone();
        let text = trust(&t).replacen(from, to, 1);
        assert_ne!(text, trust(&t), "{from} is in the trust policy");
        edited["Resources"]["ClusterAutoscalerRole"]["Properties"]["AssumeRolePolicyDocument"] =
            json!({"Fn::Sub": text});
        assert!(
            !autoscaler_problems(&cluster_stack(edited)).is_empty(),
            "{from} -> {to:?} not caught"
        );
    }
    let mut edited = t.clone();
    let statements = edited["Resources"]["ClusterAutoscalerRole"]["Properties"]["Policies"][0]
        ["PolicyDocument"]["Statement"]
        .as_array_mut()
        .expect("statements");
    for st in statements.iter_mut() {
        if let Some(c) = st.get_mut("Condition") {
            c["StringEquals"]
                .as_object_mut()
                .expect("StringEquals")
                .remove("aws:ResourceTag/kubeboot:cluster");
        }
    }
    assert!(!autoscaler_problems(&cluster_stack(edited)).is_empty());
}

/// The pod network the control planes apply (addons/flannel.yaml) can carry
/// traffic: its backend's port is open between every pair of node groups,
/// in both directions, and nowhere else.
#[test]
fn the_pod_networks_vxlan_port_is_open_between_all_nodes() {
    let path = workspace_root().join("addons/flannel.yaml");
    let text = std::fs::read_to_string(&path).expect("flannel.yaml");
    let vars = kubeboot_tests::fixtures::addon_variables();
    let addon = kubeboot::addons::parse("flannel", &path, &text, &vars).expect("flannel");
    let config = addon
        .objects
        .iter()
        .find(|o| o.kind.kind == "ConfigMap")
        .expect("kube-flannel-cfg");
    let net: Value = serde_json::from_str(
        config.body["data"]["net-conf.json"]
            .as_str()
            .expect("net-conf"),
    )
    .expect("JSON");
    assert_eq!(net["Backend"]["Type"], "vxlan");
    // flannel's VXLAN default on Linux (pkg/backend/vxlan: the kernel's
    // IANA-less 8472, not 4789) unless the backend names a Port.
    let port = net["Backend"]["Port"].as_u64().unwrap_or(8472);
    for s in stacks() {
        let mut pairs = BTreeSet::new();
        for id in s.of_type("AWS::EC2::SecurityGroupIngress") {
            let r = s.resource(&id)["Properties"].clone();
            if r["IpProtocol"] == "udp"
                && r["FromPort"] == json!(port)
                && r["ToPort"] == json!(port)
            {
                let from = scalar(&r["SourceSecurityGroupId"]["Ref"]);
                let to = scalar(&r["GroupId"]["Ref"]);
                pairs.insert((from, to));
            }
        }
        let groups = ["ControlPlaneSecurityGroup", "WorkerSecurityGroup"];
        let want: BTreeSet<(String, String)> = groups
            .iter()
            .flat_map(|a| groups.iter().map(move |b| (a.to_string(), b.to_string())))
            .collect();
        assert_eq!(pairs, want, "UDP {port} between the node groups");
    }
}
