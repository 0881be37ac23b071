//! Debian packages and the VM kernel.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::run;

/// Build and VM packages: clang/libbpf for the BPF object, protoc for the
/// API, OpenSSL headers, qemu and busybox for the VM, iproute2 and tcpdump
/// for the scenarios, kmod for depmod, debootstrap/e2fsprogs for the
/// systemd VM's disk and systemd for `systemd-analyze verify`.
const PACKAGES: &[&str] = &[
    "clang",
    "llvm",
    "libbpf-dev",
    "linux-libc-dev",
    "libc6-dev",
    "protobuf-compiler",
    "libssl-dev",
    // BoringSSL (boring-sys) is built from source: cmake, and libclang for bindgen.
    "cmake",
    "libclang-dev",
    "pkg-config",
    "openssl",
    "qemu-system-x86",
    "busybox-static",
    "cpio",
    "kmod",
    "iproute2",
    "tcpdump",
    // The systemd VM: a Debian userland, and the units checked on the host.
    "debootstrap",
    "e2fsprogs",
    "systemd",
    // /bin/kill: the providers' ExecReload, checked by systemd-analyze.
    "procps",
    // The 6.12 kernel's modules are xz-compressed.
    "xz-utils",
    // The alternatives the benchmark compares with: WireGuard between the
    // nodes, and a TLS-terminating proxy pair.
    "wireguard-tools",
    "stunnel4",
    // Service NAT in the VM (the DNAT scenarios).
    "nftables",
    // unshare and setpriv: apps started as a container starts a pod's
    // (their own pid namespace, an unprivileged uid) in a gate scenario.
    "util-linux",
    // strace, and the libraries of gdb-minimal's gdb (which the VM gets
    // unpacked, not installed: it conflicts with a full gdb), for the
    // scenario whose apps run traced.
    "strace",
    // Go (the standard library only, no module downloads): the test app
    // on the Go runtime, tests/go/goapp.
    "golang-go",
    "libdebuginfod1",
    "libipt2",
    "libxxhash0",
    "libgmp10",
    "libreadline8",
    "libexpat1",
];

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

/// `args` as a command, through sudo unless this runs as root.
pub fn sudo(args: &[&str]) -> Command {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0"))
        .unwrap_or(false);
    let mut c = if root {
        Command::new(args[0])
    } else {
        let mut c = Command::new("sudo");
        c.arg(args[0]);
        c
    };
    c.args(&args[1..]);
    c.env("DEBIAN_FRONTEND", "noninteractive");
    c
}

/// Installs missing Debian packages.
pub fn install() -> Result<()> {
    let missing: Vec<&str> = PACKAGES.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    println!("== installing Debian packages: {}", missing.join(" "));
    run(&mut sudo(&["apt-get", "update", "-qq"]))?;
    let mut args = vec!["apt-get", "install", "-y", "-qq", "--no-install-recommends"];
    args.extend(&missing);
    run(&mut sudo(&args)).context("installing build and VM packages")?;
    Ok(())
}

/// The unpacked VM kernel.
#[derive(Debug)]
pub struct Kernel {
    /// The bzImage.
    pub vmlinuz: PathBuf,
    /// lib/modules/<version>.
    pub modules: PathBuf,
    /// The version string.
    pub version: String,
}

/// A Debian cloud kernel line the VM scenarios run on: its name (`cargo
/// xtask test --kernel NAME`), the metapackage that names its current
/// build, and the prefix of that build's package name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelLine {
    /// "6.1" or "6.12".
    pub name: &'static str,
    meta: &'static str,
    prefix: &'static str,
}

/// Every kernel line tested: bookworm's own 6.1, and the 6.12 that
/// bookworm-security packages (the kernel of trixie-based nodes).
pub const KERNEL_LINES: &[KernelLine] = &[
    KernelLine {
        name: "6.1",
        meta: "linux-image-cloud-amd64",
        prefix: "linux-image-6.1.",
    },
    KernelLine {
        name: "6.12",
        meta: "linux-image-6.12-cloud-amd64",
        prefix: "linux-image-6.12.",
    },
];

/// The kernel line named `name` (`6.1`, `6.12`).
pub fn kernel_line(name: &str) -> Result<KernelLine> {
    KERNEL_LINES
        .iter()
        .find(|l| l.name == name.trim())
        .copied()
        .with_context(|| {
            let known: Vec<&str> = KERNEL_LINES.iter().map(|l| l.name).collect();
            format!("unknown kernel {name:?}; known: {}", known.join(", "))
        })
}

/// The kernel lines named by `--kernel` (`all`, or a comma-separated list).
pub fn kernel_lines(spec: &str) -> Result<Vec<KernelLine>> {
    if spec == "all" {
        return Ok(KERNEL_LINES.to_vec());
    }
    spec.split(',')
        .map(|name| kernel_line(name).context("`--kernel` takes all, or a comma-separated list"))
        .collect()
}

/// Downloads (once) the Debian package `pkg` and unpacks it, without
/// installing it, into target/vm-cache/PKG, which it returns.
///
/// Safe to call from lanes that run side by side (`vm::run_lanes`) and from
/// two xtask processes: on a clean checkout both kernel lanes ask for
/// gdb-minimal at once, and a shared scratch directory made one lane's
/// rename fail with `ENOTEMPTY` (CI, 2026-12-07).
pub fn unpacked(pkg: &str) -> Result<PathBuf> {
    // One download and unpack at a time in this process; the scratch names
    // below carry the pid for other processes.
    static UNPACKING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = UNPACKING.lock().unwrap_or_else(|e| e.into_inner());
    let cache = crate::root().join("target/vm-cache");
    std::fs::create_dir_all(&cache)?;
    let dir = cache.join(pkg);
    if dir.exists() {
        return Ok(dir);
    }
    println!("== fetching {pkg} for the VM");
    let pid = std::process::id();
    let download = cache.join(format!("{pkg}.download-{pid}"));
    let _ = std::fs::remove_dir_all(&download);
    std::fs::create_dir_all(&download)?;
    run(Command::new("apt-get")
        .args(["download", pkg])
        .current_dir(&download))?;
    let deb = std::fs::read_dir(&download)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .with_context(|| format!("apt-get download {pkg} left no .deb"))?;
    let tmp = cache.join(format!("{pkg}.tmp-{pid}"));
    let _ = std::fs::remove_dir_all(&tmp);
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tmp))?;
    let _ = std::fs::remove_dir_all(&download);
    if let Err(e) = std::fs::rename(&tmp, &dir) {
        let _ = std::fs::remove_dir_all(&tmp);
        // Another process unpacked the same package first: use its copy.
        if !dir.exists() {
            return Err(e)
                .with_context(|| format!("moving {} to {}", tmp.display(), dir.display()));
        }
    }
    Ok(dir)
}

/// Fetches (once) the Debian cloud kernel of `line` and unpacks it under
/// target/vm-cache.
pub fn kernel(line: KernelLine) -> Result<Kernel> {
    let cache = crate::root().join("target/vm-cache");
    std::fs::create_dir_all(&cache)?;
    let out = Command::new("apt-cache")
        .args(["depends", line.meta])
        .output()
        .context("apt-cache")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let pkg = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with(line.prefix) && p.ends_with("-cloud-amd64"))
        .map(str::to_owned);
    // Reuse an unpacked kernel when the package index is unavailable.
    let pkg = match pkg {
        Some(p) => p,
        None => {
            let found = std::fs::read_dir(&cache)?
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .find(|n| n.starts_with(line.prefix) && !n.ends_with(".deb"));
            found.with_context(|| format!("cannot resolve {} (run apt-get update)", line.meta))?
        }
    };
    let dir = unpacked(&pkg)?;
    let vmlinuz = std::fs::read_dir(dir.join("boot"))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .context("no vmlinuz in the kernel package")?;
    let modroot = dir.join("lib/modules");
    let version = std::fs::read_dir(&modroot)?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .next()
        .context("no modules in the kernel package")?;
    if !vmlinuz.exists() {
        bail!("{} missing", vmlinuz.display());
    }
    Ok(Kernel {
        vmlinuz,
        modules: modroot.join(&version),
        version,
    })
}
