//! `kubeadm token` (create, delete) and the advertise-address
//! defaulting it shares with `init`.

use crate::api::{kubeconfig_server, Api};
use crate::certificates::ca_pin;
use crate::cli::parse_flags;
use crate::config::{find_kind, load_documents, parse_token, str_at};
use crate::helpers::{generate_token, parse_go_duration, plain_err, R};
use crate::init::{token_secret, TokenSpec};
use crate::{B64, DEFAULT_TOKEN_GROUP};
use base64::Engine as _;
use serde_json::Value;
use std::net::IpAddr;
use std::path::PathBuf;

/// kubeadm's defaulting of `localAPIEndpoint.advertiseAddress`, which
/// `token create` and `init phase upload-certs` run on their configuration
/// like `init` (upstream `SetAPIEndpointDynamicDefaults` →
/// `ChooseAPIServerBindAddress` → apimachinery's `ResolveBindAddress`):
/// without an address (or with an unspecified or loopback one) kubeadm picks
/// the host's, reading the default routes and then the interfaces' addresses
/// with Go's `net.InterfaceByName`/`Addrs`, which on Linux is a netlink
/// dump (`syscall.NetlinkRIB`: an `AF_NETLINK`/`NETLINK_ROUTE` socket). The
/// stand-in makes the same dump (and ignores the answer); when the socket
/// is refused (`RestrictAddressFamilies=` without `AF_NETLINK` gives
/// `EAFNOSUPPORT`) it fails as kubeadm does, with Go's error.
pub(crate) fn default_advertise_address(init: Option<&Value>) -> R<()> {
    let given = init
        .and_then(|d| str_at(d, "/localAPIEndpoint/advertiseAddress"))
        .filter(|a| !a.is_empty());
    if let Some(address) = given {
        let ip: IpAddr = address.parse().map_err(|_| {
            plain_err(format!(
                "couldn't use \"{address}\" as \"apiserver-advertise-address\", must be ipv4 or ipv6 address"
            ))
        })?;
        if !ip.is_unspecified() && !ip.is_loopback() {
            return Ok(());
        }
    }
    netlink_link_dump().map_err(|e| {
        plain_err(format!(
            "route ip+net: netlinkrib: {}",
            e.desc().to_lowercase()
        ))
    })
}

/// `syscall.NetlinkRIB(RTM_GETLINK, AF_UNSPEC)`: socket, bind, one dump
/// request, read until `NLMSG_DONE`.
pub(crate) fn netlink_link_dump() -> nix::Result<()> {
    use nix::sys::socket::{
        bind, recv, send, socket, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol,
        SockType,
    };
    use std::os::fd::AsRawFd as _;
    const RTM_GETLINK: u16 = 18;
    const NLM_F_REQUEST_DUMP: u16 = 0x301;
    const NLMSG_DONE: u16 = 3;
    const NLMSG_ERROR: u16 = 2;
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkRoute,
    )?;
    bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0))?;
    // nlmsghdr (len, type, flags, seq, pid) + rtgenmsg (family).
    let mut request = Vec::with_capacity(17);
    request.extend_from_slice(&17u32.to_ne_bytes());
    request.extend_from_slice(&RTM_GETLINK.to_ne_bytes());
    request.extend_from_slice(&NLM_F_REQUEST_DUMP.to_ne_bytes());
    request.extend_from_slice(&1u32.to_ne_bytes());
    request.extend_from_slice(&0u32.to_ne_bytes());
    request.push(0);
    send(fd.as_raw_fd(), &request, MsgFlags::empty())?;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty())?;
        let mut at = 0;
        while at + 16 <= n {
            let len = u32::from_ne_bytes(buf[at..at + 4].try_into().unwrap_or_default()) as usize;
            let kind = u16::from_ne_bytes(buf[at + 4..at + 6].try_into().unwrap_or_default());
            if kind == NLMSG_DONE || kind == NLMSG_ERROR || len < 16 {
                return Ok(());
            }
            at += (len + 3) & !3;
        }
        if n == 0 {
            return Ok(());
        }
    }
}

pub(crate) async fn token(args: &[String]) -> R<()> {
    let Some((sub, rest)) = args.split_first() else {
        return Err(plain_err(
            "the kubeadm stand-in implements `token create` and `token delete`",
        ));
    };
    let flags = parse_flags(
        rest,
        &[
            ("kubeconfig", true),
            ("ttl", true),
            ("print-join-command", false),
            ("description", true),
            ("groups", true),
            ("usages", true),
            ("config", true),
            ("certificate-key", true),
            ("dry-run", false),
        ],
    )?;
    let kubeconfig_path = PathBuf::from(
        flags
            .value("kubeconfig")
            .unwrap_or("/etc/kubernetes/admin.conf"),
    );
    let server = kubeconfig_server(&kubeconfig_path)
        .map_err(|e| plain_err(format!("failed to load admin kubeconfig: {e}")))?;
    let api = Api::new(&server);
    match sub.as_str() {
        "create" => {
            // As kubeadm: with --config, the InitConfiguration's first
            // bootstrap token (so the token need not be on the command line).
            let docs = match flags.value("config") {
                Some(path) => load_documents(path)?,
                None => Vec::new(),
            };
            let init_doc = find_kind(&docs, "InitConfiguration");
            default_advertise_address(init_doc)?;
            let from_config = init_doc
                .and_then(|d| str_at(d, "/bootstrapTokens/0/token"))
                .map(str::to_string);
            let token = match from_config
                .as_deref()
                .or(flags.positional.first().map(String::as_str))
            {
                Some(t) => parse_token(t, "token")?,
                None => parse_token(&generate_token(), "token")?,
            };
            let ttl = parse_go_duration(flags.value("ttl").unwrap_or("24h0m0s")).map_err(|e| {
                plain_err(format!(
                    "invalid argument \"{}\" for \"--ttl\" flag: {e}",
                    flags.value("ttl").unwrap_or("")
                ))
            })?;
            let list = |v: Option<&str>, d: &str| -> Vec<String> {
                v.unwrap_or(d)
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect()
            };
            let spec = TokenSpec {
                token: token.clone(),
                ttl,
                usages: list(flags.value("usages"), "signing,authentication"),
                groups: list(flags.value("groups"), DEFAULT_TOKEN_GROUP),
                description: flags.value("description").unwrap_or("").into(),
            };
            match api
                .create(
                    "/api/v1/namespaces/kube-system/secrets",
                    &token_secret(&spec),
                )
                .await
            {
                Ok(_) => {}
                Err(f) if f.code == 409 => {
                    return Err(plain_err(format!(
                        "a token with id {:?} already exists",
                        token.id
                    )))
                }
                Err(f) => {
                    return Err(plain_err(format!(
                    "failed to create or update bootstrap token with name bootstrap-token-{}: {f}",
                    token.id
                )))
                }
            }
            if flags.on("print-join-command") {
                let info = api
                    .get("/api/v1/namespaces/kube-public/configmaps/cluster-info")
                    .await
                    .map_err(|e| plain_err(format!("failed to get cluster-info: {e}")))?
                    .ok_or_else(|| {
                        plain_err(
                            "failed to get cluster-info: configmaps \"cluster-info\" not found",
                        )
                    })?;
                let kc: Value =
                    serde_json::from_str(info["data"]["kubeconfig"].as_str().unwrap_or("null"))
                        .unwrap_or(Value::Null);
                let cluster = &kc["clusters"][0]["cluster"];
                let ca = cluster["certificate-authority-data"]
                    .as_str()
                    .and_then(|d| B64.decode(d).ok())
                    .and_then(|b| String::from_utf8(b).ok())
                    .unwrap_or_default();
                let pin = ca_pin(&ca).map_err(plain_err)?;
                let endpoint = cluster["server"]
                    .as_str()
                    .unwrap_or("")
                    .trim_start_matches("http://")
                    .trim_start_matches("https://");
                println!(
                    "kubeadm join {endpoint} --token {} --discovery-token-ca-cert-hash {pin} ",
                    token.full()
                );
            } else {
                println!("{}", token.full());
            }
            Ok(())
        }
        "delete" => {
            if flags.positional.is_empty() {
                return Err(plain_err("missing subcommand; 'token delete' is missing token of form \"[a-z0-9]{6}\" or \"[a-z0-9]{6}\\.[a-z0-9]{16}\""));
            }
            for t in &flags.positional {
                let id = t.split('.').next().unwrap_or("");
                let name = format!("bootstrap-token-{id}");
                match api.delete(&format!("/api/v1/namespaces/kube-system/secrets/{name}")).await {
                    Ok(true) => println!("bootstrap token {id:?} deleted"),
                    Ok(false) => {
                        return Err(plain_err(format!("failed to delete bootstrap token with name {name:?}: secrets {name:?} not found")))
                    }
                    Err(e) => return Err(plain_err(format!("failed to delete bootstrap token with name {name:?}: {e}"))),
                }
            }
            Ok(())
        }
        other => Err(plain_err(format!(
            "the kubeadm stand-in implements `token create` and `token delete`, not `token {other}`"
        ))),
    }
}
