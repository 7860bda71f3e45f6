//! `kubeadm reset`: the member removed, the node's files cleaned.

use crate::api::{kubeconfig_server, Api};
use crate::cli::parse_flags;
use crate::config::klog_stamp;
use crate::etcd::etcd_client;
use crate::etcd::etcd_msg;
use crate::etcd::{set_pki_dir, transient, LocalEtcd};
use crate::helpers::knob;
use crate::helpers::{clear_dir, guard_paths, parent, plain_err, R};
use crate::join::etcd_endpoints_from_pods;
use crate::join::member_list_via;
use crate::DEFAULT_CERT_DIR;
use kubeboot_tests::standin;
use kubeboot_tests::standin::etcd_data_dir_for;
use kubeboot_tests::standin::etcd_pids_for;
use kubeboot_tests::standin::forget_pid;
use kubeboot_tests::standin::is_etcd_for;
use kubeboot_tests::standin::stop_groups;
use std::collections::BTreeSet;
use std::io::BufRead as _;
use std::io::Write as _;
use std::path::PathBuf;
use std::time::Duration;
use std::time::Instant;

pub(crate) async fn reset(args: &[String]) -> R<()> {
    let flags = parse_flags(
        args,
        &[
            ("force", false),
            ("cert-dir", true),
            ("kubeconfig", true),
            ("cleanup-tmp-dir", false),
            ("ignore-preflight-errors", true),
            ("cri-socket", true),
            ("dry-run", false),
        ],
    )?;
    let pki = PathBuf::from(flags.value("cert-dir").unwrap_or(DEFAULT_CERT_DIR));
    set_pki_dir(&pki);
    let k8s = parent(&pki);
    let manifests = k8s.join("manifests");
    let local = LocalEtcd::from_manifest(&manifests.join("etcd.yaml"));
    let data_dir = local
        .as_ref()
        .map(|m| m.data_dir.clone())
        .unwrap_or_else(|| etcd_data_dir_for(&k8s));
    guard_paths(&[&k8s, &data_dir])?;
    let kubeconfig_path = flags
        .value("kubeconfig")
        .map(PathBuf::from)
        .unwrap_or_else(|| k8s.join("admin.conf"));
    let server = kubeconfig_server(&kubeconfig_path)
        .or_else(|_| kubeconfig_server(&k8s.join("kubelet.conf")));
    let api = match &server {
        Ok(s) => {
            println!("[reset] Reading configuration from the cluster...");
            println!("[reset] FYI: You can look at this config file with 'kubectl -n kube-system get cm kubeadm-config -o yaml'");
            let mut api = Api::new(s);
            api.patience = Duration::from_secs(2);
            Some(api)
        }
        Err(e) => {
            eprintln!("W{} {:>7} reset.go:124] [reset] Unable to fetch the kubeadm-config ConfigMap from cluster: failed to get config map: {e}", klog_stamp(), std::process::id());
            None
        }
    };
    if !flags.on("force") {
        print!("[reset] WARNING: Changes made to this host by 'kubeadm init' or 'kubeadm join' will be reverted.\n[reset] Are you sure you want to proceed? [y/N]: ");
        let _ = std::io::stdout().flush();
        let mut answer = String::new();
        let _ = std::io::stdin().lock().read_line(&mut answer);
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            return Err(plain_err("aborted reset operation"));
        }
    }
    println!("[preflight] Running pre-flight checks");

    // remove-etcd-member
    if let Some(m) = &local {
        remove_own_member(api.as_ref(), m).await;
        if let Some(api) = &api {
            let node = &m.name;
            if let Err(e) = api
                .delete(&format!("/api/v1/namespaces/kube-system/pods/etcd-{node}"))
                .await
            {
                eprintln!("W[reset] Failed to delete the etcd mirror Pod etcd-{node}: {e}");
            }
        }
    } else {
        println!("[reset] No etcd config found. Assuming external etcd");
        println!("[reset] Please, manually reset etcd to prevent further issues");
    }

    // cleanup-node: stop what the kubelet ran, then delete files
    println!("[reset] Stopping the kubelet service");
    let state_dir = k8s.join(standin::STATE_DIR);
    let mut pids: BTreeSet<u32> = etcd_pids_for(&data_dir).into_iter().collect();
    if let Some(pid) = std::fs::read_to_string(state_dir.join("etcd.pid"))
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .filter(|p| is_etcd_for(*p, &data_dir))
    {
        pids.insert(pid);
    }
    let pids: Vec<u32> = pids.into_iter().collect();
    stop_groups(&pids, Duration::from_secs(2));
    for pid in &pids {
        forget_pid(*pid);
    }
    println!("[reset] Unmounting mounted directories in \"/var/lib/kubelet\"");
    let wipe =
        |r: Result<(), String>| r.map_err(|e| plain_err(format!("[reset] Failed to delete: {e}")));
    if data_dir.exists() {
        wipe(clear_dir(&data_dir))?;
        println!(
            "[reset] Deleted contents of the etcd data directory: {}",
            data_dir.display()
        );
    }
    let dirs = [manifests.clone(), pki.clone()];
    println!(
        "[reset] Deleting contents of directories: [{}]",
        dirs.iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(" ")
    );
    for d in &dirs {
        wipe(clear_dir(d))?;
    }
    let files: Vec<PathBuf> = [
        "admin.conf",
        "super-admin.conf",
        "kubelet.conf",
        "bootstrap-kubelet.conf",
        "controller-manager.conf",
        "scheduler.conf",
    ]
    .iter()
    .map(|f| k8s.join(f))
    .collect();
    println!(
        "[reset] Deleting files: [{}]",
        files
            .iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(" ")
    );
    for f in &files {
        match std::fs::remove_file(f) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(plain_err(format!(
                    "[reset] Failed to delete {}: {e}",
                    f.display()
                )))
            }
        }
    }
    if state_dir.exists() {
        std::fs::remove_dir_all(&state_dir).map_err(|e| {
            plain_err(format!(
                "[reset] Failed to delete {}: {e}",
                state_dir.display()
            ))
        })?;
    }
    println!(
        "\nThe reset process does not clean CNI configuration. To do so, you must remove /etc/cni/net.d\n\n\
The reset process does not reset or clean up iptables rules or IPVS tables.\n\
If you wish to reset iptables, you must do so manually by using the \"iptables\" command.\n\n\
The reset process does not clean your kubeconfig files and you must remove them manually.\n\
Please, check the contents of the $HOME/.kube/config file."
    );
    Ok(())
}

/// Removes this node's etcd member through the other members (then its
/// own), as `kubeadm reset` does. Failures are warnings: kubeadm reset
/// carries on and leaves the member for the operator.
pub(crate) async fn remove_own_member(api: Option<&Api>, m: &LocalEtcd) {
    let mut endpoints = match api {
        Some(api) => etcd_endpoints_from_pods(api).await.unwrap_or_default(),
        None => Vec::new(),
    };
    endpoints.retain(|e| *e != m.client_url);
    endpoints.push(m.client_url.clone());
    let warn = |e: String| {
        eprintln!(
            "W{} {:>7} removeetcdmember.go:105] [reset] Failed to remove etcd member: {e}, please manually remove this etcd member using etcdctl",
            klog_stamp(),
            std::process::id()
        );
    };
    let members = match member_list_via(&endpoints).await {
        Ok(list) => list,
        Err(e) => return warn(format!("error syncing endpoints with etcd: {e}")),
    };
    let Some(me) = members.iter().find(|x| x.peer_urls().contains(&m.peer_url)) else {
        println!(
            "[reset] No etcd member with peer URL {} found; nothing to remove",
            m.peer_url
        );
        return;
    };
    if members.len() == 1 {
        println!(
            "[reset] This is the only remaining etcd member in the etcd cluster, skip removing it"
        );
        return;
    }
    let id = me.id();
    let usable: Vec<String> = members
        .iter()
        .filter(|x| x.id() != id && !x.is_learner())
        .flat_map(|x| x.client_urls().to_vec())
        .chain(std::iter::once(m.client_url.clone()))
        .collect();
    let deadline = Instant::now() + knob("KBTEST_KUBEADM_RECONFIG_TIMEOUT_MS", 30_000);
    let mut last = String::new();
    while Instant::now() < deadline {
        for ep in &usable {
            let Ok(mut c) = etcd_client(std::slice::from_ref(ep)).await else {
                continue;
            };
            match c.member_remove(id).await {
                Ok(_) => {
                    println!(
                        "[reset] Removed etcd member {id:x} ({}) from the cluster",
                        m.peer_url
                    );
                    return;
                }
                Err(e) => {
                    last = etcd_msg(&e);
                    if last.contains("member not found") {
                        return;
                    }
                    if !transient(&last) {
                        return warn(last);
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    warn(last)
}
