//! The provider binary refuses bad configuration: exit code 2 and a message
//! naming the file and what is wrong.

use std::process::Command;

fn run_with(name: &str, config: &str) -> (Option<i32>, String) {
    let dir = std::env::temp_dir().join(format!("tlshub-openssl-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join(name);
    std::fs::write(&path, config).expect("write config");
    let out = Command::new(env!("CARGO_BIN_EXE_tlshub-provider-openssl"))
        .arg("--config")
        .arg(&path)
        .output()
        .expect("run the provider");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn unknown_keys_and_missing_files_exit_2() {
    let (code, text) = run_with(
        "a.toml",
        "[tls]\nca = \"/x\"\ncert = \"/y\"\nkey = \"/z\"\ngroup = [\"X25519\"]\n",
    );
    assert_eq!(code, Some(2), "{text}");
    assert!(
        text.contains("a.toml")
            && text.contains("line 5")
            && text.contains("unknown field `group`"),
        "{text}"
    );

    let (code, text) = run_with(
        "b.toml",
        "[tls]\nca = \"/nonexistent/ca.pem\"\ncert = \"/y\"\nkey = \"/z\"\n",
    );
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains("/nonexistent/ca.pem"), "{text}");
}

#[test]
fn a_cipher_suite_ktls_cannot_take_is_refused() {
    let (code, text) = run_with(
        "c.toml",
        "[tls]\nca = \"/x\"\ncert = \"/y\"\nkey = \"/z\"\ncipher_suites = [\"TLS_AES_128_CCM_8_SHA256\"]\n",
    );
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains("TLS_AES_128_CCM_8_SHA256"), "{text}");
}
