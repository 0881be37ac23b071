//! `tlshubctl` as the scenarios run it: exit code and typed answer.

use crate::vm::outcome::Failure;
use std::path::Path;

use serde::de::DeserializeOwned;
use tlshub_admin::{CtlError, CtlFailure};

/// `tlshubctl status`'s exit code when the core answered but is degraded.
pub const DEGRADED: i32 = 5;

/// `tlshubctl --json ARGS` against the core at `socket` (the default one
/// when `None`): its exit code, and its answer read as `T` (exit 0, or
/// [`DEGRADED`]; `tlshubctl ab` interrupted exits 130 with its answer too)
/// or the failure it printed instead.
pub fn tlshubctl<T: DeserializeOwned>(
    socket: Option<&Path>,
    args: &[&str],
) -> Result<(i32, Result<T, CtlError>), Failure> {
    let socket = socket.map(|s| s.to_string_lossy().into_owned());
    let mut argv = vec!["tlshubctl", "--json"];
    if let Some(s) = &socket {
        argv.extend(["--socket", s]);
    }
    argv.extend_from_slice(args);
    let out = crate::vm::process::command(None, &argv)
        .output()
        .map_err(|e| format!("cannot run tlshubctl: {e}"))?;
    let code = out.status.code().unwrap_or(-1);
    let unreadable = |e: serde_json::Error| {
        format!(
            "tlshubctl {args:?} exited {code}: not its JSON ({e}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    const INTERRUPTED: i32 = 130;
    let answer = match code {
        0 | DEGRADED | INTERRUPTED => Ok(serde_json::from_slice(&out.stdout).map_err(unreadable)?),
        _ => Err(serde_json::from_slice::<CtlFailure>(&out.stdout)
            .map_err(unreadable)?
            .error),
    };
    Ok((code, answer))
}
