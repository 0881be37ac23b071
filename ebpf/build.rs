//! Compiles `c/tlshub.bpf.c` with the packaged clang (Rust BPF needs a
//! bpf-linker these machines cannot build) and generates the layout
//! constants of `c/tlshub_shared.h` by compiling and running `c/layout.c`.
use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, bail};

fn run(cmd: &mut Command) -> anyhow::Result<std::process::Output> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(out)
}

fn main() -> anyhow::Result<()> {
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    for f in ["c/tlshub.bpf.c", "c/tlshub_shared.h", "c/layout.c"] {
        println!("cargo:rerun-if-changed={f}");
    }
    println!("cargo:rerun-if-env-changed=CLANG");
    let clang = std::env::var("CLANG").unwrap_or_else(|_| "clang".into());
    run(Command::new(&clang)
        .args([
            "-O2",
            "-g",
            "-target",
            "bpf",
            "-D__TARGET_ARCH_x86",
            "-Wall",
            "-Werror",
        ])
        .arg("-I/usr/include/x86_64-linux-gnu")
        .args(["-c", "c/tlshub.bpf.c", "-o"])
        .arg(out.join("tlshub.bpf.o")))
    .context("building the BPF object (needs clang and libbpf-dev: `cargo xtask deps`)")?;

    let layout_bin = out.join("layout");
    run(Command::new(&clang)
        .args(["-O0", "c/layout.c", "-o"])
        .arg(&layout_bin))
    .context("building the layout probe")?;
    let consts = run(&mut Command::new(&layout_bin))?;
    std::fs::write(out.join("layout.rs"), consts.stdout)?;
    Ok(())
}
