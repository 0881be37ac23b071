//! The test VM: a Debian cloud kernel booted by qemu (TCG) with an
//! initramfs holding busybox, the project's binaries, the tools the
//! scenarios use (with their shared libraries), a few kernel modules, test
//! certificates and an /init that runs `tlshub-vm-runner`. The serial
//! console is parsed for results; a panic, hang or missing result fails.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use tlshub_bench_report::console::{ConsoleLine, Verdict, WireTally};

use crate::deps::{self, Kernel};
use crate::{root, run};

/// The binaries the VM runs, built in release mode.
const BINARIES: &[&str] = &[
    "tlshub-core",
    "tlshub-provider-openssl",
    "tlshub-testapp",
    "tlshub-vm-runner",
    "tlshub-bad-provider",
    "tlshub-provider-tlshub",
    "tlshub-provider-boringssl",
    "tlshub-standin",
    "tlshub-conformance",
    "tlshub-loadgen",
    "tlshub-hold",
    "tlshubctl",
    "tlshub-goapp",
];
/// Host tools copied in with their libraries.
const TOOLS: &[&str] = &[
    "ip", "ss", "tcpdump", "wg", "stunnel4", "nft", "unshare", "setpriv", "tc", "strace", "prlimit",
];
/// Kernel module trees copied in (kTLS, its ciphers, veth).
pub const MODULE_DIRS: &[&str] = &[
    "kernel/crypto",
    "kernel/arch/x86/crypto",
    "kernel/lib",
    "kernel/net/tls",
    // inet_diag/tcp_diag let `ss` show kTLS (`tcp-ulp-tls`) on a socket.
    "kernel/net/ipv4/inet_diag.ko",
    "kernel/net/ipv4/tcp_diag.ko",
    "kernel/drivers/net/veth.ko",
    // netem: a delay on the pods' links, so that two SYNs cross (the
    // simultaneous-open scenario).
    "kernel/net/sched/sch_netem.ko",
    // WireGuard, the benchmark's node-to-node alternative.
    "kernel/drivers/net/wireguard",
    "kernel/net/ipv4/udp_tunnel.ko",
    "kernel/net/ipv6/ip6_udp_tunnel.ko",
    // nftables NAT and connection tracking (with ctnetlink, which the core
    // reads service translations from), for the DNAT scenarios.
    "kernel/net/netfilter",
    "kernel/net/ipv4/netfilter",
    "kernel/net/ipv6/netfilter",
    // Shared Memory Communications (AF_SMC; needs ib_core), which an app
    // may ask for and which falls back to TCP underneath: a gate scenario.
    "kernel/net/smc",
    "kernel/drivers/infiniband/core/ib_core.ko",
];

const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
mkdir -p /run && mount -t tmpfs run /run
mount -t cgroup2 none /sys/fs/cgroup
mount -t bpf bpf /sys/fs/bpf
mount -t tracefs tracefs /sys/kernel/tracing
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
mount -t securityfs securityfs /sys/kernel/security
echo /bin/modprobe > /proc/sys/kernel/modprobe
for m in tls veth inet_diag tcp_diag gcm ghash-generic aesni-intel ghash-clmulni-intel chacha20poly1305 chacha-x86_64 poly1305-x86_64; do
  modprobe $m || echo "TLSHUB-WARN cannot load module $m"
done
ip link set lo up
hostname tlshub-vm
# Thousands of sockets at once (conformance, concurrency scenarios).
ulimit -n 65536
echo "TLSHUB-BOOTED $(uname -r)"
/bin/tlshub-vm-runner
sync
poweroff -f
"#;

fn copy_with_libs(
    bin: &Path,
    rootfs: &Path,
    dest: &Path,
    libs: &mut BTreeSet<PathBuf>,
) -> Result<()> {
    let target = rootfs.join(dest.strip_prefix("/").unwrap_or(dest));
    std::fs::create_dir_all(target.parent().context("no parent")?)?;
    std::fs::copy(bin, &target).with_context(|| format!("copy {}", bin.display()))?;
    let out = Command::new("ldd").arg(bin).output()?;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let path = match line.split_once("=>") {
            Some((_, rhs)) => rhs.split_whitespace().next().unwrap_or(""),
            None => line.split_whitespace().next().unwrap_or(""),
        };
        if path.starts_with('/') {
            libs.insert(PathBuf::from(path));
        }
    }
    Ok(())
}

fn which(tool: &str) -> Result<PathBuf> {
    for dir in ["/usr/sbin", "/usr/bin", "/sbin", "/bin"] {
        let p = Path::new(dir).join(tool);
        if p.exists() {
            return Ok(p);
        }
    }
    bail!("{tool} not found (cargo xtask deps installs it)")
}

/// Makes the test PKI (once, under `work/certs`) and copies the CA and
/// both nodes' certificates and keys into `dest`.
pub fn copy_certs(work: &Path, dest: &Path) -> Result<()> {
    let dir = work.join("certs");
    certs(&dir)?;
    std::fs::create_dir_all(dest)?;
    for f in [
        "ca.pem",
        "node-a.pem",
        "node-a.key",
        "node-b.pem",
        "node-b.key",
        "node-a-renewed.pem",
        "node-a-rogue.pem",
        "node-a-rogue.key",
        "rogue-ca.pem",
        "node-b-rogue.pem",
        "node-b-rogue.key",
        "node-c.pem",
        "node-c.key",
    ] {
        std::fs::copy(dir.join(f), dest.join(f))?;
    }
    Ok(())
}

/// Test PKI, made once: a cluster CA and two node certificates (EC P-256,
/// 10 years); a renewal of node a's (its key, 30 days); and a second
/// ("rogue") CA with a certificate and key for each node, for the
/// certificate reload and CA rotation scenarios; and a third node's
/// (`node-c`, cluster CA).
fn certs(dir: &Path) -> Result<()> {
    if dir.join("node-c.pem").exists() {
        return Ok(());
    }
    std::fs::create_dir_all(dir)?;
    let ossl = |args: &[&str]| run(Command::new("openssl").args(args).current_dir(dir));
    let key = |file: &str| {
        ossl(&[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            file,
        ])
    };
    let ca = |name: &str, subject: &str| {
        key(&format!("{name}.key"))?;
        ossl(&[
            "req",
            "-x509",
            "-new",
            "-key",
            &format!("{name}.key"),
            "-subj",
            subject,
            "-days",
            "3650",
            "-out",
            &format!("{name}.pem"),
        ])
    };
    // `csr` for node `node` signed by `ca`, valid `days`, into `out`.
    let sign = |node: &str, csr: &str, ca: &str, days: &str, out: &str| {
        ossl(&[
            "x509",
            "-req",
            "-in",
            csr,
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-days",
            days,
            "-extfile",
            &format!("{node}.ext"),
            "-out",
            out,
        ])
    };
    // A key and a signing request for `node` (CN and SAN `node`).
    let request = |node: &str, key_file: &str, csr: &str| {
        key(key_file)?;
        ossl(&[
            "req",
            "-new",
            "-key",
            key_file,
            "-subj",
            &format!("/CN={node}"),
            "-out",
            csr,
        ])
    };
    ca("ca", "/CN=tlshub test cluster CA")?;
    for node in ["node-a", "node-b"] {
        std::fs::write(
            dir.join(format!("{node}.ext")),
            format!("subjectAltName=DNS:{node}\nextendedKeyUsage=serverAuth,clientAuth\n"),
        )?;
        let csr = format!("{node}.csr");
        request(node, &format!("{node}.key"), &csr)?;
        sign(node, &csr, "ca", "3650", &format!("{node}.pem"))?;
    }
    sign("node-a", "node-a.csr", "ca", "30", "node-a-renewed.pem")?;
    ca("rogue-ca", "/CN=tlshub test rogue CA")?;
    for node in ["node-a", "node-b"] {
        let csr = format!("{node}-rogue.csr");
        request(node, &format!("{node}-rogue.key"), &csr)?;
        sign(node, &csr, "rogue-ca", "3650", &format!("{node}-rogue.pem"))?;
    }
    // A valid certificate of a third node, which must not stand in for
    // node a.
    std::fs::write(
        dir.join("node-c.ext"),
        "subjectAltName=DNS:node-c\nextendedKeyUsage=serverAuth,clientAuth\n",
    )?;
    request("node-c", "node-c.key", "node-c.csr")?;
    sign("node-c", "node-c.csr", "ca", "3650", "node-c.pem")
}

pub fn build_binaries() -> Result<PathBuf> {
    println!("== building release binaries");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run(Command::new(cargo).current_dir(root()).args([
        "build",
        "--release",
        "-p",
        "capture-core",
        "-p",
        "provider-openssl",
        "-p",
        "provider-tlshub",
        "-p",
        "provider-boringssl",
        "-p",
        "tlshub-vm-tests",
        "-p",
        "tlshub-admin",
        "--bins",
    ]))?;
    // The SDK's example provider, which the conformance scenario also runs.
    run(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .current_dir(root())
            .args([
                "build",
                "--release",
                "-p",
                "tlshub-provider-sdk",
                "--example",
                "psk-provider",
            ]),
    )?;
    build_go_app()?;
    Ok(root().join("target/release"))
}

/// Builds `tests/go/goapp` (a test app on the Go runtime) into
/// target/release/tlshub-goapp with Debian's Go: static (no cgo), the
/// standard library only, its build cache and GOPATH under target/.
fn build_go_app() -> Result<()> {
    let go =
        which("go").context("the Go test app needs Go: cargo xtask deps installs golang-go")?;
    run(Command::new(go)
        .current_dir(root().join("tests/go/goapp"))
        .env("CGO_ENABLED", "0")
        .env("GOCACHE", root().join("target/go-build"))
        // Go wants a GOPATH even for one file with no module (a CI
        // runner may have no HOME to put its default under).
        .env("GOPATH", root().join("target/go-path"))
        .env("GOTOOLCHAIN", "local")
        .args(["build", "-trimpath", "-o"])
        .arg(root().join("target/release/tlshub-goapp"))
        .arg("main.go"))
}

/// Builds the initramfs in `dir`; the test PKI comes from `work/certs`.
/// `profile`: with `perf`, and binaries keep their symbols.
fn initramfs(
    kernel: &Kernel,
    bins: &Path,
    work: &Path,
    dir: &Path,
    profile: bool,
) -> Result<PathBuf> {
    let rootfs = dir.join("rootfs");
    let _ = std::fs::remove_dir_all(&rootfs);
    for d in [
        "bin",
        "usr/bin",
        "usr/sbin",
        "sbin",
        "etc/tlshub/certs",
        "proc",
        "sys",
        "dev",
        "tmp",
        "run",
        "root",
        "var/run",
    ] {
        std::fs::create_dir_all(rootfs.join(d))?;
    }
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).context("busybox-static missing")?;
    let mut libs = BTreeSet::new();
    for b in BINARIES {
        let src = bins.join(b);
        copy_with_libs(&src, &rootfs, &Path::new("/bin").join(b), &mut libs)?;
        if !profile {
            let _ = Command::new("strip")
                .arg(rootfs.join("bin").join(b))
                .status();
        }
    }
    copy_with_libs(
        &bins.join("examples/psk-provider"),
        &rootfs,
        Path::new("/bin/psk-provider"),
        &mut libs,
    )?;
    for t in TOOLS {
        let p = which(t)?;
        copy_with_libs(&p, &rootfs, &p, &mut libs)?;
    }
    // gdb without Python, unpacked from gdb-minimal (the host's gdb, if any,
    // needs Python's whole library): the scenario whose apps run traced.
    let gdb = crate::deps::unpacked("gdb-minimal")?.join("usr/bin/gdb");
    copy_with_libs(&gdb, &rootfs, Path::new("/usr/bin/gdb"), &mut libs)?;
    if profile {
        let p = which("perf").context("the profile mode needs perf: apt-get install linux-perf")?;
        copy_with_libs(&p, &rootfs, &p, &mut libs)?;
    }
    for lib in &libs {
        let dest = rootfs.join(lib.strip_prefix("/").unwrap_or(lib));
        std::fs::create_dir_all(dest.parent().context("lib parent")?)?;
        std::fs::copy(lib, &dest).with_context(|| format!("copy {}", lib.display()))?;
    }
    // glibc's loader lives in /lib64 on x86_64; /lib is a symlink on the host.
    for link in ["lib", "lib64"] {
        if !rootfs.join(link).exists() {
            std::fs::create_dir_all(rootfs.join(format!("usr/{link}")))?;
            std::os::unix::fs::symlink(format!("usr/{link}"), rootfs.join(link))?;
        }
    }
    copy_modules(kernel, &rootfs, MODULE_DIRS)?;
    copy_certs(work, &rootfs.join("etc/tlshub/certs"))?;
    std::fs::write(
        rootfs.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\ntcpdump:x:100:100::/:/bin/false\n",
    )?;
    std::fs::write(rootfs.join("etc/group"), "root:x:0:\ntcpdump:x:100:\n")?;
    let init = rootfs.join("init");
    std::fs::write(&init, INIT)?;
    run(Command::new("chmod").arg("755").arg(&init))?;
    let out = dir.join("initrd.gz");
    pack_initramfs(&rootfs, &out)?;
    Ok(out)
}

/// Copies module trees of `kernel` into `rootfs/lib/modules/VERSION`
/// (where depmod and modprobe look; `lib` may be a directory or, in a
/// merged-/usr Debian root, a link to `usr/lib`) and runs depmod there.
pub fn copy_modules(kernel: &Kernel, rootfs: &Path, trees: &[&str]) -> Result<()> {
    let moddst = rootfs.join("lib/modules").join(&kernel.version);
    std::fs::create_dir_all(&moddst)?;
    for f in [
        "modules.order",
        "modules.builtin",
        "modules.builtin.modinfo",
    ] {
        std::fs::copy(kernel.modules.join(f), moddst.join(f))?;
    }
    for t in trees {
        // A single module is named by its .ko; 6.12 ships it as .ko.xz.
        let t = match kernel.modules.join(t).exists() {
            true => t.to_string(),
            false => format!("{t}.xz"),
        };
        let dst = moddst.join(&t);
        std::fs::create_dir_all(dst.parent().context("module parent")?)?;
        run(Command::new("cp")
            .arg("-a")
            .arg(kernel.modules.join(&t))
            .arg(&dst))?;
    }
    // Kernels from 6.12 on ship their modules xz-compressed; decompressed
    // here, they load with busybox's modprobe like 6.1's.
    run(Command::new("find")
        .arg(&moddst)
        .args(["-name", "*.ko.xz", "-exec", "unxz", "-f", "{}", "+"]))?;
    run(Command::new("depmod")
        .arg("-b")
        .arg(rootfs)
        .arg(&kernel.version))
}

/// Packs `dir` as a gzipped newc cpio archive at `out`.
pub fn pack_initramfs(dir: &Path, out: &Path) -> Result<()> {
    run(Command::new("sh").arg("-c").arg(format!(
        "cd '{}' && find . -print0 | cpio --null -o -H newc --quiet | gzip -1 > '{}'",
        dir.display(),
        out.display()
    )))
}

/// What one VM boot runs.
#[derive(Debug, Clone)]
pub struct Run {
    /// The runner's mode (`tlshub.mode=`).
    pub mode: &'static str,
    /// Only scenarios whose name contains one of these (comma-separated).
    pub filter: Option<String>,
    /// Runs of each selected scenario.
    pub repeat: u32,
    /// Capacity mode: connections to hold (`tlshub.connections=`).
    pub connections: Option<u64>,
    /// The VM's memory.
    pub memory_mib: u32,
    /// Bench mode: an earlier run's figures (its file and its contents)
    /// to print this run's against.
    pub compare: Option<(PathBuf, tlshub_bench_report::Report)>,
}

/// The VM's memory for every mode but capacity.
pub const MEMORY_MIB: u32 = 3072;
/// The capacity mode's memory: 100,000 connections are 200,000 kTLS
/// sockets in one VM (both nodes' ends).
pub const CAPACITY_MEMORY_MIB: u32 = 12288;

impl Run {
    /// One run of every scenario of `mode`, with the usual memory.
    pub fn new(mode: &'static str) -> Self {
        Self {
            mode,
            filter: None,
            repeat: 1,
            connections: None,
            memory_mib: MEMORY_MIB,
            compare: None,
        }
    }
}

/// Builds everything and boots the VM for `run`; fails unless every
/// planned scenario run reported PASS.
pub fn run_mode(run: &Run, line: deps::KernelLine, bins: &Path) -> Result<()> {
    let kernel = deps::kernel(line)?;
    let work = root().join("target/vm");
    // Each (mode, kernel) builds its initramfs in a directory of its own, so
    // that lanes (`run_lanes`) can build theirs at the same time.
    let label = format!("{}-{}", run.mode, line.name);
    let dir = work.join(&label);
    std::fs::create_dir_all(&dir)?;
    certs(&work.join("certs"))?;
    println!("== building initramfs ({label})");
    let initrd = initramfs(&kernel, bins, &work, &dir, run.mode == "profile")?;
    let timeout = match run.mode {
        "demo" => Duration::from_secs(15 * 60),
        // The capacity run opens its connections one after another.
        "capacity" => Duration::from_secs(3 * 60 * 60),
        _ => Duration::from_secs(60 * 60) * run.repeat,
    };
    let mut append = format!("tlshub.mode={}", run.mode);
    if let Some(f) = &run.filter {
        append.push_str(&format!(" tlshub.filter={f}"));
    }
    if run.repeat > 1 {
        append.push_str(&format!(" tlshub.repeat={}", run.repeat));
    }
    if let Some(n) = run.connections {
        append.push_str(&format!(" tlshub.connections={n}"));
    }
    // The build the run measures (the tree may change while it runs).
    let commit = crate::bench_report::commit();
    let booted = boot(&Boot {
        kernel: &kernel,
        initrd: &initrd,
        disk: None,
        append: &append,
        label: &label,
        timeout,
        memory_mib: run.memory_mib,
    });
    if run.mode == "bench" {
        // Also after a failed part: the figures measured before it count.
        // The boot's own failure is the one reported.
        let compare = run
            .compare
            .as_ref()
            .map(|(path, old)| (path.as_path(), old));
        let stem = crate::bench_report::figures_stem(run.filter.as_deref());
        let written = crate::bench_report::write(&label, line.name, &stem, commit, compare);
        match (&booted, written) {
            (Ok(()), written) => written?,
            (Err(_), Err(e)) => println!("== benchmark figures not written: {e:#}"),
            (Err(_), Ok(())) => {}
        }
    }
    booted
}

/// One step of a lane: a VM boot that fails unless its scenarios passed.
pub type Step<'a> = Box<dyn FnOnce() -> Result<()> + Send + 'a>;

/// VM boots that run one after another, next to other lanes.
pub struct Lane<'a> {
    /// Names the lane in the summary.
    pub name: String,
    /// The boots, in order; a failed one does not stop the next.
    pub steps: Vec<Step<'a>>,
}

/// Runs the lanes side by side and fails naming every boot that failed.
///
/// Every boot runs qemu's TCG on one host thread (`TCG_ONE_THREAD`), so two
/// lanes on a two-core host each get a core. They still slow each other
/// down by about a third (tests/README.md, "Running"), which the
/// scenarios tolerate and the systemd VM's restart timing does not.
pub fn run_lanes(lanes: Vec<Lane<'_>>) -> Result<()> {
    // Made once before the lanes start, so that two boots never race to
    // create it.
    certs(&root().join("target/vm/certs"))?;
    let started = Instant::now();
    let failures: Vec<String> = std::thread::scope(|scope| {
        let handles: Vec<_> = lanes
            .into_iter()
            .map(|lane| {
                scope.spawn(move || {
                    let mut failed = Vec::new();
                    for step in lane.steps {
                        if let Err(e) = step() {
                            failed.push(format!("lane {}: {e:#}", lane.name));
                        }
                    }
                    failed
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| {
                h.join()
                    .unwrap_or_else(|_| vec!["a lane's thread panicked".to_string()])
            })
            .collect()
    });
    if !failures.is_empty() {
        bail!("{}", failures.join("\n"));
    }
    println!(
        "== every VM lane passed in {:.0}s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// qemu's TCG with both vCPUs on one host thread, taking turns: what every
/// boot uses (the scenario runs and the systemd VM).
///
/// Why not qemu's default multi-threaded TCG: there (qemu 7.2) a vCPU that
/// runs a function while the other vCPU rewrites that function's first
/// instruction (`text_poke_bp`, which every BPF trampoline attach and
/// detach does to `bpf_lsm_*` and the fexit targets) can stay stuck on that
/// instruction for good: a soft lockup with RIP at
/// `bpf_lsm_file_permission+0x0` or `bpf_lsm_socket_sendmsg+0x0`, seen
/// twice in CI. `cargo xtask vm --mode stress` (attach and detach both
/// nodes' programs while threads write to files and sockets) hit it in its
/// first round with the default, and with `-cpu max,-pcid,-invpcid` too;
/// with one thread it passed 40 of 40 rounds. The scenario
/// `attach_detach_under_hook_traffic` fails if this comes back.
pub const TCG_ONE_THREAD: &str = "tcg,thread=single";

/// One qemu boot whose console the runner inside reports on.
pub struct Boot<'a> {
    /// The kernel.
    pub kernel: &'a Kernel,
    /// The initramfs.
    pub initrd: &'a Path,
    /// A raw disk image attached as /dev/vda (virtio), if any.
    pub disk: Option<&'a Path>,
    /// Kernel command line after the common part.
    pub append: &'a str,
    /// Names the serial log (`target/vm/serial-LABEL.log`).
    pub label: &'a str,
    /// The whole run's limit.
    pub timeout: Duration,
    /// The VM's memory.
    pub memory_mib: u32,
}

/// Boots qemu (TCG) and follows the serial console: `TLSHUB-PLAN N`, one
/// `TLSHUB-RESULT name PASS|FAIL ...` per scenario, `TLSHUB-DONE`. Fails
/// unless every planned scenario passed, on a kernel problem, or at the
/// timeout.
pub fn boot(b: &Boot<'_>) -> Result<()> {
    let work = root().join("target/vm");
    // A kernel bug must end the run at once with its backtrace on the
    // serial console, not spin until the timeout: soft lockups, hung tasks
    // and RCU stalls panic, and `panic=-1` + `-no-reboot` stop qemu.
    // `tsc=reliable`: under TCG the 6.1 kernel otherwise picks the HPET as
    // its clocksource (6.12 picks the TSC by itself), and then every clock
    // read, by an app, the core's runtime or a BPF program, is a system
    // call and an emulated device access, where real hosts read the TSC or
    // kvm-clock in user space (tests/README.md, "What is in the VM").
    let append = format!(
        "console=ttyS0 quiet panic=-1 oops=panic softlockup_panic=1 \
         hung_task_panic=1 rcupdate.rcu_cpu_stall_panic=1 tsc=reliable {}",
        b.append
    );
    println!(
        "== booting {} ({}); serial console follows",
        b.kernel.version, b.label
    );
    // `TLSHUB_QEMU_ACCEL` overrides it, e.g. `tcg` to reproduce the lockup
    // described at `TCG_ONE_THREAD`.
    let accel = std::env::var("TLSHUB_QEMU_ACCEL").unwrap_or_else(|_| TCG_ONE_THREAD.into());
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args([
        "-accel",
        &accel,
        "-cpu",
        "max",
        "-smp",
        "2",
        "-m",
        &b.memory_mib.to_string(),
        "-nographic",
        "-no-reboot",
        "-nic",
        "none",
    ])
    .arg("-kernel")
    .arg(&b.kernel.vmlinuz)
    .arg("-initrd")
    .arg(b.initrd)
    .args(["-append", &append]);
    if let Some(disk) = b.disk {
        qemu.arg("-drive").arg(format!(
            "file={},format=raw,if=virtio,cache=unsafe",
            disk.display()
        ));
    }
    let mut child = qemu
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("cannot start qemu-system-x86_64")?;
    let stdout = child.stdout.take().context("qemu stdout")?;
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            match line {
                Ok(l) => {
                    if tx.send(l).is_err() {
                        return;
                    }
                }
                Err(_) => return,
            }
        }
    });
    let started = Instant::now();
    let mut plan = None::<usize>;
    let mut passed = Vec::new();
    let mut failed = Vec::new();
    // Failures that were plaintext on the wire (`LEAK`), named in the summary.
    let mut leaks = 0usize;
    // The wire checks of the scenarios that passed, and how many had any.
    let mut wire = WireTally::default();
    let mut wire_scenarios = 0usize;
    let mut done = false;
    let mut panic = None;
    let mut log = Vec::new();
    let serial_log = work.join(format!("serial-{}.log", b.label));
    // Once the runner is done the results are known: a guest that does not
    // power off within this is stopped instead of waited for.
    let mut done_at = None::<Instant>;
    loop {
        if done_at.is_some_and(|t| t.elapsed() > Duration::from_secs(60)) {
            println!(
                "== the guest did not power off 60 s after the runner finished; stopping qemu"
            );
            let _ = child.kill();
            break;
        }
        let left = b.timeout.saturating_sub(started.elapsed());
        match rx.recv_timeout(left.min(Duration::from_secs(1))) {
            Ok(line) => {
                let line = line.trim_end_matches('\r').to_string();
                // Lanes boot side by side; the label says whose line it is.
                println!("[{}] {line}", b.label);
                match ConsoleLine::parse(&line) {
                    Ok(ConsoleLine::Plan(n)) => plan = Some(n),
                    Ok(ConsoleLine::Result(r)) if r.verdict == Verdict::Pass => {
                        if let Some(t) = r.wire {
                            wire.add(t);
                            wire_scenarios += 1;
                        }
                        passed.push(r.name);
                    }
                    // The whole line: CI shows only the end of the output,
                    // so the reason must be repeated there.
                    Ok(ConsoleLine::Result(r)) => {
                        leaks += usize::from(r.verdict == Verdict::Leak);
                        failed.push(
                            format!("{} {}", r.name, r.detail)
                                .chars()
                                .take(2000)
                                .collect::<String>(),
                        );
                    }
                    Ok(ConsoleLine::Done) => {
                        done = true;
                        done_at = Some(Instant::now());
                    }
                    // A protocol line that does not parse counts as a
                    // failure, never as a pass.
                    Err(e) => failed.push(e.to_string()),
                    Ok(ConsoleLine::Other) => {}
                }
                if line.contains("Kernel panic") || line.contains("BUG:") || line.contains("Oops:")
                {
                    panic.get_or_insert(line.clone());
                }
                log.push(line);
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
        }
        if started.elapsed() >= b.timeout {
            let _ = child.kill();
            let _ = child.wait();
            std::fs::write(&serial_log, log.join("\n"))?;
            bail!(
                "VM hung: no end after {:?} ({} results of {plan:?})",
                b.timeout,
                passed.len() + failed.len()
            );
        }
    }
    let _ = child.wait();
    std::fs::write(&serial_log, log.join("\n"))?;
    if let Some(p) = panic {
        bail!("kernel problem in the VM: {p}");
    }
    let Some(plan) = plan else {
        bail!("the VM runner never started (no TLSHUB-PLAN line)")
    };
    if !done {
        bail!("the VM runner did not finish (no TLSHUB-DONE)");
    }
    if plan == 0 {
        bail!("no scenario matched");
    }
    // Failures first: a malformed result line is one, and it also makes
    // the count below come out wrong.
    if !failed.is_empty() {
        let leaked = match leaks {
            0 => String::new(),
            n => format!(", {n} of them with PLAINTEXT on the wire"),
        };
        bail!(
            "{} VM scenario(s) failed{leaked}:\n{}",
            failed.len(),
            failed.join("\n")
        );
    }
    if passed.len() != plan {
        bail!("{plan} scenarios planned, {} reported", passed.len());
    }
    println!(
        "== VM {}: {} of {plan} passed in {:.0}s",
        b.label,
        passed.len(),
        started.elapsed().as_secs_f64()
    );
    if wire_scenarios > 0 {
        println!(
            "== VM {}: the wire, as checked by {wire_scenarios} scenario(s): {} protected flows with no plaintext ({} decrypted to the apps' bytes, {} a handshake only, {} reset before both ends had keys), {} plain controls showed their marker",
            b.label,
            wire.protected,
            wire.decrypted,
            wire.handshake_only,
            wire.unkeyed,
            wire.controls
        );
    }
    Ok(())
}
