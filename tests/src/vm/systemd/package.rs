//! The systemd VM's Debian package: installed with `apt-get` where
//! `install.sh --uninstall` just ran, operated as the documented install
//! is, upgraded in place, then purged.

use super::*;
use crate::failed;
use crate::vm::outcome::Failure;

/// The package instead of `install.sh`, on the host `install.sh
/// --uninstall` just left (its configuration removed, as on a fresh
/// host): `apt-get install ./tlshub_*.deb` puts the binaries in /usr/bin,
/// the units in /usr/lib/systemd/system and the configuration as
/// conffiles; then the same operator's part, `tlshub-core check`,
/// `systemctl enable --now`, `tlshubctl status` and a protected exchange
/// with node b; then `apt-get purge`, after which no binary, unit, pin or
/// configuration file of the package may be left.
pub(super) fn deb_install_and_purge() -> Result<String, Failure> {
    sh("rm -rf /etc/tlshub /etc/default/tlshub-core")?;
    let out = sh("DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends /root/tlshub.deb")
        .map_err(|e| e.context("apt-get install ./tlshub.deb"))?;
    expect_installed(
        "the package",
        &[
            "/usr/bin/tlshub-core",
            "/usr/bin/tlshubctl",
            "/usr/lib/systemd/system/tlshub-core.service",
            "/usr/lib/systemd/system/tlshub-provider@.service",
            "/etc/tlshub/core.toml",
            "/etc/modules-load.d/tlshub.conf",
        ],
        &out,
    )?;
    let conffiles = sh("dpkg-query -W -f='${Conffiles}' tlshub")?;
    if !conffiles.contains("/etc/tlshub/core.toml") {
        return Err(failed!("core.toml is not a conffile: {conffiles}"));
    }
    configure_node_a()?;
    let check =
        sh("tlshub-core check").map_err(|e| e.context("tlshub-core check after the package"))?;
    enable_node_a()?;
    let status = installed_status()?;
    let exchange = crate::vm::support::App::exchange(10_000, crate::vm::node::PROTECTED_PORT);
    let protected = exchange_keyed(&exchange, "with the package's core")?;
    if protected < 1.0 {
        return Err(failed!(
            "the package's core protected nothing; status {status:?}"
        ));
    }
    let upgraded = upgrade_in_place(&exchange)?;
    // The unit's StateDirectory: where the core keeps the peers that
    // announced tlshub ([peers] file's default), writable under
    // ProtectSystem=strict.
    if !std::path::Path::new("/var/lib/tlshub/peers.json").exists() {
        return Err("the package's core did not write /var/lib/tlshub/peers.json".into());
    }
    sh("DEBIAN_FRONTEND=noninteractive apt-get purge -y tlshub")
        .map_err(|e| e.context("apt-get purge tlshub"))?;
    let left: Vec<&str> = [
        "/usr/bin/tlshub-core",
        "/usr/lib/systemd/system/tlshub-core.service",
        "/etc/tlshub/core.toml",
        "/etc/modules-load.d/tlshub.conf",
        "/etc/systemd/system/multi-user.target.wants/tlshub-core.service",
        "/var/lib/tlshub",
    ]
    .into_iter()
    .filter(|f| std::path::Path::new(f).exists() || std::path::Path::new(f).is_symlink())
    .collect();
    let pins = std::fs::read_dir("/sys/fs/bpf/tlshub").is_ok_and(|mut d| d.next().is_some());
    if !left.is_empty() || pins {
        return Err(failed!("apt-get purge left {left:?}, pins left: {pins}"));
    }
    if systemctl(&["is-active", "tlshub-core.service"]).is_ok() {
        return Err("tlshub-core.service still active after the purge".into());
    }
    Ok(format!(
        "package: installed, {} check lines all ok, exchange protected ({protected} keyed), {upgraded}, purged with nothing left",
        check.lines().filter(|l| l.starts_with("ok")).count()
    ))
}

/// Runs `exchange` between pod-a and pod-b (exact bytes both ways) and
/// returns how many connections node a's core has protected with OpenSSL
/// since it started; `when` names the moment in errors.
fn exchange_keyed(exchange: &crate::vm::support::App, when: &str) -> Result<f64, Failure> {
    let (s, c) = crate::vm::support::run_pair(exchange, &[], Duration::from_secs(30))?;
    crate::vm::support::both_ok(exchange, &s, &c).map_err(|e| {
        e.map_message(|m| {
            format!(
                "a protected exchange {when}: {m}\n{}",
                journal("tlshub-core.service")
            )
        })
    })?;
    Ok(metric(
        &metrics_a()?,
        "tlshub_connections_protected_total{provider=\"openssl\"}",
    ))
}

/// The package installed again over itself, which runs what an upgrade
/// runs (`prerm upgrade`, the files, `postinst configure OLD`): the enabled
/// units must be running again as new processes, the node's edited
/// conffile kept, and `exchange` protected again.
fn upgrade_in_place(exchange: &crate::vm::support::App) -> Result<String, Failure> {
    let units = ["tlshub-core.service", "tlshub-provider@openssl.service"];
    let before: Vec<u32> = units.iter().map(|u| main_pid(u)).collect();
    let out = sh("DEBIAN_FRONTEND=noninteractive dpkg -i /root/tlshub.deb")
        .map_err(|e| e.context("dpkg -i over the installed package"))?;
    for (unit, old) in units.iter().zip(&before) {
        let pid = main_pid(unit);
        if unit_prop(unit, "ActiveState") != "active" || pid == *old || pid == 0 {
            return Err(failed!(
                "after the upgrade {unit} is {} with MainPID {pid} (was {old}):\n{out}\n{}",
                unit_prop(unit, "ActiveState"),
                journal(unit)
            ));
        }
    }
    let config = std::fs::read_to_string("/etc/tlshub/core.toml").unwrap_or_default();
    if !config.contains(&format!("timeout_ms = {TIMEOUT_MS}")) {
        return Err(failed!(
            "the upgrade replaced the node's edited core.toml:\n{config}"
        ));
    }
    // The restarted core counts from 0: this exchange is its first.
    if exchange_keyed(exchange, "after the upgrade")? < 1.0 {
        return Err("the upgraded core protected nothing".into());
    }
    Ok("upgraded in place (units restarted as new processes, edited core.toml kept, exchange protected again)".into())
}
