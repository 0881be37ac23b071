//! The systemd VM: the same Debian kernel booting a real Debian userland
//! (debootstrap, cached under `target/vm-cache`) with systemd as PID 1,
//! from an ext4 disk image that holds the `cargo xtask dist` directory. A
//! test unit runs `tlshub-vm-runner systemd`, which installs with the
//! documented `install.sh`, starts the units and checks them
//! (`tests/src/vm/systemd.rs`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::deps::{self, Kernel};
use crate::vm::{Boot, boot, pack_initramfs};
use crate::{root, run};

/// The scenario the systemd VM runs (`tests/src/vm/systemd.rs`).
pub const SCENARIO: &str = "systemd_install_units_and_restarts";
/// The Debian release of the guest userland (the host's, so the host-built
/// binaries find the same glibc and libssl).
const SUITE: &str = "bookworm";
/// Packages on top of `minbase`: systemd as init, and what the scenario
/// uses (ip, ss, tcpdump, ps) and the providers link (libssl3).
const PACKAGES: &str = "systemd,systemd-sysv,kmod,iproute2,iputils-ping,procps,tcpdump,libssl3";
/// Test-only binaries (not part of the product), in `/usr/local/lib/tlshub-test`.
const TEST_BINARIES: &[&str] = &["tlshub-vm-runner", "tlshub-loadgen", "tlshub-testapp"];
/// Units that would only slow the boot down or wait for hardware.
const MASKED: &[&str] = &[
    "serial-getty@ttyS0.service",
    "getty@tty1.service",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "e2scrub_all.timer",
    "fstrim.timer",
    "systemd-timesyncd.service",
    // Would prompt on the console if the image looked like a first boot.
    "systemd-firstboot.service",
];

/// The unit that runs the scenario and powers off afterwards; its output
/// goes to the serial console the xtask reads.
const TEST_UNIT: &str = "[Unit]
Description=tlshub VM test runner
After=multi-user.target

[Service]
Type=oneshot
Environment=PATH=/usr/local/lib/tlshub-test:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
Environment=RUST_BACKTRACE=1
ExecStart=/usr/local/lib/tlshub-test/tlshub-vm-runner systemd
StandardOutput=tty
StandardError=tty
TTYPath=/dev/ttyS0
TimeoutStartSec=infinity
# Power off at once (the disk is thrown away): a clean shutdown of this
# image under TCG did not finish.
ExecStopPost=/bin/systemctl --force --force poweroff

[Install]
WantedBy=multi-user.target
";

/// The initramfs only finds the disk: virtio modules, mount, switch_root
/// to systemd. A failure is reported in the runner's own format so the
/// xtask fails with the reason instead of waiting.
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
fail() {
  echo "TLSHUB-PLAN 1"
  echo "TLSHUB-RESULT systemd_boot FAIL $*"
  echo "TLSHUB-DONE"
  poweroff -f
}
modprobe virtio_pci || fail "cannot load virtio_pci"
modprobe virtio_blk || fail "cannot load virtio_blk"
for i in $(seq 100); do [ -b /dev/vda ] && break; sleep 0.1; done
mkdir -p /newroot
mount -t ext4 -o rw /dev/vda /newroot || fail "cannot mount /dev/vda"
mount --move /dev /newroot/dev
umount /proc /sys
exec switch_root /newroot /lib/systemd/systemd
"#;

/// The debootstrapped root, made once.
fn debian_root() -> Result<PathBuf> {
    let cache = root().join("target/vm-cache");
    // Named after the package list, so changing it makes a new root.
    let tag = PACKAGES.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let name = format!("debian-{SUITE}-systemd-{:08x}", tag >> 32);
    let dir = cache.join(&name);
    if dir.join("etc/debian_version").exists() {
        return Ok(dir);
    }
    let mirror = std::env::var("TLSHUB_DEBIAN_MIRROR")
        .unwrap_or_else(|_| "http://deb.debian.org/debian".into());
    let tmp = cache.join(format!("{name}.tmp"));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&cache)?;
    println!("== debootstrap {SUITE} (systemd userland for the systemd VM test; once)");
    run(Command::new("debootstrap")
        .args(["--variant=minbase", &format!("--include={PACKAGES}"), SUITE])
        .arg(&tmp)
        .arg(&mirror))
    .context("debootstrap (needs root and the Debian mirror; TLSHUB_DEBIAN_MIRROR overrides it)")?;
    std::fs::rename(&tmp, &dir)?;
    Ok(dir)
}

/// The busybox initramfs with the virtio modules.
fn initramfs(kernel: &Kernel, work: &Path) -> Result<PathBuf> {
    let rootfs = work.join("systemd-initramfs");
    let _ = std::fs::remove_dir_all(&rootfs);
    for d in ["bin", "proc", "sys", "dev", "newroot"] {
        std::fs::create_dir_all(rootfs.join(d))?;
    }
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).context("busybox-static missing")?;
    crate::vm::copy_modules(
        kernel,
        &rootfs,
        &[
            "kernel/drivers/virtio",
            "kernel/drivers/block/virtio_blk.ko",
        ],
    )?;
    std::fs::write(rootfs.join("init"), INIT)?;
    run(Command::new("chmod").arg("755").arg(rootfs.join("init")))?;
    let out = work.join("systemd-initrd.gz");
    pack_initramfs(&rootfs, &out)?;
    Ok(out)
}

fn symlink(target: &str, link: &Path) -> Result<()> {
    std::fs::create_dir_all(link.parent().context("link parent")?)?;
    let _ = std::fs::remove_file(link);
    std::os::unix::fs::symlink(target, link).with_context(|| link.display().to_string())
}

/// The disk image: the cached Debian root plus the dist directory (at
/// `/root/tlshub-dist`), the package (`/root/tlshub.deb`), the test tools, the test PKI, the kernel modules
/// the scenarios load, and the test unit.
fn disk_image(
    kernel: &Kernel,
    dist: &Path,
    deb: &Path,
    bins: &Path,
    work: &Path,
) -> Result<PathBuf> {
    let base = debian_root()?;
    let tree = work.join("systemd-root");
    let _ = std::fs::remove_dir_all(&tree);
    run(Command::new("cp").arg("-a").arg(&base).arg(&tree))?;
    run(Command::new("cp")
        .arg("-a")
        .arg(dist)
        .arg(tree.join("root/tlshub-dist")))?;
    std::fs::copy(deb, tree.join("root/tlshub.deb")).context("the package")?;
    let testdir = tree.join("usr/local/lib/tlshub-test");
    std::fs::create_dir_all(&testdir)?;
    for b in TEST_BINARIES {
        std::fs::copy(bins.join(b), testdir.join(b)).with_context(|| b.to_string())?;
    }
    crate::vm::copy_certs(work, &tree.join("root/test-certs"))?;
    crate::vm::copy_modules(kernel, &tree, crate::vm::MODULE_DIRS)?;
    let units = tree.join("etc/systemd/system");
    std::fs::write(units.join("tlshub-vm-test.service"), TEST_UNIT)?;
    symlink(
        "/etc/systemd/system/tlshub-vm-test.service",
        &units.join("multi-user.target.wants/tlshub-vm-test.service"),
    )?;
    for m in MASKED {
        symlink("/dev/null", &units.join(m))?;
    }
    std::fs::write(tree.join("etc/hostname"), "tlshub-vm\n")?;
    // No fstab entry: the initramfs mounted the root read-write, and an
    // entry would make systemd wait for a udev device that never comes.
    std::fs::write(tree.join("etc/fstab"), "")?;
    let image = work.join("systemd-disk.img");
    let _ = std::fs::remove_file(&image);
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "tlshub-root", "-d"])
        .arg(&tree)
        .arg(&image)
        .arg("3G"))
    .context("mkfs.ext4 -d")?;
    let _ = std::fs::remove_dir_all(&tree);
    Ok(image)
}

/// Builds the image and boots it; fails unless the systemd scenario passed.
pub fn run_systemd(bins: &Path) -> Result<()> {
    if !Path::new("/usr/sbin/debootstrap").exists() {
        bail!("debootstrap missing (cargo xtask deps installs it)");
    }
    // bookworm's own kernel, the one a debootstrapped bookworm runs.
    let kernel = deps::kernel(deps::KERNEL_LINES[0])?;
    let work = root().join("target/vm");
    std::fs::create_dir_all(&work)?;
    let dist = crate::dist::assemble(bins)?;
    let deb = crate::deb::build(&dist)?;
    println!("== building the systemd VM disk");
    let image = disk_image(&kernel, &dist, &deb, bins, &work)?;
    let initrd = initramfs(&kernel, &work)?;
    let result = boot(&Boot {
        kernel: &kernel,
        initrd: &initrd,
        disk: Some(&image),
        append: "tlshub.mode=systemd systemd.show_status=1",
        label: "systemd",
        timeout: Duration::from_secs(20 * 60),
        memory_mib: crate::vm::MEMORY_MIB,
    });
    let _ = std::fs::remove_file(&image);
    result
}

#[cfg(test)]
mod tests {
    use tlshub_bench_report::console::{ConsoleLine, Verdict};

    /// The /init's fallback speaks the runner's protocol (the xtask reads
    /// it with the same codec), so a boot failure ends the run with its
    /// reason.
    #[test]
    fn the_init_fallback_prints_lines_the_xtask_reads() {
        let lines: Vec<ConsoleLine> = super::INIT
            .lines()
            .filter_map(|l| l.trim().strip_prefix("echo \""))
            .filter_map(|l| l.strip_suffix('"'))
            .map(|l| ConsoleLine::parse(&l.replace("$*", "cannot load virtio_pci")).unwrap())
            .collect();
        assert_eq!(lines.len(), 3, "{lines:?}");
        assert_eq!(lines[0], ConsoleLine::Plan(1));
        assert!(
            matches!(&lines[1], ConsoleLine::Result(r) if r.verdict == Verdict::Fail && r.detail == "cannot load virtio_pci"),
            "{:?}",
            lines[1]
        );
        assert_eq!(lines[2], ConsoleLine::Done);
    }
}
