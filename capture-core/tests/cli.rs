//! The `tlshub-core` binary refuses bad configuration before touching the
//! kernel: exit code 2 and a message naming the file, line and key.

use std::process::Command;

fn run_with(config: &str) -> (Option<i32>, String) {
    let dir = std::env::temp_dir().join(format!("tlshub-core-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join(format!("core-{}.toml", config.len()));
    std::fs::write(&path, config).expect("write config");
    let out = Command::new(env!("CARGO_BIN_EXE_tlshub-core"))
        .arg("--config")
        .arg(&path)
        .arg("--check-config")
        .output()
        .expect("run tlshub-core");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (
        out.status.code(),
        text.replace(&path.display().to_string(), "FILE"),
    )
}

#[test]
fn bad_values_and_unknown_keys_exit_2_naming_file_line_and_key() {
    let (code, text) = run_with(
        "node_name = \"a\"\n[policy]\nlocal_cidrs = [\"10.0.1.0/24\"]\n[[policy.rules]]\npeer_cidrs = [\"10.0.2.0/24\"]\nports = [70000]\n",
    );
    assert_eq!(code, Some(2), "{text}");
    assert!(
        text.contains("FILE") && text.contains("line 6") && text.contains("ports"),
        "{text}"
    );

    let (code, text) = run_with("node_name = \"a\"\n[provider]\nsokcet = \"/x\"\n");
    assert_eq!(code, Some(2), "{text}");
    assert!(
        text.contains("line 3") && text.contains("unknown field `sokcet`"),
        "{text}"
    );
}

#[test]
fn a_missing_file_exits_2() {
    let out = Command::new(env!("CARGO_BIN_EXE_tlshub-core"))
        .args(["--config", "/nonexistent/tlshub/core.toml"])
        .output()
        .expect("run tlshub-core");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/tlshub/core.toml"));
}

#[test]
fn a_good_file_checks_ok() {
    let (code, text) = run_with(include_str!("../../deploy/config/core.toml"));
    assert_eq!(code, Some(0), "{text}");
}

#[test]
fn the_key_timeout_flag_is_named_as_its_config_key_and_refuses_zero() {
    let run = |value: &str| {
        Command::new(env!("CARGO_BIN_EXE_tlshub-core"))
            .args([
                "--config",
                "/nonexistent.toml",
                "--provider-timeout-ms",
                value,
            ])
            .arg("--check-config")
            .output()
            .expect("run tlshub-core")
    };
    let zero = run("0");
    assert_eq!(zero.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&zero.stderr).contains("--provider-timeout-ms"),
        "{}",
        String::from_utf8_lossy(&zero.stderr)
    );
    // A good value gets past the flags to the (missing) file.
    let good = run("1500");
    assert!(
        String::from_utf8_lossy(&good.stderr).contains("/nonexistent.toml"),
        "{}",
        String::from_utf8_lossy(&good.stderr)
    );
}
