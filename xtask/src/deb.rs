//! `cargo xtask deb`: `target/dist/tlshub_VERSION_amd64.deb`, built with
//! `dpkg-deb` from the dist directory. The layout comes from the dist's
//! own `install.sh --root STAGE --prefix /usr` (one description of what
//! goes where), with the units moved to the package's unit directory, the
//! configuration files as conffiles, each binary's `--help` under
//! `/usr/share/doc/tlshub/help`, and the maintainer scripts of
//! `deploy/debian` (prerm stops the units and detaches the BPF programs;
//! postrm purge removes what is left).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::dist::PRODUCT_BINARIES;
use crate::{root, run};

/// The package's name.
pub const PACKAGE: &str = "tlshub";

/// Paths every package must hold (checked after building it).
pub const MUST_HOLD: &[&str] = &[
    "./usr/bin/tlshub-core",
    "./usr/bin/tlshubctl",
    "./usr/bin/tlshub-provider-openssl",
    "./usr/lib/systemd/system/tlshub-core.service",
    "./usr/lib/systemd/system/tlshub-core-release.service",
    "./usr/lib/systemd/system/tlshub-provider@.service",
    "./usr/lib/systemd/system/tlshub-provider@tlshub.service.d/capabilities.conf",
    "./etc/tlshub/core.toml",
    "./etc/tlshub/nodes.toml",
    "./etc/modules-load.d/tlshub.conf",
    "./usr/share/doc/tlshub/help/tlshub-core.txt",
    "./usr/share/doc/tlshub/grafana/tlshub-dashboard.json",
];

/// The package file for this version.
pub fn deb_path() -> PathBuf {
    root().join(format!(
        "target/dist/{PACKAGE}_{}_amd64.deb",
        env!("CARGO_PKG_VERSION")
    ))
}

/// Builds the package from the dist directory `dist` (made by
/// [`crate::dist::assemble`]) and checks what it holds.
pub fn build(dist: &Path) -> Result<PathBuf> {
    let stage = root().join("target/dist/deb-root");
    let _ = std::fs::remove_dir_all(&stage);
    run(Command::new("sh")
        .arg(dist.join("install.sh"))
        .arg("--root")
        .arg(&stage)
        .args(["--prefix", "/usr"])
        .stdout(std::process::Stdio::null()))?;
    // A package's units live in the distribution's unit directory;
    // /etc/systemd/system is the administrator's.
    let units = stage.join("usr/lib/systemd");
    std::fs::create_dir_all(&units)?;
    std::fs::rename(stage.join("etc/systemd/system"), units.join("system"))?;
    std::fs::remove_dir(stage.join("etc/systemd"))?;
    // The examples install.sh keeps beside live files: dpkg's conffile
    // handling does that job in a package.
    for e in std::fs::read_dir(stage.join("etc/tlshub"))? {
        let path = e?.path();
        if path.extension().is_some_and(|x| x == "example") {
            std::fs::remove_file(path)?;
        }
    }
    let help = stage.join("usr/share/doc/tlshub/help");
    std::fs::create_dir_all(&help)?;
    for b in PRODUCT_BINARIES {
        let out = Command::new(dist.join("bin").join(b))
            .arg("--help")
            .output()
            .with_context(|| format!("{b} --help"))?;
        if !out.status.success() {
            bail!("{b} --help failed ({})", out.status);
        }
        std::fs::write(help.join(format!("{b}.txt")), &out.stdout)?;
    }
    let debian = stage.join("DEBIAN");
    std::fs::create_dir_all(&debian)?;
    for script in ["postinst", "prerm", "postrm"] {
        let to = debian.join(script);
        std::fs::copy(root().join("deploy/debian").join(script), &to)
            .with_context(|| format!("deploy/debian/{script}"))?;
        run(Command::new("chmod").arg("755").arg(&to))?;
    }
    std::fs::write(debian.join("conffiles"), conffiles(&stage)?)?;
    std::fs::write(debian.join("control"), control(&stage)?)?;
    let deb = deb_path();
    let _ = std::fs::remove_file(&deb);
    run(Command::new("dpkg-deb")
        .args(["--build", "--root-owner-group", "-Zxz"])
        .arg(&stage)
        .arg(&deb)
        .stdout(std::process::Stdio::null()))?;
    check(&deb)?;
    println!("== {}", deb.display());
    Ok(deb)
}

/// Every file under `etc/`: what an administrator edits, kept on upgrade.
fn conffiles(stage: &Path) -> Result<String> {
    let mut files = Vec::new();
    let mut dirs = vec![stage.join("etc")];
    while let Some(dir) = dirs.pop() {
        for e in std::fs::read_dir(&dir)? {
            let path = e?.path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                files.push(format!("/{}", path.strip_prefix(stage)?.display()));
            }
        }
    }
    files.sort();
    Ok(files.iter().map(|f| format!("{f}\n")).collect())
}

/// The C library this machine builds against: the binaries need at least
/// its version.
fn glibc_version() -> Result<String> {
    let out = Command::new("ldd")
        .arg("--version")
        .output()
        .context("ldd --version")?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .next()
        .and_then(|l| l.rsplit(' ').next())
        .filter(|v| v.chars().all(|c| c.is_ascii_digit() || c == '.'))
        .map(str::to_owned)
        .with_context(|| format!("no glibc version in `ldd --version`: {text}"))
}

fn control(stage: &Path) -> Result<String> {
    let out = Command::new("du")
        .args(["-sk", "--exclude=DEBIAN"])
        .arg(stage)
        .output()
        .context("du")?;
    let kib = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or("0")
        .to_owned();
    Ok(format!(
        "Package: {PACKAGE}\n\
         Version: {}\n\
         Architecture: amd64\n\
         Maintainer: tlshub developers <tlshub@localhost>\n\
         Installed-Size: {kib}\n\
         Depends: libc6 (>= {}), libssl3, systemd, kmod\n\
         Section: net\n\
         Priority: optional\n\
         Description: encrypts pod-to-pod TCP with kernel TLS, transparently\n \
         tlshub-core selects TCP connections by policy with eBPF, holds each\n \
         application until its keys are installed, gets the keys from a\n \
         provider process (OpenSSL, BoringSSL or the TLSHub kernel module)\n \
         and installs them with kernel TLS. Run `tlshub-core check` first.\n",
        env!("CARGO_PKG_VERSION"),
        glibc_version()?
    ))
}

/// Fails unless the package holds [`MUST_HOLD`] and lists the main
/// configuration files as conffiles.
fn check(deb: &Path) -> Result<()> {
    let contents = Command::new("dpkg-deb")
        .arg("--contents")
        .arg(deb)
        .output()?;
    let contents = String::from_utf8_lossy(&contents.stdout);
    let paths: Vec<&str> = contents
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .collect();
    for want in MUST_HOLD {
        if !paths.contains(want) {
            bail!("{} lacks {want}:\n{contents}", deb.display());
        }
    }
    let conffiles = Command::new("dpkg-deb")
        .args(["--info"])
        .arg(deb)
        .arg("conffiles")
        .output()?;
    let conffiles = String::from_utf8_lossy(&conffiles.stdout);
    for want in ["/etc/tlshub/core.toml", "/etc/modules-load.d/tlshub.conf"] {
        if !conffiles.lines().any(|l| l == want) {
            bail!("{want} is not a conffile:\n{conffiles}");
        }
    }
    Ok(())
}
