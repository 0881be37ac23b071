//! The providers the core knows by name, which one is active, and their
//! health. Switching the active provider affects only connections keyed
//! afterwards: a keying job takes its provider when it starts and finishes
//! on it, and installed connections live in the kernel.
//!
//! A switch is recorded in a small file (`[provider] switch_file`) so that
//! a restarted core, on purpose or by `Restart=on-failure`, keeps it. The
//! record names the configured provider it overrode: once the
//! configuration's `active` is edited, the configuration wins again.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tlshub_provider_sdk::ProviderInfo;
use tlshub_provider_sdk::client::{PeerHook, ProviderClient};
use tracing::{info, warn};

use crate::config::ProviderSet;

/// A provider's health as the core last saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Health {
    /// Not checked yet.
    Unknown,
    /// `grpc.health.v1` says SERVING.
    Serving,
    /// It answers but is not serving.
    NotServing,
    /// Its socket does not answer (absent, refused, or silent).
    Unreachable,
}

impl Health {
    /// Lower-case name for the admin API and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unknown => "unknown",
            Self::Serving => "serving",
            Self::NotServing => "not-serving",
            Self::Unreachable => "unreachable",
        }
    }
}

/// What the core knows about one provider.
#[derive(Debug, Clone)]
pub struct Observed {
    /// Current health.
    pub health: Health,
    /// Since when.
    pub since: Instant,
    /// What `GetInfo` said last (see [`INFO_REFRESH_EVERY`]).
    pub info: Option<ProviderInfo>,
    /// When `info` was asked for.
    pub info_at: Option<Instant>,
    /// The last error, when not serving.
    pub detail: Option<String>,
}

impl Observed {
    /// Keeps what `GetInfo` answered just now.
    fn took(&mut self, info: ProviderInfo) {
        self.info = Some(info);
        self.info_at = Some(Instant::now());
    }
}

/// One named provider.
pub struct Provider {
    /// Its name from the configuration.
    pub name: String,
    /// Its socket.
    pub socket: PathBuf,
    client: Mutex<ProviderClient>,
    hook: PeerHook,
    observed: Mutex<Observed>,
}

impl std::fmt::Debug for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Provider")
            .field("name", &self.name)
            .field("socket", &self.socket)
            .finish_non_exhaustive()
    }
}

impl Provider {
    /// The current client (cheap to clone; requests made through it share
    /// one connection).
    pub fn client(&self) -> ProviderClient {
        self.client
            .lock()
            .map(|c| c.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    /// Replaces the client with a fresh one, for after the provider was
    /// found not running: a gRPC channel whose connection died while
    /// requests were queued on it can leave later requests waiting until
    /// their deadline instead of dialling the restarted provider.
    pub fn reconnect(&self) {
        let fresh = ProviderClient::new(&self.socket, Some(self.hook.clone()));
        *self.client.lock().unwrap_or_else(|p| p.into_inner()) = fresh;
        tracing::debug!(provider = %self.name, "new channel to the provider");
    }

    /// Whether its last `GetInfo` said it keys from the connection's
    /// identity alone (`needs_socket: false`), so that keying may start
    /// before any process is known to hold the socket. False while that is
    /// not known.
    pub fn keys_without_socket(&self) -> bool {
        self.observed
            .lock()
            .map(|o| o.info.as_ref().is_some_and(|i| !i.needs_socket))
            .unwrap_or(false)
    }

    /// The one-byte form of the keying protocol its last `GetInfo` named
    /// (`keying_id`; 0 while not known, or not said).
    pub fn keying_id(&self) -> u8 {
        self.observed
            .lock()
            .map(|o| {
                o.info
                    .as_ref()
                    .map_or(0, |i| tlshub_provider_sdk::keying_id(&i.keying))
            })
            .unwrap_or(0)
    }

    /// Its health as last checked (without copying the rest of what was
    /// observed: this is read for every connection).
    pub fn health(&self) -> Health {
        self.observed
            .lock()
            .map_or_else(|p| p.into_inner().health, |o| o.health)
    }

    /// A snapshot of its health.
    pub fn observed(&self) -> Observed {
        self.observed
            .lock()
            .map(|o| o.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    fn set(&self, health: Health, info: Option<ProviderInfo>, detail: Option<String>) {
        let mut o = self.observed.lock().unwrap_or_else(|p| p.into_inner());
        if o.health != health {
            // A GetInfo that timed out under load keeps the version said
            // before.
            let version = info
                .as_ref()
                .or(o.info.as_ref())
                .map_or("unknown", |i| i.version.as_str())
                .to_owned();
            match health {
                Health::Serving => info!(
                    provider = %self.name,
                    version = %version,
                    socket = %self.socket.display(),
                    "provider serving"
                ),
                _ => warn!(
                    provider = %self.name,
                    health = health.as_str(),
                    detail = detail.as_deref().unwrap_or(""),
                    socket = %self.socket.display(),
                    "provider not serving"
                ),
            }
            o.health = health;
            o.since = Instant::now();
        }
        if let Some(info) = info {
            o.took(info);
        }
        o.detail = detail;
    }

    /// Whether a health check that found it serving should ask `GetInfo`
    /// again: it was not serving before (it may be another build now), its
    /// info is unknown or older than [`INFO_REFRESH_EVERY`], or key
    /// requests do not go over its keys stream now (a provider without
    /// one, or one whose stream connection ended: a restart between two
    /// checks ends it, and only `GetInfo` turns the stream back on).
    fn info_due(&self, was: Health, client: &ProviderClient) -> bool {
        let o = self.observed.lock().unwrap_or_else(|p| p.into_inner());
        was != Health::Serving
            || !client.uses_keys_stream()
            || o.info_at
                .is_none_or(|at| at.elapsed() >= INFO_REFRESH_EVERY)
    }
}

/// How old a serving provider's `GetInfo` answer may get before a health
/// check asks again (what changes meanwhile: its credentials after a
/// reload, which the expiry metric shows at most this late; its
/// node-pair sessions). `tlshubctl status` asks afresh
/// ([`Registry::refresh_info`]). Asking at every check doubled the
/// calls an idle core and provider made for the checks.
pub const INFO_REFRESH_EVERY: Duration = Duration::from_secs(10);

/// What a provider that answers its health check with NOT_SERVING is said
/// to be doing, in the status and in a refused switch.
const NOT_SERVING: &str = "health: NOT_SERVING";

/// Why the active provider cannot be changed.
#[derive(Debug, thiserror::Error)]
pub enum SwitchError {
    /// The provider did not answer its health check with SERVING (and the
    /// switch was not forced).
    #[error("provider `{name}` is not serving ({detail}); switch with --force to use it anyway")]
    NotServing {
        /// The name asked for.
        name: String,
        /// What its health check said.
        detail: String,
    },
    /// No provider has that name.
    #[error("no provider named `{name}` (configured: {known})")]
    Unknown {
        /// The name asked for.
        name: String,
        /// The configured names.
        known: String,
    },
}

/// The configured providers and the active choice.
#[derive(Debug)]
pub struct Registry {
    providers: BTreeMap<String, Arc<Provider>>,
    active: RwLock<String>,
    fallback: Option<String>,
    /// The configuration's `active`, which a recorded switch overrides.
    configured: String,
    /// Where switches are recorded, if anywhere.
    switch_file: Option<PathBuf>,
}

/// A switch made by `tlshubctl provider use`, as recorded for the next core
/// (written and read only here).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RecordedSwitch {
    /// The provider switched to.
    pub active: String,
    /// The configuration's `active` at the time: if the configuration now
    /// names another, it was edited since, and it wins.
    pub configured: String,
}

/// Why a recorded switch is not used.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The file exists but cannot be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The switch file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not a recorded switch.
    #[error("{} is not a recorded switch: {source}", path.display())]
    Parse {
        /// The switch file.
        path: PathBuf,
        /// The JSON error.
        source: serde_json::Error,
    },
    /// It names a provider the configuration no longer has.
    #[error("{} names provider `{name}`, which is not configured", path.display())]
    Unknown {
        /// The switch file.
        path: PathBuf,
        /// The recorded name.
        name: String,
    },
    /// It cannot be written.
    #[error("cannot record the switch in {}: {source}", path.display())]
    Write {
        /// The switch file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// The active provider a recorded switch asks for, if it still applies:
/// the file exists, names a configured provider, and was made against the
/// configuration's current `active`. `Ok(None)`: no switch, or the
/// configuration was edited since (then the stale record is removed).
pub fn recorded_switch(set: &ProviderSet, path: &Path) -> Result<Option<String>, RecordError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(RecordError::Read {
                path: path.into(),
                source,
            });
        }
    };
    let record: RecordedSwitch =
        serde_json::from_str(&text).map_err(|source| RecordError::Parse {
            path: path.into(),
            source,
        })?;
    if record.configured != set.active {
        info!(
            file = %path.display(),
            recorded = %record.active,
            was_configured = %record.configured,
            configured = %set.active,
            "the configuration's active provider changed since the recorded switch: the configuration wins"
        );
        let _ = std::fs::remove_file(path);
        return Ok(None);
    }
    if !set.endpoints.contains_key(&record.active) {
        return Err(RecordError::Unknown {
            path: path.into(),
            name: record.active,
        });
    }
    Ok(Some(record.active))
}

/// Records that `active` overrides the configuration's `configured` (the
/// file is replaced whole, by rename), or removes the record when they are
/// the same.
fn record_switch(path: &Path, active: &str, configured: &str) -> Result<(), RecordError> {
    let write = || -> std::io::Result<()> {
        if active == configured {
            return match std::fs::remove_file(path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            };
        }
        let record = RecordedSwitch {
            active: active.into(),
            configured: configured.into(),
        };
        let json = serde_json::to_vec(&record).map_err(std::io::Error::other)?;
        crate::files::replace(path, &json)
    };
    write().map_err(|source| RecordError::Write {
        path: path.into(),
        source,
    })
}

impl Registry {
    /// Clients for every provider in `set` (nothing connects yet); `hook`
    /// gets each provider's pid on every new connection to it, so it can be
    /// exempted from the gate before its first request. The active one is
    /// `set.active`, or the switch recorded in `switch_file` while it still
    /// applies (see [`recorded_switch`]; an unusable record is logged and
    /// ignored).
    pub fn new(set: &ProviderSet, hook: PeerHook, switch_file: Option<PathBuf>) -> Self {
        let providers = set
            .endpoints
            .iter()
            .map(|(name, socket)| {
                let p = Provider {
                    name: name.clone(),
                    socket: socket.clone(),
                    client: Mutex::new(ProviderClient::new(socket, Some(hook.clone()))),
                    hook: hook.clone(),
                    observed: Mutex::new(Observed {
                        health: Health::Unknown,
                        since: Instant::now(),
                        info: None,
                        info_at: None,
                        detail: None,
                    }),
                };
                (name.clone(), Arc::new(p))
            })
            .collect();
        let recorded = switch_file
            .as_deref()
            .map(|path| recorded_switch(set, path))
            .transpose()
            .unwrap_or_else(|e| {
                warn!(error = %e, configured = %set.active, "recorded provider switch ignored");
                None
            })
            .flatten();
        if let Some(active) = &recorded {
            info!(active = %active, configured = %set.active, "active provider restored from the recorded switch");
        }
        Self {
            providers,
            active: RwLock::new(recorded.unwrap_or_else(|| set.active.clone())),
            fallback: set.fallback.clone(),
            configured: set.active.clone(),
            switch_file,
        }
    }

    /// Every provider, by name.
    pub fn all(&self) -> impl Iterator<Item = &Arc<Provider>> {
        self.providers.values()
    }

    /// The active provider's name.
    pub fn active_name(&self) -> String {
        self.active
            .read()
            .map(|a| a.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    /// The configuration's `active`, which a switch overrides.
    pub fn configured_name(&self) -> &str {
        &self.configured
    }

    /// The fallback's name.
    pub fn fallback_name(&self) -> Option<&str> {
        self.fallback.as_deref()
    }

    /// Makes `name` the active provider for connections keyed from now on,
    /// and records the switch for the next core. Unless `force`, the
    /// provider must answer a health check now (within `timeout`) with
    /// SERVING. Returns the previous one.
    pub async fn use_provider(
        &self,
        name: &str,
        force: bool,
        timeout: Duration,
    ) -> Result<String, SwitchError> {
        let Some(provider) = self.providers.get(name) else {
            return Err(SwitchError::Unknown {
                name: name.into(),
                known: self
                    .providers
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        };
        // Asked now rather than read from the last periodic check, which
        // may be a health interval old.
        let not_serving = match provider.client().healthy(timeout).await {
            Ok(true) => None,
            Ok(false) => Some(NOT_SERVING.to_owned()),
            Err(e) => Some(e.to_string()),
        };
        if let Some(detail) = not_serving {
            if !force {
                return Err(SwitchError::NotServing {
                    name: name.into(),
                    detail,
                });
            }
            warn!(provider = name, detail = %detail, "switching to a provider that is not serving (forced)");
        }
        let mut active = self.active.write().unwrap_or_else(|p| p.into_inner());
        let previous = std::mem::replace(&mut *active, name.to_owned());
        info!(provider = name, previous = %previous, "active provider switched");
        // Recorded under the lock: two switches at once are recorded in the
        // order they apply, so the file names the provider that stays active.
        if let Some(path) = &self.switch_file
            && let Err(e) = record_switch(path, name, &self.configured)
        {
            // The switch holds for this core; only a restart would lose it.
            tracing::error!(error = %e, provider = name, "the switch is not recorded: a restarted core will use the configured provider");
        }
        Ok(previous)
    }

    /// The provider for a connection starting now: the active one, or the
    /// fallback while the active one is known to be down and the fallback
    /// is serving.
    pub fn choose(&self) -> Arc<Provider> {
        let primary = {
            let active = self
                .active
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            self.providers
                .get(active.as_str())
                .or_else(|| self.providers.values().next())
                .cloned()
        };
        let Some(primary) = primary else {
            unreachable!("a registry always has at least one provider (checked by the config)")
        };
        let down = matches!(primary.health(), Health::Unreachable | Health::NotServing);
        if down
            && let Some(f) = self.fallback.as_ref().and_then(|f| self.providers.get(f))
            && f.health() == Health::Serving
        {
            return f.clone();
        }
        primary
    }

    /// Checks every provider's health once, and asks a serving one for its
    /// info too: what it says of its credentials changes when it reloads
    /// them.
    pub async fn check_health(&self, timeout: Duration) {
        let checks = self.providers.values().map(|p| async move {
            let was = p.health();
            let client = p.client();
            match client.healthy(timeout).await {
                Ok(true) => {
                    let info = if p.info_due(was, &client) {
                        client.info(timeout).await.ok()
                    } else {
                        None
                    };
                    p.set(Health::Serving, info, None);
                }
                Ok(false) => p.set(Health::NotServing, None, Some(NOT_SERVING.into())),
                Err(e) => {
                    if was != Health::Unreachable {
                        p.reconnect();
                    }
                    p.set(Health::Unreachable, None, Some(e.to_string()));
                }
            }
        });
        futures_util::future::join_all(checks).await;
    }

    /// Asks every serving provider's `GetInfo` now (all at once, each
    /// within `timeout`), so that what `tlshubctl status` shows next is
    /// current rather than up to [`INFO_REFRESH_EVERY`] old. A provider
    /// that does not answer keeps what it said before.
    pub async fn refresh_info(&self, timeout: Duration) {
        let asks = self
            .providers
            .values()
            .filter(|p| p.health() == Health::Serving)
            .map(|p| async move {
                if let Ok(info) = p.client().info(timeout).await {
                    p.observed
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .took(info);
                }
            });
        futures_util::future::join_all(asks).await;
    }

    /// A provider by name.
    #[cfg(test)]
    pub fn get(&self, name: &str) -> Option<&Arc<Provider>> {
        self.providers.get(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry() -> Registry {
        Registry::new(&registry_set(), Arc::new(|_| {}), None)
    }

    fn registry_set() -> ProviderSet {
        ProviderSet {
            endpoints: [
                ("a".to_string(), PathBuf::from("/nonexistent/a.sock")),
                ("b".to_string(), PathBuf::from("/nonexistent/b.sock")),
            ]
            .into_iter()
            .collect(),
            active: "a".into(),
            fallback: Some("b".into()),
        }
    }

    const NOW: Duration = Duration::from_millis(200);

    #[tokio::test]
    async fn switching_changes_the_choice_and_unknown_names_are_refused() {
        let r = registry();
        assert_eq!(r.choose().name, "a");
        assert_eq!(r.use_provider("b", true, NOW).await.unwrap(), "a");
        assert_eq!(r.choose().name, "b");
        let e = r.use_provider("c", true, NOW).await.unwrap_err();
        assert!(matches!(e, SwitchError::Unknown { .. }), "{e}");
        let e = e.to_string();
        assert!(e.contains("`c`") && e.contains("a, b"), "{e}");
        assert_eq!(r.active_name(), "b");
    }

    #[tokio::test]
    async fn a_provider_that_does_not_answer_serving_needs_force() {
        let r = registry();
        // Even if the last periodic check said serving: asked again now.
        r.get("b").unwrap().set(Health::Serving, None, None);
        let e = r.use_provider("b", false, NOW).await.unwrap_err();
        assert!(matches!(e, SwitchError::NotServing { .. }), "{e}");
        assert!(e.to_string().contains("--force"), "{e}");
        assert_eq!(r.active_name(), "a");
        assert_eq!(r.use_provider("b", true, NOW).await.unwrap(), "a");
        assert_eq!(r.active_name(), "b");
    }

    /// A fresh directory for one test's switch file.
    fn switch_dir(test: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("tlshub-switch-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn registry_recording(file: &Path, configured: &str) -> Registry {
        let mut set = registry_set();
        set.active = configured.into();
        set.fallback = None;
        Registry::new(&set, Arc::new(|_| {}), Some(file.to_owned()))
    }

    #[tokio::test]
    async fn a_recorded_switch_survives_a_restart_until_the_configuration_changes() {
        let file = switch_dir("survives").join("active-provider.json");
        let r = registry_recording(&file, "a");
        r.use_provider("b", true, NOW).await.unwrap();
        // The next core, same configuration: the switch holds.
        assert_eq!(registry_recording(&file, "a").active_name(), "b");
        // Switched back to the configured one: nothing left to record.
        let r = registry_recording(&file, "a");
        r.use_provider("a", true, NOW).await.unwrap();
        assert!(!file.exists());
        assert_eq!(registry_recording(&file, "a").active_name(), "a");
        // The configuration's `active` edited after a switch: it wins, and
        // the stale record goes.
        registry_recording(&file, "a")
            .use_provider("b", true, NOW)
            .await
            .unwrap();
        assert_eq!(registry_recording(&file, "b").active_name(), "b");
        assert!(!file.exists());
        assert_eq!(registry_recording(&file, "a").active_name(), "a");
    }

    #[tokio::test]
    async fn an_unusable_record_is_refused_by_kind_and_the_configuration_used() {
        let dir = switch_dir("unusable");
        let file = dir.join("active-provider.json");
        let set = registry_set();
        assert!(matches!(recorded_switch(&set, &file), Ok(None)));
        std::fs::write(&file, "not json").unwrap();
        assert!(matches!(
            recorded_switch(&set, &file),
            Err(RecordError::Parse { .. })
        ));
        assert_eq!(registry_recording(&file, "a").active_name(), "a");
        let gone = RecordedSwitch {
            active: "removed".into(),
            configured: "a".into(),
        };
        std::fs::write(&file, serde_json::to_vec(&gone).unwrap()).unwrap();
        assert!(matches!(
            recorded_switch(&set, &file),
            Err(RecordError::Unknown { .. })
        ));
        assert_eq!(registry_recording(&file, "a").active_name(), "a");
        assert!(matches!(
            recorded_switch(&set, &dir),
            Err(RecordError::Read { .. })
        ));
        let e = record_switch(&dir.join("missing/x.json"), "b", "a").unwrap_err();
        assert!(matches!(e, RecordError::Write { .. }), "{e}");
    }

    #[tokio::test]
    async fn fallback_only_while_the_active_is_down_and_the_fallback_serves() {
        let r = registry();
        r.check_health(Duration::from_millis(200)).await;
        // Both unreachable: stay on the active one (its failure is reported).
        assert_eq!(r.get("a").unwrap().observed().health, Health::Unreachable);
        assert_eq!(r.choose().name, "a");
        r.get("b").unwrap().set(Health::Serving, None, None);
        assert_eq!(r.choose().name, "b");
        r.get("a").unwrap().set(Health::Serving, None, None);
        assert_eq!(r.choose().name, "a");
    }
}
