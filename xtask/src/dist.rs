//! `cargo xtask dist`: the directory (and tarball) a node is installed
//! from with `install.sh`, and `cargo xtask install`, which makes it and
//! runs `install.sh` on this machine.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::{root, run};

/// The binaries a node runs (the product, not the test tools).
pub const PRODUCT_BINARIES: &[&str] = &[
    "tlshub-core",
    "tlshubctl",
    "tlshub-provider-openssl",
    "tlshub-provider-boringssl",
    "tlshub-provider-tlshub",
];

/// Documents shipped under `share/doc/tlshub` (source path, installed name).
const DOCS: &[(&str, &str)] = &[
    ("README.md", "README.md"),
    ("ARCHITECTURE.md", "ARCHITECTURE.md"),
    ("deploy/README.md", "DEPLOY.md"),
    ("proto/PROVIDER_GUIDE.md", "PROVIDER_GUIDE.md"),
];

/// Builds the product binaries (release).
pub fn build_product() -> Result<PathBuf> {
    println!("== building release binaries (product)");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut c = Command::new(cargo);
    c.current_dir(root())
        .args(["build", "--release", "--bins"])
        .args(
            [
                "capture-core",
                "provider-openssl",
                "provider-tlshub",
                "provider-boringssl",
                "tlshub-admin",
            ]
            .iter()
            .flat_map(|p| ["-p", p]),
        );
    run(&mut c)?;
    Ok(root().join("target/release"))
}

/// Assembles `target/dist/tlshub-VERSION-x86_64-linux/` from built
/// binaries in `bins`, plus its `.tar.gz`; returns the directory.
pub fn assemble(bins: &Path) -> Result<PathBuf> {
    let name = format!("tlshub-{}-x86_64-linux", env!("CARGO_PKG_VERSION"));
    let dist = root().join("target/dist");
    let dir = dist.join(&name);
    let _ = std::fs::remove_dir_all(&dir);
    let deploy = root().join("deploy");
    for d in [
        "bin",
        "config",
        "doc",
        "systemd/tlshub-provider@tlshub.service.d",
        "grafana",
    ] {
        std::fs::create_dir_all(dir.join(d))?;
    }
    for b in PRODUCT_BINARIES {
        let dst = dir.join("bin").join(b);
        std::fs::copy(bins.join(b), &dst)
            .with_context(|| format!("{} (build it first)", bins.join(b).display()))?;
        run(Command::new("strip").arg(&dst))?;
    }
    copy_tree(&deploy.join("systemd"), &dir.join("systemd"))?;
    copy_tree(&deploy.join("config"), &dir.join("config"))?;
    copy_tree(&deploy.join("grafana"), &dir.join("grafana"))?;
    for f in ["install.sh", "modules-load.conf"] {
        std::fs::copy(deploy.join(f), dir.join(f)).with_context(|| format!("deploy/{f}"))?;
    }
    for (src, dst) in DOCS {
        std::fs::copy(root().join(src), dir.join("doc").join(dst))
            .with_context(|| src.to_string())?;
    }
    run(Command::new("chmod").arg("755").arg(dir.join("install.sh")))?;
    run(Command::new("tar")
        .arg("-czf")
        .arg(dist.join(format!("{name}.tar.gz")))
        .arg("-C")
        .arg(&dist)
        .arg(&name))?;
    println!("== {} (and {name}.tar.gz)", dir.display());
    Ok(dir)
}

fn copy_tree(src: &Path, dst: &Path) -> Result<()> {
    run(Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", src.display()))
        .arg(dst))
}

/// `systemd-analyze verify` of the units as installed by `install.sh
/// --root` into a scratch directory (the units name their binaries, which
/// must exist there).
pub fn verify_units(dist: &Path) -> Result<()> {
    println!("== systemd-analyze verify (units installed into a scratch root)");
    let scratch = root().join("target/dist/verify-root");
    let _ = std::fs::remove_dir_all(&scratch);
    run(Command::new("sh")
        .arg(dist.join("install.sh"))
        .arg("--root")
        .arg(&scratch)
        .stdout(std::process::Stdio::null()))?;
    // `--root` looks everything up inside the scratch root: give it the
    // host's system units (sysinit.target, ...), systemctl, which the
    // core's stop hook runs, and kill, which the providers' reload runs.
    std::fs::create_dir_all(scratch.join("usr/lib/systemd"))?;
    std::fs::create_dir_all(scratch.join("bin"))?;
    run(Command::new("cp")
        .args(["-a", "/usr/lib/systemd/system"])
        .arg(scratch.join("usr/lib/systemd/")))?;
    std::fs::copy("/usr/bin/systemctl", scratch.join("bin/systemctl"))
        .context("systemctl (package systemd)")?;
    std::fs::copy("/bin/kill", scratch.join("bin/kill")).context("/bin/kill (package procps)")?;
    let units = scratch.join("etc/systemd/system");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(format!("--root={}", scratch.display()))
        .args([
            "tlshub-core.service",
            "tlshub-core-release.service",
            "tlshub-provider@openssl.service",
            "tlshub-provider@boringssl.service",
            "tlshub-provider@tlshub.service",
        ])
        .current_dir(&units)
        .output()
        .context("systemd-analyze")?;
    // verify exits 0 on settings it ignores ("Failed to parse ..."): any
    // complaint at all fails the check.
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() || !said.trim().is_empty() {
        bail!(
            "systemd-analyze verify rejected the units ({}):\n{said}",
            out.status
        );
    }
    Ok(())
}

/// `cargo xtask install`: builds, assembles and runs `install.sh` here
/// (as root, through sudo if needed), with `extra` passed on.
pub fn install_here(extra: &[String]) -> Result<()> {
    let dir = assemble(&build_product()?)?;
    let script = dir.join("install.sh");
    let script = script.to_string_lossy();
    let mut args = vec!["sh", script.as_ref()];
    args.extend(extra.iter().map(String::as_str));
    run(&mut crate::deps::sudo(&args))
}
