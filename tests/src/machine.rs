//! A machine with real systemd as PID 1, for running the units in
//! `systemd/` the way a node runs them.
//!
//! systemd (the host's own `/lib/systemd/systemd`) boots as the init of new
//! PID, mount, UTS and cgroup namespaces, over a copy-on-write overlay of the
//! host's `/`. Nothing it does may reach the host: booted over the real `/`
//! its sysinit units would, among others, empty the host's `/tmp`. So,
//! inside the namespaces, before systemd starts:
//!
//! - `/` is an overlay whose upper layer is on a tmpfs: the machine reads the
//!   host's files (binaries, libraries) and every write or delete stays in
//!   memory;
//! - `/run`, `/tmp` are fresh tmpfs; `/proc` is the new PID namespace's, with
//!   `/proc/sys` read-only (systemd would raise host sysctls); `/sys` is a
//!   fresh read-only sysfs; `/dev` is a tmpfs with only `null`, `zero`,
//!   `full`, `random`, `urandom`, `tty`, a private `devpts`, and a log file
//!   as `/dev/console` (no disks, no host console);
//! - cgroups: the machine gets a cgroup of its own on the host
//!   (`kbtest-machine-<pid>-<n>` in the `name=systemd` and unified
//!   hierarchies) and sees only that as its root; the controller hierarchies
//!   are not mounted, so systemd creates nothing under other cgroups;
//! - the units the host has enabled (`/etc/systemd/system`, every
//!   `*.target.wants` in `/usr/lib/systemd/system`) and the generators are
//!   hidden under empty tmpfs, so only what a test installs exists; systemd
//!   boots to `kubeboot-test.target` (the kubelet double plus journald;
//!   the double starts the static etcd kubeadm left, as a kubelet does at
//!   boot);
//! - the root is `pivot_root`ed and the host's mounts detached, so the
//!   machine cannot see any host path it was not handed ([`Options::bind`]).
//!
//! The network namespace is the host's: the units reach the test world
//! (moto, the IMDS and API doubles, etcd) on its loopback addresses.
//!
//! The mounts exist only in the machine's mount namespace, which dies with
//! its last process. Dropping the [`Machine`] SIGKILLs its PID 1, which
//! kills every process in the namespace (including commands run in it with
//! [`Machine::exec`]); the `unshare` process is a [`ChildGuard`] with a
//! parent-death signal and passes its own death on to PID 1
//! (`--kill-child`), so a test process killed outright takes the machine
//! with it. Needs root.

use crate::process::{pid_alive, ChildGuard};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The target the machine boots to: journald (for the units' output) and the
/// kubelet double, nothing else.
pub const TARGET: &str = "kubeboot-test.target";

/// `kubelet.service` on the machine: a process that starts at once and
/// stays up until stopped, like a kubelet waiting for its config. kubeadm
/// (the stand-in, with `KUBEADM_STANDIN_INIT_SYSTEM=systemd`) restarts it.
/// At its first start after a boot it runs the static Pods kubeadm left
/// ([`KUBELET_SCRIPT`]).
pub const KUBELET_DOUBLE: &str = "[Unit]\n\
    Description=kubelet (test double: starts the static etcd at boot, then stays up until stopped)\n\
    \n\
    [Service]\n\
    ExecStart=/usr/local/libexec/kbtest-kubelet\n";

/// What the kubelet double runs. At its first start after a boot (a flag in
/// the fresh `/run`) it starts the etcd of a static Pod manifest kubeadm
/// left in `/etc/kubernetes/manifests` (the stand-in writes them as JSON),
/// in a scope of its own as the container runtime would, with the
/// manifest's command; the restarts kubeadm asks for later start nothing
/// (the stand-in's kubeadm starts the etcd it makes itself). Then it idles.
pub const KUBELET_SCRIPT: &str = r#"#!/bin/sh
set -u
if [ ! -e /run/kbtest-kubelet-booted ]; then
  : > /run/kbtest-kubelet-booted
  m=/etc/kubernetes/manifests/etcd.yaml
  if [ -f "$m" ] && ! pgrep -x etcd > /dev/null; then
    set --
    for a in $(jq -r '.spec.containers[0].command[]' "$m"); do set -- "$@" "$a"; done
    mkdir -p /etc/kubernetes/standin
    setsid systemd-run --scope --quiet --collect --unit=kubepods-etcd-static -- "$@" \
      >> /etc/kubernetes/standin/etcd.log 2>&1 < /dev/null &
    echo "started the static etcd: $*"
  fi
fi
exec sleep infinity
"#;

/// Where the machine has [`KUBELET_SCRIPT`].
const KUBELET_SCRIPT_PATH: &str = "/usr/local/libexec/kbtest-kubelet";

/// Longest a single command run in the machine may take.
const EXEC_TIMEOUT: Duration = Duration::from_secs(60);

/// How long the boot (systemd reachable and `running`) may take; seconds
/// are usual, the rest is room for a loaded CI machine.
const BOOT_TIMEOUT: Duration = Duration::from_secs(60);

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// The mounting done inside the namespaces, as their init, before it
/// becomes systemd. Arguments: the host dir to mount the scratch tmpfs on,
/// the console log file, the cgroup mode (`hybrid`, `legacy`, `unified`),
/// the pre-boot script (run with the new root's path, still seeing the
/// host's paths: it installs files, units, an image), the units the boot
/// target wants besides the kubelet and journald, then `ro|rw HOST GUEST`
/// triples.
const SETUP: &str = r#"
set -eu
base=$1 console=$2 cgmode=$3 preboot=$4 wants=$5
shift 5
mount -t tmpfs -o mode=0755 kbtest-machine "$base"
mkdir "$base/upper" "$base/work" "$base/root"
mount -t overlay -o lowerdir=/,upperdir="$base/upper",workdir="$base/work" kbtest-machine "$base/root"
root=$base/root
# Everything below writes under $root only: stop unless it is the overlay.
mountpoint -q "$root"
mount -t proc -o nosuid,nodev,noexec proc "$root/proc"
mount --bind "$root/proc/sys" "$root/proc/sys"
mount -o remount,bind,ro "$root/proc/sys"
if [ -e "$root/proc/sysrq-trigger" ]; then
  mount --bind "$root/proc/sysrq-trigger" "$root/proc/sysrq-trigger"
  mount -o remount,bind,ro "$root/proc/sysrq-trigger"
fi
mount -t sysfs -o ro,nosuid,nodev,noexec sysfs "$root/sys"
case $cgmode in
unified)
  mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 "$root/sys/fs/cgroup"
  ;;
*)
  mount -t tmpfs -o mode=0755,nosuid,nodev,noexec cgroup "$root/sys/fs/cgroup"
  mkdir "$root/sys/fs/cgroup/systemd"
  if [ "$cgmode" = hybrid ]; then
    mkdir "$root/sys/fs/cgroup/unified"
    mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 "$root/sys/fs/cgroup/unified"
  fi
  mount -t cgroup -o none,name=systemd,nosuid,nodev,noexec cgroup "$root/sys/fs/cgroup/systemd"
  # Read-only: systemd must not mount (and then populate) the controllers.
  mount -o remount,bind,ro "$root/sys/fs/cgroup"
  ;;
esac
mount -t tmpfs -o mode=0755,nosuid dev "$root/dev"
for d in null zero full random urandom tty; do
  : > "$root/dev/$d"
  mount --bind "/dev/$d" "$root/dev/$d"
done
: > "$root/dev/console"
mount --bind "$console" "$root/dev/console"
mkdir "$root/dev/pts" "$root/dev/shm"
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts "$root/dev/pts"
ln -s pts/ptmx "$root/dev/ptmx"
ln -s /proc/self/fd "$root/dev/fd"
mount -t tmpfs -o mode=1777,nosuid,nodev shm "$root/dev/shm"
mount -t tmpfs -o mode=0755,nosuid,nodev run "$root/run"
mount -t tmpfs -o mode=1777,nosuid,nodev tmp "$root/tmp"
# Only the units a test installs: hide the host's enabled units, the
# dependencies its packages add and the generators (fstab, getty, sysv...).
mount -t tmpfs -o mode=0755 units "$root/etc/systemd/system"
for w in "$root"/usr/lib/systemd/system/*.wants; do
  mount -t tmpfs -o mode=0755 wants "$w"
done
mount -t tmpfs -o mode=0755 generators "$root/usr/lib/systemd/system-generators"
while [ $# -ge 3 ]; do
  mode=$1 host=$2 guest=$3
  shift 3
  if [ -d "$host" ]; then
    mkdir -p "$root$guest"
  else
    mkdir -p "$(dirname "$root$guest")"
    [ -e "$root$guest" ] || : > "$root$guest"
  fi
  mount --bind "$host" "$root$guest"
  if [ "$mode" = ro ]; then mount -o remount,bind,ro "$root$guest"; fi
done
sh -eu "$preboot" "$root"
cat > "$root/etc/systemd/system/kubeboot-test.target" <<UNIT
[Unit]
Description=kubeboot test machine
Wants=kubelet.service systemd-journald.service $wants
UNIT
mkdir "$root/.kbtest-oldroot"
cd "$root"
pivot_root . .kbtest-oldroot
umount -l /.kbtest-oldroot
rmdir /.kbtest-oldroot
exec env -i container=kbtest /lib/systemd/systemd --unit=kubeboot-test.target --show-status=no
"#;

/// The pre-boot script: the options' files and units copied into the root
/// (`$1`) from files in `dir`, then the [`Options::before_boot`] commands.
fn preboot_script(dir: &Path, options: &Options) -> String {
    let quote = |s: &str| format!("'{}'", s.replace('\'', "'\\''"));
    let mut script = String::from("root=$1\n");
    let staged = options.files.iter().cloned().chain(
        options
            .units
            .iter()
            .map(|(name, text)| (format!("/etc/systemd/system/{name}"), text.clone(), 0o644)),
    );
    for (n, (path, text, mode)) in staged.enumerate() {
        let host = dir.join(format!("preboot-file-{n}"));
        std::fs::write(&host, text).expect("pre-boot file");
        script.push_str(&format!(
            "install -D -m {mode:o} {} \"$root\"{}\n",
            quote(&host.display().to_string()),
            quote(&path)
        ));
    }
    for argv in &options.preboot {
        let words: Vec<String> = argv.iter().map(|a| quote(a)).collect();
        script.push_str(&format!("{} \"$root\"\n", words.join(" ")));
    }
    script
}

/// A host path handed to the machine.
#[derive(Debug, Clone)]
struct Bind {
    host: PathBuf,
    guest: PathBuf,
    writable: bool,
}

/// What a machine boots with.
#[derive(Debug, Clone, Default)]
pub struct Options {
    binds: Vec<Bind>,
    units: Vec<(String, String)>,
    files: Vec<(String, String, u32)>,
    /// Host commands run before the boot with the machine's root appended.
    preboot: Vec<Vec<String>>,
    multi_user: bool,
}

impl Options {
    /// The machine with the kubelet double and, bound read-only at the paths
    /// a node has them, the `kubeboot` agent under test (`/usr/bin/kubeboot`)
    /// and the kubeadm stand-in (`/usr/bin/kubeadm`): the repo's units run
    /// unchanged.
    pub fn node() -> Options {
        Options::packages().bind_ro(crate::workspace::kubeboot_bin(), "/usr/bin/kubeboot")
    }

    /// What a node image's packages provide, as doubles: the kubeadm
    /// stand-in at `/usr/bin/kubeadm` and the kubelet double; no kubeboot
    /// (an installer puts it in, [`Options::before_boot`]).
    pub fn packages() -> Options {
        Options::default()
            .bind_ro(crate::standin::kubeadm_bin(), "/usr/bin/kubeadm")
            .file(KUBELET_SCRIPT_PATH, KUBELET_SCRIPT, 0o755)
            .unit("kubelet.service", KUBELET_DOUBLE)
    }

    /// `argv` run before systemd starts, on the host's paths, with the
    /// machine's root directory appended (an installer's `ROOT`): what it
    /// writes is in the machine when systemd first reads its units.
    pub fn before_boot(mut self, argv: &[&str]) -> Self {
        self.preboot
            .push(argv.iter().map(|a| a.to_string()).collect());
        self
    }

    /// Boots to `multi-user.target` as well, as a node does: the units an
    /// installer enabled (`WantedBy=multi-user.target`) start at boot.
    /// Without it only the test target's units start.
    pub fn multi_user(mut self) -> Self {
        self.multi_user = true;
        self
    }

    /// A file in the machine from its boot on.
    pub fn file(mut self, path: &str, text: &str, mode: u32) -> Self {
        self.files.push((path.to_string(), text.to_string(), mode));
        self
    }

    /// Hands a host file or directory to the machine, read-only, at `guest`.
    pub fn bind_ro(mut self, host: impl Into<PathBuf>, guest: impl Into<PathBuf>) -> Self {
        self.binds.push(Bind {
            host: host.into(),
            guest: guest.into(),
            writable: false,
        });
        self
    }

    /// Hands a host directory to the machine, writable, at `guest` (the
    /// test's own scratch space, shared with the units).
    pub fn bind_rw(mut self, host: impl Into<PathBuf>, guest: impl Into<PathBuf>) -> Self {
        self.binds.push(Bind {
            host: host.into(),
            guest: guest.into(),
            writable: true,
        });
        self
    }

    /// A unit in `/etc/systemd/system` from the boot on.
    pub fn unit(mut self, name: &str, text: &str) -> Self {
        self.units.push((name.to_string(), text.to_string()));
        self
    }
}

/// The host's cgroup layout, as the machine mirrors it.
#[derive(Debug, Clone, Copy, PartialEq)]
enum CgroupMode {
    /// cgroup v1 `name=systemd` plus cgroup2 at `unified`.
    Hybrid,
    /// cgroup v1 `name=systemd` only.
    Legacy,
    /// cgroup2 at `/sys/fs/cgroup`.
    Unified,
}

impl CgroupMode {
    fn detect() -> CgroupMode {
        let fs = Path::new("/sys/fs/cgroup");
        if fs.join("cgroup.controllers").exists() {
            CgroupMode::Unified
        } else if fs.join("unified/cgroup.controllers").exists() {
            CgroupMode::Hybrid
        } else {
            CgroupMode::Legacy
        }
    }

    fn word(self) -> &'static str {
        match self {
            CgroupMode::Hybrid => "hybrid",
            CgroupMode::Legacy => "legacy",
            CgroupMode::Unified => "unified",
        }
    }

    /// The host hierarchies the machine's cgroup is made in.
    fn hierarchies(self) -> Vec<PathBuf> {
        let fs = Path::new("/sys/fs/cgroup");
        match self {
            CgroupMode::Hybrid => vec![fs.join("systemd"), fs.join("unified")],
            CgroupMode::Legacy => vec![fs.join("systemd")],
            CgroupMode::Unified => vec![fs.to_path_buf()],
        }
    }
}

/// A booted machine; everything in it stops when it drops.
pub struct Machine {
    unshare: Option<ChildGuard>,
    pid1: u32,
    cgroups: Vec<PathBuf>,
    dir: tempfile::TempDir,
    booted_in: Duration,
}

impl Machine {
    /// Boots systemd with `options`; panics with the setup's output if it
    /// does not come up.
    pub fn boot(options: Options) -> Machine {
        let started = Instant::now();
        let dir = tempfile::Builder::new()
            .prefix("kbtest-machine-")
            .tempdir()
            .expect("machine dir");
        let base = dir.path().join("base");
        std::fs::create_dir(&base).expect("base dir");
        let console = dir.path().join("console.log");
        std::fs::write(&console, b"").expect("console log");

        let mode = CgroupMode::detect();
        let name = format!(
            "kbtest-machine-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        remove_stale_cgroups(mode);
        let cgroups: Vec<PathBuf> = mode.hierarchies().iter().map(|h| h.join(&name)).collect();
        for cg in &cgroups {
            std::fs::create_dir(cg)
                .unwrap_or_else(|e| panic!("machine cgroup {}: {e}", cg.display()));
        }

        // The outer shell joins the machine's cgroups (so the new cgroup
        // namespace is rooted there), then becomes unshare, whose child
        // (PID 1 of the new namespaces) mounts and becomes systemd.
        let mut outer = String::from("set -eu\n");
        for cg in &cgroups {
            outer.push_str(&format!("echo $$ > '{}/cgroup.procs'\n", cg.display()));
        }
        outer.push_str(
            "exec unshare --pid --fork --mount --uts --cgroup --propagation private \
             --kill-child=SIGKILL sh -c \"$0\" kbtest-machine \"$@\"\n",
        );
        let preboot = dir.path().join("preboot.sh");
        std::fs::write(&preboot, preboot_script(dir.path(), &options)).expect("pre-boot script");
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(outer)
            .arg(SETUP)
            .arg(&base)
            .arg(&console)
            .arg(mode.word())
            .arg(&preboot)
            .arg(if options.multi_user {
                "multi-user.target"
            } else {
                ""
            });
        for b in &options.binds {
            assert!(
                b.host.exists(),
                "machine bind: {} does not exist",
                b.host.display()
            );
            cmd.arg(if b.writable { "rw" } else { "ro" })
                .arg(&b.host)
                .arg(&b.guest);
        }
        let unshare = ChildGuard::spawn("machine", cmd, dir.path().join("boot.log"))
            .expect("unshare (util-linux)");
        let mut machine = Machine {
            pid1: 0,
            unshare: Some(unshare),
            cgroups,
            dir,
            booted_in: Duration::ZERO,
        };
        machine.pid1 = machine.wait_pid1();
        machine.wait_manager();
        machine.booted_in = started.elapsed();
        machine
    }

    /// Host pid of the machine's PID 1 (systemd).
    pub fn pid1(&self) -> u32 {
        self.pid1
    }

    /// Host pid of the `unshare` process that owns the namespaces.
    pub fn unshare_pid(&self) -> u32 {
        self.unshare.as_ref().map_or(0, ChildGuard::pid)
    }

    /// How long the boot took, up to systemd `running`.
    pub fn booted_in(&self) -> Duration {
        self.booted_in
    }

    /// The machine's cgroups on the host.
    pub fn cgroups(&self) -> &[PathBuf] {
        &self.cgroups
    }

    /// What systemd (PID 1) and the setup printed, for failure messages.
    pub fn console(&self) -> String {
        let console =
            std::fs::read_to_string(self.dir.path().join("console.log")).unwrap_or_default();
        let boot = self
            .unshare
            .as_ref()
            .map(|u| u.log_tail(50))
            .unwrap_or_default();
        format!("{boot}\n{console}")
    }

    fn unshare_mut(&mut self) -> &mut ChildGuard {
        self.unshare.as_mut().expect("machine running")
    }

    fn wait_pid1(&mut self) -> u32 {
        let unshare = self.unshare_pid();
        let deadline = Instant::now() + BOOT_TIMEOUT;
        loop {
            let children =
                std::fs::read_to_string(format!("/proc/{unshare}/task/{unshare}/children"))
                    .unwrap_or_default();
            if let Some(pid) = children.split_whitespace().find_map(|p| p.parse().ok()) {
                return pid;
            }
            if !self.unshare_mut().is_running() || Instant::now() > deadline {
                panic!("the machine did not start:\n{}", self.console());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until PID 1 is systemd and its manager answers `running`.
    fn wait_manager(&mut self) {
        let deadline = Instant::now() + BOOT_TIMEOUT;
        let socket = format!("/proc/{}/root/run/systemd/private", self.pid1);
        let mut last = String::new();
        loop {
            if Path::new(&socket).exists() {
                let out = self.exec(&["systemctl", "is-system-running"]);
                last = String::from_utf8_lossy(&out.stdout).trim().to_string();
                if matches!(last.as_str(), "running" | "degraded") {
                    return;
                }
            }
            if !self.unshare_mut().is_running() || Instant::now() > deadline {
                panic!(
                    "systemd did not come up (last state {last:?}):\n{}",
                    self.console()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs a command inside the machine (its namespaces and root), with
    /// `stdin` as its standard input; killed after a minute.
    pub fn exec_with_input(&self, argv: &[&str], stdin: &[u8]) -> Output {
        use std::io::Write as _;
        let mut cmd = Command::new("nsenter");
        cmd.args([
            "-t",
            &self.pid1.to_string(),
            "-m",
            "-u",
            "-p",
            "-C",
            "-r",
            "-w",
            "--",
        ])
        .arg("timeout")
        .args(["-s", "KILL", &EXEC_TIMEOUT.as_secs().to_string()])
        .args(argv)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("SYSTEMD_PAGER", "")
        .env("SYSTEMD_COLORS", "0")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("nsenter (util-linux)");
        if let Some(mut input) = child.stdin.take() {
            let _ = input.write_all(stdin);
        }
        child.wait_with_output().expect("nsenter output")
    }

    /// Runs a command inside the machine.
    pub fn exec(&self, argv: &[&str]) -> Output {
        self.exec_with_input(argv, b"")
    }

    /// `systemctl ARGS` in the machine.
    pub fn systemctl(&self, args: &[&str]) -> Output {
        let mut argv = vec!["systemctl", "--no-pager"];
        argv.extend_from_slice(args);
        self.exec(&argv)
    }

    /// `systemctl ARGS` in the machine; panics unless it succeeds.
    pub fn systemctl_ok(&self, args: &[&str]) -> String {
        let out = self.systemctl(args);
        assert!(
            out.status.success(),
            "systemctl {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// One property of a unit (`systemctl show -P`).
    pub fn show(&self, unit: &str, property: &str) -> String {
        self.systemctl_ok(&["show", "-P", property, unit])
            .trim()
            .to_string()
    }

    /// Writes a file in the machine (parents created), with `mode`.
    pub fn write_file(&self, path: &str, contents: &[u8], mode: u32) {
        let mode = format!("{mode:o}");
        let out = self.exec_with_input(
            &[
                "sh",
                "-c",
                "mkdir -p \"$(dirname \"$1\")\" && cat > \"$1\" && chmod \"$2\" \"$1\"",
                "write",
                path,
                &mode,
            ],
            contents,
        );
        assert!(
            out.status.success(),
            "writing {path} in the machine: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Reads a file in the machine (`None` if it cannot be read).
    pub fn read_file(&self, path: &str) -> Option<Vec<u8>> {
        let out = self.exec(&["cat", path]);
        out.status.success().then_some(out.stdout)
    }

    /// Installs `text` as `/etc/systemd/system/<name>` and reloads systemd.
    pub fn install_unit(&self, name: &str, text: &str) {
        self.write_file(
            &format!("/etc/systemd/system/{name}"),
            text.as_bytes(),
            0o644,
        );
        self.systemctl_ok(&["daemon-reload"]);
    }

    /// Installs a drop-in `<unit>.d/<name>.conf` and reloads systemd: how a
    /// test sets environment or shortens a timeout while the unit file
    /// itself stays the repo's.
    pub fn install_drop_in(&self, unit: &str, name: &str, text: &str) {
        self.write_file(
            &format!("/etc/systemd/system/{unit}.d/{name}.conf"),
            text.as_bytes(),
            0o644,
        );
        self.systemctl_ok(&["daemon-reload"]);
    }

    /// Installs the repo's own `systemd/<name>`, unchanged (the binaries it
    /// names are bound at their paths by [`Options::node`]).
    pub fn install_repo_unit(&self, name: &str) {
        let path = crate::workspace::workspace_root()
            .join("systemd")
            .join(name);
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        self.install_unit(name, &text);
    }

    /// What a unit wrote to the journal (messages only).
    pub fn journal(&self, unit: &str) -> String {
        let out = self.exec(&["journalctl", "--no-pager", "-o", "cat", "-u", unit]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Polls the unit until `done(ActiveState, SubState)` holds or `timeout`
    /// passes: the time it took, or the last states seen.
    pub fn wait_until(
        &self,
        unit: &str,
        timeout: Duration,
        done: impl Fn(&str, &str) -> bool,
    ) -> Result<Duration, (String, String)> {
        let started = Instant::now();
        loop {
            let out = self.systemctl_ok(&["show", "-p", "ActiveState,SubState", unit]);
            let get = |key: &str| {
                out.lines()
                    .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
                    .unwrap_or("")
                    .to_string()
            };
            let (active, sub) = (get("ActiveState"), get("SubState"));
            if done(&active, &sub) {
                return Ok(started.elapsed());
            }
            if started.elapsed() > timeout {
                return Err((active, sub));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the unit's ActiveState is `state`.
    pub fn wait_state(
        &self,
        unit: &str,
        state: &str,
        timeout: Duration,
    ) -> Result<Duration, (String, String)> {
        self.wait_until(unit, timeout, |active, _| active == state)
    }

    /// A failure message for `unit`: its status, journal and the queued jobs.
    pub fn report(&self, unit: &str) -> String {
        let status = self.systemctl(&["status", unit]);
        let jobs = self.systemctl(&["list-jobs"]);
        format!(
            "--- systemctl status {unit}\n{}\n--- jobs\n{}\n--- journal {unit}\n{}",
            String::from_utf8_lossy(&status.stdout),
            String::from_utf8_lossy(&jobs.stdout),
            crate::simcluster::tail(&self.journal(unit))
        )
    }

    /// Stops everything: SIGKILL to PID 1 kills every process in the PID
    /// namespace; the mount namespace, with all its mounts, goes with them.
    fn shutdown(&mut self) {
        if let Some(mut unshare) = self.unshare.take() {
            if self.pid1 != 0 {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(self.pid1 as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            // unshare reaps PID 1 and exits with it; the guard reaps unshare.
            unshare.terminate(Duration::from_secs(5));
        }
        // The kernel kills the namespace's other processes asynchronously:
        // wait until the cgroups are empty, then remove them.
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.cgroups.iter().any(|cg| cgroup_has_processes(cg)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        for cg in &self.cgroups {
            remove_cgroup_tree(cg);
        }
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Whether any process is in `cgroup` or below.
pub fn cgroup_has_processes(cgroup: &Path) -> bool {
    let Ok(procs) = std::fs::read_to_string(cgroup.join("cgroup.procs")) else {
        return false;
    };
    if !procs.trim().is_empty() {
        return true;
    }
    std::fs::read_dir(cgroup)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .any(|e| cgroup_has_processes(&e.path()))
        })
        .unwrap_or(false)
}

/// Removes an (empty) cgroup and its children, deepest first.
fn remove_cgroup_tree(cgroup: &Path) {
    if let Ok(entries) = std::fs::read_dir(cgroup) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(cgroup);
}

/// Removes the cgroups of machines whose test process is gone (killed
/// without unwinding); a cgroup with processes cannot be removed anyway.
fn remove_stale_cgroups(mode: CgroupMode) {
    for hierarchy in mode.hierarchies() {
        let Ok(entries) = std::fs::read_dir(&hierarchy) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(owner) = name
                .strip_prefix("kbtest-machine-")
                .and_then(|rest| rest.split('-').next())
                .and_then(|pid| pid.parse::<u32>().ok())
            else {
                continue;
            };
            if !pid_alive(owner) && !cgroup_has_processes(&e.path()) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
}
