//! The providers the core knows by name, which one is active, and their
//! health. Switching the active provider affects only connections keyed
//! afterwards: a keying job takes its provider when it starts and finishes
//! on it, and installed connections live in the kernel.

use std::collections::BTreeMap;
use std::path::PathBuf;
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
    /// What `GetInfo` said when it last became healthy.
    pub info: Option<ProviderInfo>,
    /// The last error, when not serving.
    pub detail: Option<String>,
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
            match health {
                Health::Serving => info!(
                    provider = %self.name,
                    version = info.as_ref().map(|i| i.version.as_str()).unwrap_or("?"),
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
        if info.is_some() {
            o.info = info;
        }
        o.detail = detail;
    }
}

/// Why the active provider cannot be changed.
#[derive(Debug, thiserror::Error)]
pub enum SwitchError {
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
}

impl Registry {
    /// Clients for every provider in `set` (nothing connects yet); `hook`
    /// gets each provider's pid on every new connection to it, so it can be
    /// exempted from the gate before its first request.
    pub fn new(set: &ProviderSet, hook: PeerHook) -> Self {
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
                        detail: None,
                    }),
                };
                (name.clone(), Arc::new(p))
            })
            .collect();
        Self {
            providers,
            active: RwLock::new(set.active.clone()),
            fallback: set.fallback.clone(),
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

    /// The fallback's name.
    pub fn fallback_name(&self) -> Option<&str> {
        self.fallback.as_deref()
    }

    /// Makes `name` the active provider for connections keyed from now on.
    /// Returns the previous one.
    pub fn use_provider(&self, name: &str) -> Result<String, SwitchError> {
        if !self.providers.contains_key(name) {
            return Err(SwitchError::Unknown {
                name: name.into(),
                known: self
                    .providers
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        let mut active = self.active.write().unwrap_or_else(|p| p.into_inner());
        let previous = std::mem::replace(&mut *active, name.to_owned());
        info!(provider = name, previous = %previous, "active provider switched");
        Ok(previous)
    }

    /// The provider for a connection starting now: the active one, or the
    /// fallback while the active one is known to be down and the fallback
    /// is serving.
    pub fn choose(&self) -> Arc<Provider> {
        let active = self.active_name();
        let primary = self
            .providers
            .get(&active)
            .or_else(|| self.providers.values().next());
        let Some(primary) = primary else {
            unreachable!("a registry always has at least one provider (checked by the config)")
        };
        let down = matches!(
            primary.observed().health,
            Health::Unreachable | Health::NotServing
        );
        if down
            && let Some(f) = self.fallback.as_ref().and_then(|f| self.providers.get(f))
            && f.observed().health == Health::Serving
        {
            return f.clone();
        }
        primary.clone()
    }

    /// Checks every provider's health once; on a change to serving, asks
    /// for its info too.
    pub async fn check_health(&self, timeout: Duration) {
        let checks = self.providers.values().map(|p| async move {
            let was = p.observed().health;
            match p.client().healthy(timeout).await {
                Ok(true) => {
                    let info = if was == Health::Serving {
                        None
                    } else {
                        p.client().info(timeout).await.ok()
                    };
                    p.set(Health::Serving, info, None);
                }
                Ok(false) => p.set(Health::NotServing, None, Some("health: NOT_SERVING".into())),
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
        let set = ProviderSet {
            endpoints: [
                ("a".to_string(), PathBuf::from("/nonexistent/a.sock")),
                ("b".to_string(), PathBuf::from("/nonexistent/b.sock")),
            ]
            .into_iter()
            .collect(),
            active: "a".into(),
            fallback: Some("b".into()),
        };
        Registry::new(&set, Arc::new(|_| {}))
    }

    #[tokio::test]
    async fn switching_changes_the_choice_and_unknown_names_are_refused() {
        let r = registry();
        assert_eq!(r.choose().name, "a");
        assert_eq!(r.use_provider("b").unwrap(), "a");
        assert_eq!(r.choose().name, "b");
        let e = r.use_provider("c").unwrap_err().to_string();
        assert!(e.contains("`c`") && e.contains("a, b"), "{e}");
        assert_eq!(r.active_name(), "b");
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
