//! `tlshub-core check`: whether this host's kernel and this process can
//! run the core, and what to change if not. [`Facts::read`] gathers what
//! the host has (files under `/proc` and `/sys`, a trial `pidfd_getfd`, a
//! trial load of every BPF program); [`assess`] judges them, so the
//! judgement is unit-tested with the facts of hosts we know.

use std::path::{Path, PathBuf};

use tlshub_admin::preflight::{Check, Report};

use crate::config::{BpfSection, Config};

/// The capabilities the core's systemd unit gives it
/// (`CapabilityBoundingSet` in `deploy/systemd/tlshub-core.service`):
/// (number, name).
const CAPABILITIES: [(u32, &str); 6] = [
    (2, "CAP_DAC_READ_SEARCH"),
    (5, "CAP_KILL"),
    (12, "CAP_NET_ADMIN"),
    (19, "CAP_SYS_PTRACE"),
    (38, "CAP_PERFMON"),
    (39, "CAP_BPF"),
];

/// `statfs` magic numbers (`linux/magic.h`).
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// The oldest kernel the VM tests run (Debian's 6.1 cloud kernel).
const OLDEST_TESTED: (u32, u32) = (6, 1);

/// A verifier log can run to thousands of lines: a check shows this much.
const MAX_REASON: usize = 400;

/// A program's name and, if the kernel refused it, why.
pub type ProgramResult = (&'static str, Result<(), String>);

/// What the host has, as read.
#[derive(Debug, Clone)]
pub struct Facts {
    /// The configuration file and how it loaded (`None`: not found, the
    /// defaults were used).
    pub config: (PathBuf, Option<Result<(), String>>),
    /// `/proc/sys/kernel/osrelease`.
    pub release: String,
    /// `/proc/net/tls_stat` exists (the `tls` module is loaded).
    pub tls_loaded: bool,
    /// A `tls` module file under `/lib/modules/RELEASE`.
    pub tls_module_file: bool,
    /// `/sys/kernel/btf/vmlinux` exists.
    pub btf: bool,
    /// `/sys/kernel/security/lsm` (`None`: unreadable).
    pub lsm: Option<String>,
    /// `[bpf] cgroup` and its filesystem's magic (`None`: no such path).
    pub cgroup: (PathBuf, Option<i64>),
    /// The directory holding `[bpf] pin_dir` and its filesystem's magic.
    pub bpffs: (PathBuf, Option<i64>),
    /// `CapEff` of this process.
    pub capabilities: u64,
    /// A trial `pidfd_getfd` of a child process's fd.
    pub pidfd_getfd: Result<(), String>,
    /// `/proc/sys/kernel/yama/ptrace_scope` (`None`: no Yama).
    pub yama_ptrace_scope: Option<u8>,
    /// A trial load of every program (`None`: not tried, no privilege).
    pub programs: Option<Result<Vec<ProgramResult>, String>>,
}

impl Facts {
    /// Reads this host's facts for `config_path` (the defaults when it
    /// does not exist).
    pub fn read(config_path: &Path) -> Self {
        let (bpf, loaded) = if config_path.exists() {
            match Config::load(config_path) {
                Ok(c) => (c.bpf, Some(Ok(()))),
                Err(e) => (BpfSection::default(), Some(Err(e.to_string()))),
            }
        } else {
            (BpfSection::default(), None)
        };
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_owned();
        let modules = Path::new("/lib/modules").join(&release);
        let tls_module_file = ["tls.ko", "tls.ko.xz", "tls.ko.zst", "tls.ko.gz"]
            .iter()
            .any(|f| modules.join("kernel/net/tls").join(f).exists());
        let magic = |p: &Path| {
            rustix::fs::statfs(p)
                .ok()
                .map(|s| i64::from(s.f_type as i32 as u32))
        };
        let pin_parent = bpf.pin_dir.parent().unwrap_or(Path::new("/")).to_owned();
        let capabilities = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("CapEff:"))
                    .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            })
            .unwrap_or(0);
        let privileged = has(capabilities, 39) && has(capabilities, 38);
        Self {
            config: (config_path.to_owned(), loaded),
            tls_loaded: Path::new("/proc/net/tls_stat").exists(),
            tls_module_file: tls_module_file || Path::new("/sys/module/tls").exists(),
            btf: Path::new("/sys/kernel/btf/vmlinux").exists(),
            lsm: std::fs::read_to_string("/sys/kernel/security/lsm").ok(),
            cgroup: (bpf.cgroup.clone(), magic(&bpf.cgroup)),
            bpffs: (pin_parent.clone(), magic(&pin_parent)),
            capabilities,
            pidfd_getfd: trial_pidfd_getfd(),
            yama_ptrace_scope: std::fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope")
                .ok()
                .and_then(|s| s.trim().parse().ok()),
            programs: privileged.then(|| {
                crate::bpf::try_load_programs()
                    .map(|all| {
                        all.into_iter()
                            .map(|(name, r)| (name, r.map_err(|e| load_reason(&e))))
                            .collect()
                    })
                    .map_err(|e| crate::error_chain(&e))
            }),
            release,
        }
    }
}

/// Why the kernel refused a program, without the program's name (the
/// check groups programs by reason): the kernel's error, and the
/// verifier's log when there is one.
fn load_reason(e: &crate::bpf::BpfError) -> String {
    let text = match e {
        crate::bpf::BpfError::Load { source, .. } => source.to_string(),
        other => other.to_string(),
    };
    text.trim_end_matches(". Verifier output: ")
        .trim_end()
        .to_owned()
}

fn has(capabilities: u64, number: u32) -> bool {
    capabilities & (1 << number) != 0
}

/// Takes a copy of a child process's fd (the stdin of a `sleep`), as the
/// core takes an app's socket. Another process, because the kernel lets a
/// process take its own fds without the `ptrace` access check that Yama
/// and other LSMs may refuse.
fn trial_pidfd_getfd() -> Result<(), String> {
    use std::process::{Command, Stdio};
    let mut child = Command::new("sleep")
        .arg("10")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start a child process (sleep) to take an fd from: {e}"))?;
    let taken = tlshub_provider_sdk::socket::pidfd_open(child.id())
        .map_err(|e| format!("pidfd_open: {e}"))
        .and_then(|pidfd| {
            tlshub_provider_sdk::socket::pidfd_getfd(&pidfd, 0)
                .map(drop)
                .map_err(|e| format!("pidfd_getfd of a child process's fd: {e}"))
        });
    // The child is ours to end either way.
    let _ = child.kill();
    let _ = child.wait();
    taken
}

fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

fn one_line(text: &str) -> String {
    let line: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    match line.char_indices().nth(MAX_REASON) {
        Some((at, _)) => format!("{} ...", &line[..at]),
        None => line,
    }
}

/// Judges `f`: one check per requirement, in
/// [`tlshub_admin::preflight::NAMES`] order.
pub fn assess(f: &Facts) -> Report {
    let check = |name: &str, ok: bool, found: String, remedy: Option<String>| Check {
        name: name.to_owned(),
        ok,
        found,
        remedy: if ok { None } else { remedy },
    };
    let mut checks = Vec::new();
    let (path, loaded) = &f.config;
    checks.push(match loaded {
        None => check(
            "configuration",
            true,
            format!("{} not found; checked with the defaults", path.display()),
            None,
        ),
        Some(Ok(())) => check("configuration", true, format!("{} loads", path.display()), None),
        Some(Err(e)) => check(
            "configuration",
            false,
            e.clone(),
            Some("fix the file (the error names the line and key); the other checks used the defaults".into()),
        ),
    });
    let version = kernel_version(&f.release);
    checks.push(check(
        "kernel",
        version.is_some_and(|v| v >= OLDEST_TESTED),
        format!(
            "{} (tested: Debian's 6.1 and 6.12 cloud kernels)",
            f.release
        ),
        Some("run a 6.1 or later kernel".into()),
    ));
    checks.push(if f.tls_loaded {
        check("kernel TLS", true, "/proc/net/tls_stat present (tls module loaded)".into(), None)
    } else if f.tls_module_file {
        check(
            "kernel TLS",
            false,
            "the tls module is not loaded (no /proc/net/tls_stat)".into(),
            Some("modprobe tls (deploy/modules-load.conf, installed in /etc/modules-load.d, loads it at boot)".into()),
        )
    } else {
        check(
            "kernel TLS",
            false,
            format!("no /proc/net/tls_stat and no tls module under /lib/modules/{}", f.release),
            Some("a kernel built with CONFIG_TLS (=m or =y), as Debian's are".into()),
        )
    });
    checks.push(check(
        "BTF",
        f.btf,
        if f.btf {
            "/sys/kernel/btf/vmlinux present"
        } else {
            "no /sys/kernel/btf/vmlinux"
        }
        .into(),
        Some("a kernel built with CONFIG_DEBUG_INFO_BTF=y (the programs are CO-RE)".into()),
    ));
    checks.push(match &f.lsm {
        Some(list) => {
            let list = list.trim();
            let ok = list.split(',').any(|l| l == "bpf");
            check(
                "BPF LSM",
                ok,
                format!("active LSMs (/sys/kernel/security/lsm): {list}"),
                Some(format!(
                    "add bpf to the lsm= boot parameter (lsm={list},bpf); the kernel needs CONFIG_BPF_LSM=y"
                )),
            )
        }
        None => check(
            "BPF LSM",
            false,
            "/sys/kernel/security/lsm cannot be read".into(),
            Some("mount securityfs (mount -t securityfs none /sys/kernel/security) and run as root".into()),
        ),
    });
    let fs = |name: &str,
              (path, magic): &(PathBuf, Option<i64>),
              want: i64,
              what: &str,
              remedy: &str| {
        let found = match magic {
            None => format!("{} does not exist", path.display()),
            Some(m) if *m == want => format!("{} is {what}", path.display()),
            Some(m) => format!("{} is not {what} (filesystem magic {m:#x})", path.display()),
        };
        check(name, *magic == Some(want), found, Some(remedy.into()))
    };
    checks.push(fs(
        "cgroup v2",
        &f.cgroup,
        CGROUP2_SUPER_MAGIC,
        "cgroup v2",
        "boot with the unified cgroup hierarchy (systemd's default since Debian 11), or set [bpf] cgroup to where cgroup2 is mounted",
    ));
    checks.push(fs(
        "bpffs",
        &f.bpffs,
        BPF_FS_MAGIC,
        "bpffs",
        "mount -t bpf bpf /sys/fs/bpf (systemd mounts it at boot), or set [bpf] pin_dir under a bpffs",
    ));
    let missing: Vec<&str> = CAPABILITIES
        .iter()
        .filter(|(n, _)| !has(f.capabilities, *n))
        .map(|(_, name)| *name)
        .collect();
    checks.push(check(
        "capabilities",
        missing.is_empty(),
        if missing.is_empty() {
            "CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN, CAP_SYS_PTRACE, CAP_DAC_READ_SEARCH and CAP_KILL in effect".into()
        } else {
            format!("missing: {}", missing.join(", "))
        },
        Some("run as root, or under the tlshub-core systemd unit".into()),
    ));
    let yama = match f.yama_ptrace_scope {
        Some(scope) => format!(" (Yama ptrace_scope {scope})"),
        None => String::new(),
    };
    checks.push(check(
        "pidfd_getfd",
        f.pidfd_getfd.is_ok() && f.yama_ptrace_scope != Some(3),
        match &f.pidfd_getfd {
            Ok(()) => format!("took a copy of a child process's fd{yama}"),
            Err(e) => format!("{e}{yama}"),
        },
        Some(if f.yama_ptrace_scope == Some(3) {
            // Scope 3 refuses ptrace access, and so pidfd_getfd, to every
            // process, root included, and can only be set, never lowered,
            // until the next boot (Documentation/admin-guide/LSM/Yama.rst).
            "Yama's ptrace_scope 3 refuses pidfd_getfd to root too, and stays until a reboot: set kernel.yama.ptrace_scope to 2 or lower in /etc/sysctl.d and reboot".into()
        } else {
            "a 5.6 or later kernel, with CAP_SYS_PTRACE for other processes' sockets and no LSM policy refusing the core ptrace access".into()
        }),
    ));
    checks.push(match &f.programs {
        None => check(
            "BPF programs",
            false,
            "not tried: loading needs CAP_BPF and CAP_PERFMON".into(),
            Some("run the check as root".into()),
        ),
        Some(Err(e)) => check(
            "BPF programs",
            false,
            one_line(e),
            Some("the kernel refused the object itself: see the reason".into()),
        ),
        Some(Ok(results)) => {
            // Programs grouped by the kernel's reason, in the object's order.
            let mut by_reason: Vec<(String, Vec<&str>)> = Vec::new();
            for (name, r) in results {
                let Err(e) = r else { continue };
                let reason = one_line(e);
                match by_reason.iter_mut().find(|(r, _)| *r == reason) {
                    Some((_, names)) => names.push(name),
                    None => by_reason.push((reason, vec![name])),
                }
            }
            let refused: usize = by_reason.iter().map(|(_, n)| n.len()).sum();
            let groups: Vec<String> = by_reason
                .iter()
                .map(|(reason, names)| format!("{}: {reason}", names.join(", ")))
                .collect();
            check(
                "BPF programs",
                refused == 0,
                if refused == 0 {
                    format!("all {} load (not attached)", results.len())
                } else {
                    format!("{refused} of {} refused; {}", results.len(), groups.join("; "))
                },
                Some("the lsm/ programs need the BPF LSM and the fexit/ ones fentry support (CONFIG_BPF_LSM, CONFIG_DYNAMIC_FTRACE_WITH_DIRECT_CALLS); a kernel that refuses them cannot hold the gate".into()),
            )
        }
    });
    Report { checks }
}

/// The report as text: one line per check, remedies indented below.
pub fn render(r: &Report) -> String {
    let mut out = String::new();
    for c in &r.checks {
        out.push_str(&format!(
            "{:<7} {:<13} {}\n",
            if c.ok { "ok" } else { "MISSING" },
            c.name,
            c.found
        ));
        if let Some(remedy) = &c.remedy {
            out.push_str(&format!("{:<21} -> {remedy}\n", ""));
        }
    }
    out.push_str(if r.ok() {
        "this host can run tlshub-core\n"
    } else {
        "this host cannot run tlshub-core as it is: see MISSING above\n"
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tlshub_admin::preflight::NAMES;

    const ALL_CAPS: u64 = 0x1ff_ffff_ffff;

    /// The remedy of the check `name` (which must have one).
    fn remedy<'a>(r: &'a Report, name: &str) -> &'a str {
        r.get(name)
            .and_then(|c| c.remedy.as_deref())
            .unwrap_or_else(|| panic!("{name} has no remedy: {}", render(r)))
    }

    /// Debian's 6.1 cloud kernel in the test VM, as root.
    fn debian_vm() -> Facts {
        Facts {
            config: (PathBuf::from("/etc/tlshub/core.toml"), Some(Ok(()))),
            release: "6.1.0-57-cloud-amd64".into(),
            tls_loaded: true,
            tls_module_file: true,
            btf: true,
            lsm: Some("lockdown,capability,landlock,yama,apparmor,tomoyo,bpf\n".into()),
            cgroup: (PathBuf::from("/sys/fs/cgroup"), Some(CGROUP2_SUPER_MAGIC)),
            bpffs: (PathBuf::from("/sys/fs/bpf"), Some(BPF_FS_MAGIC)),
            capabilities: ALL_CAPS,
            pidfd_getfd: Ok(()),
            yama_ptrace_scope: Some(0),
            programs: Some(Ok(vec![
                ("tlshub_sockops", Ok(())),
                ("tlshub_gate_file", Ok(())),
            ])),
        }
    }

    #[test]
    fn a_debian_cloud_kernel_as_root_passes_every_check() {
        let r = assess(&debian_vm());
        assert!(r.ok(), "{}", render(&r));
        let names: Vec<&str> = r.checks.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, NAMES);
        assert!(r.checks.iter().all(|c| c.remedy.is_none()));
        assert!(render(&r).ends_with("this host can run tlshub-core\n"));
    }

    #[test]
    fn the_development_machine_is_told_what_is_missing() {
        // No kTLS at all, no BPF LSM, LSM and fexit programs refused.
        let f = Facts {
            release: "6.18.0".into(),
            tls_loaded: false,
            tls_module_file: false,
            lsm: Some("lockdown,capability,landlock".into()),
            programs: Some(Ok(vec![
                ("tlshub_sockops", Ok(())),
                ("tlshub_exit_connect", Err("EPERM".into())),
                ("tlshub_gate_file", Err("EPERM".into())),
                (
                    "tlshub_gate_sendmsg",
                    Err("verifier: R1 invalid mem access".into()),
                ),
            ])),
            ..debian_vm()
        };
        let r = assess(&f);
        assert!(!r.ok());
        let failed: Vec<&str> = r
            .checks
            .iter()
            .filter(|c| !c.ok)
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(failed, ["kernel TLS", "BPF LSM", "BPF programs"]);
        assert!(remedy(&r, "BPF LSM").contains("lsm=lockdown,capability,landlock,bpf"));
        assert!(remedy(&r, "kernel TLS").contains("CONFIG_TLS"));
        assert_eq!(
            r.get("BPF programs").unwrap().found,
            "3 of 4 refused; tlshub_exit_connect, tlshub_gate_file: EPERM; tlshub_gate_sendmsg: verifier: R1 invalid mem access"
        );
        assert!(render(&r).contains("MISSING kernel TLS"));
    }

    #[test]
    fn each_missing_piece_names_its_remedy() {
        let cases: [(&str, Facts); 7] = [
            (
                "kernel TLS",
                Facts {
                    tls_loaded: false,
                    ..debian_vm()
                },
            ),
            (
                "kernel",
                Facts {
                    release: "5.15.0-91-generic".into(),
                    ..debian_vm()
                },
            ),
            (
                "BTF",
                Facts {
                    btf: false,
                    ..debian_vm()
                },
            ),
            (
                "cgroup v2",
                Facts {
                    cgroup: (PathBuf::from("/sys/fs/cgroup"), Some(0x27e0eb)),
                    ..debian_vm()
                },
            ),
            (
                "bpffs",
                Facts {
                    bpffs: (PathBuf::from("/sys/fs/bpf"), None),
                    ..debian_vm()
                },
            ),
            (
                "capabilities",
                Facts {
                    capabilities: ALL_CAPS & !(1 << 39),
                    ..debian_vm()
                },
            ),
            (
                "configuration",
                Facts {
                    config: (PathBuf::from("c.toml"), Some(Err("c.toml:3: bad".into()))),
                    ..debian_vm()
                },
            ),
        ];
        for (name, f) in cases {
            let r = assess(&f);
            let failed: Vec<&Check> = r.checks.iter().filter(|c| !c.ok).collect();
            assert_eq!(failed.len(), 1, "{name}: {}", render(&r));
            assert_eq!(failed[0].name, name);
            assert!(failed[0].remedy.is_some(), "{name}");
        }
        // A module that is there but not loaded: load it.
        let r = assess(&Facts {
            tls_loaded: false,
            ..debian_vm()
        });
        assert!(remedy(&r, "kernel TLS").starts_with("modprobe tls"));
        let r = assess(&Facts {
            capabilities: 0,
            programs: None,
            ..debian_vm()
        });
        assert_eq!(
            r.get("capabilities").unwrap().found,
            "missing: CAP_DAC_READ_SEARCH, CAP_KILL, CAP_NET_ADMIN, CAP_SYS_PTRACE, CAP_PERFMON, CAP_BPF"
        );
        assert!(!r.get("BPF programs").unwrap().ok);
    }

    #[test]
    fn taking_another_process_fd_refused_by_yama_or_a_policy_is_missing() {
        // Yama's scope 3 refuses root too, until a reboot.
        let r = assess(&Facts {
            pidfd_getfd: Err(
                "pidfd_getfd of a child process's fd: Operation not permitted (os error 1)".into(),
            ),
            yama_ptrace_scope: Some(3),
            ..debian_vm()
        });
        let c = r.get("pidfd_getfd").unwrap();
        assert!(!c.ok, "{}", render(&r));
        assert!(c.found.ends_with("(Yama ptrace_scope 3)"), "{}", c.found);
        assert!(remedy(&r, "pidfd_getfd").contains("reboot"));
        // Scopes 1 and 2 leave a core with CAP_SYS_PTRACE its access, so
        // only the trial decides; a refusal by another policy names none.
        for scope in [Some(1), Some(2), None] {
            let fine = assess(&Facts {
                yama_ptrace_scope: scope,
                ..debian_vm()
            });
            assert!(fine.ok(), "{}", render(&fine));
        }
        let r = assess(&Facts {
            pidfd_getfd: Err(
                "pidfd_getfd of a child process's fd: Permission denied (os error 13)".into(),
            ),
            yama_ptrace_scope: Some(1),
            ..debian_vm()
        });
        assert!(!r.get("pidfd_getfd").unwrap().ok);
        assert!(remedy(&r, "pidfd_getfd").contains("LSM policy"));
    }

    #[test]
    fn a_verifier_log_is_cut_to_one_line() {
        let long = "refused:\n".to_owned() + &"0: (b7) r0 = 0\n".repeat(200);
        let cut = one_line(&long);
        assert!(!cut.contains('\n') && cut.ends_with(" ...") && cut.len() < MAX_REASON + 10);
    }
}
